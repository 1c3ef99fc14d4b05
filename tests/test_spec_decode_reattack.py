"""Speculative decoding re-attacked after the fixes of test_spec_decode_attack.py (issue 14): what the draft
proposes around early ends (stop_token_ids, EOS forced by logit_bias, min_tokens, grammars that may end) leaves
greedy and seeded outputs unchanged; the adaptive policy recovers when acceptance comes back (a fault found this way,
fixed by probes); a draft shorter than the target proposes up to its own length and no further."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conveyor import LLM, SamplingParams
from conveyor.model.demo import DEMO_CONFIG, demo_tokenizer
from conveyor.sampling_params import StructuredOutputsParams as SO
from test_spec_decode_attack import demo_draft  # noqa: F401  (module-scoped fixture)

PROMPTS = ["hello hello hello ", "x", "hello hello hello " * 8]
EOS = 257  # one of the demo's eos_token_id


@pytest.fixture(scope="module")
def base() -> LLM:
    return LLM(model="demo")


@pytest.fixture(scope="module")
def self_draft() -> LLM:
    """The target as its own draft: every proposal is the target's token, so early ends land inside accepted runs."""
    return LLM(model="demo", speculative_config={"model": "demo", "num_speculative_tokens": 4,
                                                 "disable_by_batch_size": 1000})


def outputs(llm: LLM, params: SamplingParams) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason) for o in llm.generate(PROMPTS, params) for c in o.outputs]


def test_early_ends_inside_accepted_runs_match_no_speculation(base, self_draft):
    ids = base.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0] \
        .outputs[0].token_ids
    cases = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[i]], min_tokens=m)
             for i, m in ((1, 0), (3, 5), (6, 0))]
    cases += [SamplingParams(temperature=0, max_tokens=20, logit_bias={ids[2]: 100.0, EOS: 50.0}),
              SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100.0}, min_tokens=5),
              SamplingParams(temperature=1.5, seed=3, n=3, max_tokens=20, structured_outputs=SO(regex="[0-9]+")),
              SamplingParams(temperature=1.0, seed=9, n=4, max_tokens=8,
                             structured_outputs=SO(choice=["ab", "abc", "abcd", "b"]))]
    for params in cases:
        assert outputs(self_draft, params) == outputs(base, params), params
    stats = self_draft.stats()
    assert stats["kv_blocks_in_use"] == 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]


# ---- faults found ------------------------------------------------------------------------------------------------

def test_draft_speculation_resumes_when_acceptance_comes_back(demo_draft):  # noqa: F811
    # disable_by_batch_size 2: a / b = 0.25, so one sequence proposes while its estimate is above 0.8
    llm = LLM(model="demo", speculative_config={"model": demo_draft, "num_speculative_tokens": 3,
                                                "disable_by_batch_size": 2})
    for i in range(20):  # greedy: the draft's argmax is rarely the target's, acceptance ~0
        llm.generate([f"abc {i} "], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    drafts = llm.stats()["spec_decode_num_drafts"]
    # temperature 20: both distributions near uniform, rejection sampling accepts most proposals (~85 % on a
    # fresh engine); the engine should try proposals again at some point in these 120 tokens
    for _ in range(4):
        llm.generate(["hello hello hello "], SamplingParams(temperature=20.0, max_tokens=30, ignore_eos=True))
    assert llm.stats()["spec_decode_num_drafts"] > drafts


def test_a_draft_shorter_than_the_target_stops_at_its_length(base, tmp_path):
    """A draft of max_position_embeddings 48 serves prompts running past it: no slot is asked for a proposal it
    cannot make, outputs are unchanged, and proposals were made while the draft still fitted."""
    torch.manual_seed(3)
    cfg = {k: v for k, v in DEMO_CONFIG.items() if k not in ("model_type", "torch_dtype")}
    config = LlamaConfig(**{**cfg, "max_position_embeddings": 48})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    demo_tokenizer().save_pretrained(tmp_path)
    llm = LLM(model="demo", speculative_config={"model": str(tmp_path), "num_speculative_tokens": 3,
                                                "disable_by_batch_size": 1000})
    steps = []
    schedule = llm.engine.scheduler.schedule
    llm.engine.scheduler.schedule = lambda lookahead=None: steps.append(dict(lookahead or {})) or schedule(lookahead)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = "hello hello hello hello "
    assert [o.outputs[0].token_ids for o in llm.generate([prompt], params)] == \
        [o.outputs[0].token_ids for o in base.generate([prompt], params)]
    n_prompt = len(base.get_tokenizer().encode(prompt))
    asked = [k for step in steps for k in step.values()]
    assert asked and llm.stats()["spec_decode_num_draft_tokens"] > 0
    assert len(asked) <= 48 - n_prompt  # from position 48 on, no proposal slots at all
    assert llm.stats()["kv_blocks_in_use"] == 0
