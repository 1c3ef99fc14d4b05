"""Speculative decoding never changes what the user gets: greedy and seeded requests give the same tokens, text,
finish reasons and logprobs with and without speculation, for the n-gram method and for a draft model (the target
itself, whose proposals are all accepted, and a model of another seed, whose proposals are mostly rejected, which is
what exercises the rollback of rejected slots). Every test ends with no KV block in use, no sequence left in the
scheduler, and proposals really verified (and some rejected, for the other-seed draft)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from checkpoints import make_config, train_tokenizer, write_checkpoint
from conveyor import LLM, SamplingParams
from conveyor.model.builtin import DEFAULT_MODEL
from conveyor.model.demo import DEMO_CONFIG, demo_tokenizer
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import StructuredOutputsParams as SO

KINDS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]
METHODS = ["ngram", "draft", "draft-other"]  # draft: the target itself; draft-other: another seed
K = 3
SPEC_KEYS = ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
# parity checkpoint prompts: the repeated code gives the n-gram method proposals from the start
CKPT_PROMPTS = ["The quick", "Paged attention stores keys and values in fixed-size blocks. The quick brown fox",
                "数字", "def f(x):\n    return x * 2\n" * 4, "Une phrase"]
# demo prompts: the random demo model mostly repeats a few letters, so n-gram proposals are often right
DEMO_PROMPTS = ["Hello world, this is", "abc abc abc abc", "The quick brown fox jumps over the lazy dog. The quick",
                "ZZZZ", "x = 1; y = 2; x = 1; y =", "Once upon a time"]


def seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, **kw})


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def other_seed_checkpoint(path: Path, kind: str) -> Path:
    """A checkpoint of kind's architecture (or a small one with the demo's vocabulary for "demo") whose weights
    come from another seed than the target's: its proposals are mostly wrong."""
    torch.manual_seed(99)
    if kind == "demo":
        cfg = {k: v for k, v in DEMO_CONFIG.items() if k not in ("model_type", "torch_dtype")}
        config = LlamaConfig(**{**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.15})
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        demo_tokenizer().save_pretrained(path)
        return path
    AutoModelForCausalLM.from_config(make_config(kind), dtype=torch.float32).save_pretrained(path)
    train_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spec_config(tmp_path_factory):
    """(method, target model) -> speculative_config; proposals at any batch size (disable_by_batch_size)."""
    drafts: dict[str, str] = {}

    def get(method: str, target: str = "demo", k: int = K) -> dict:
        common = {"num_speculative_tokens": k, "disable_by_batch_size": 1000}
        if method == "ngram":
            return {"method": "ngram", "prompt_lookup_min": 1, **common}  # 1: proposals even in random text
        if method == "draft":
            return {"model": target, **common}
        kind = "demo" if target == "demo" else Path(target).name
        if kind not in drafts:
            drafts[kind] = str(other_seed_checkpoint(tmp_path_factory.mktemp(f"{kind}-other"), kind))
        return {"model": drafts[kind], **common}

    return get


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """kind -> a parity checkpoint (directory named after its kind)."""
    paths: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in paths:
            paths[kind] = str(write_checkpoint(kind, tmp_path_factory.mktemp("t") / kind))
        return paths[kind]

    return get


def assert_same(base: list[RequestOutput], spec: list[RequestOutput]) -> None:
    """The same tokens, text and finish reasons; logprobs within 1e-3 (a verify forward batches positions
    differently)."""
    assert len(base) == len(spec)
    for b, s in zip(base, spec):
        assert len(b.outputs) == len(s.outputs), b.request_id
        for cb, cs in zip(b.outputs, s.outputs):
            assert (cs.token_ids, cs.text, cs.finish_reason) == (cb.token_ids, cb.text, cb.finish_reason), \
                (b.prompt, cb.index)
            assert cs.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-3)
            assert (cs.logprobs is None) == (cb.logprobs is None)
            for lb, ls in zip(cb.logprobs or [], cs.logprobs or []):
                assert lb.keys() == ls.keys()
                assert all(abs(lb[t] - ls[t]) <= 1e-3 for t in lb), (lb, ls)


def assert_clean(llm: LLM) -> None:
    e = llm.engine
    assert e.kv.pool.num_in_use == 0
    assert e.kv.host_pool is None or e.kv.host_pool.num_in_use == 0
    assert e.scheduler.num_unfinished == 0 and not e.requests


class Pair:
    """The same engine settings with and without speculation; run() checks that both give the same outputs, end
    clean, and that the speculative one verified proposals (and rejected some, for the other-seed draft)."""

    def __init__(self, method: str, base: LLM, spec: LLM) -> None:
        self.method, self.base, self.spec = method, base, spec

    def counts(self) -> tuple[int, int]:
        stats = self.spec.stats()
        return stats[SPEC_KEYS[0]], stats[SPEC_KEYS[1]]

    def run(self, prompts: list, params: SamplingParams | list[SamplingParams],
            chat: bool = False) -> list[RequestOutput]:
        return self.against((self.base.chat if chat else self.base.generate)(prompts, params), prompts, params, chat)

    def against(self, base: list[RequestOutput], prompts: list, params: SamplingParams | list[SamplingParams],
                chat: bool = False) -> list[RequestOutput]:
        """Check the speculative engine's outputs against base, the base engine's for the same requests."""
        drafted, accepted = self.counts()
        assert_same(base, (self.spec.chat if chat else self.spec.generate)(prompts, params))
        self.check(drafted, accepted)
        return base

    def check(self, drafted: int, accepted: int) -> None:
        assert_clean(self.base)
        assert_clean(self.spec)
        now_drafted, now_accepted = self.counts()
        assert now_drafted > drafted, "no proposal was verified"
        if self.method == "draft-other":
            assert now_accepted - accepted < now_drafted - drafted, "no proposal was rejected"
        elif self.method == "draft":
            assert now_accepted > accepted, "no proposal was accepted"


@pytest.fixture
def pair(spec_config):
    def make(method: str, model: str = "demo", k: int = K, **kw) -> Pair:
        return Pair(method, LLM(model, device="cpu", **kw),
                    LLM(model, device="cpu", speculative_config=spec_config(method, model, k), **kw))

    return make


# ---- 1. parity checkpoints and the built-in real model ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_parity_checkpoints_under_queueing_and_preemption(pair, target, kind):
    """Each architecture, each method: 40 blocks of 4 slots and 32 tokens a step make requests queue, prefill in
    chunks and get preempted (as in test_parity)."""
    for method in METHODS:
        p = pair(method, target(kind), block_size=4, num_kv_blocks=40, max_num_batched_tokens=32)
        p.run(CKPT_PROMPTS, greedy(max_tokens=20, ignore_eos=True))
        p.run(CKPT_PROMPTS, [seeded(i, max_tokens=20, ignore_eos=True) for i in range(len(CKPT_PROMPTS))])
        assert p.spec.stats()["num_preemptions"] > 0


TEXT = ("The library opens at nine in the morning and closes at six in the evening. Members may borrow up to five "
        "books at a time for three weeks. Late returns cost ten cents per day.")
GROUNDED = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{TEXT}"}]


@pytest.fixture(scope="module")
def real(spec_config):
    """method or None -> one LLM of the built-in real model per method, for the module."""
    llms: dict[str | None, LLM] = {}

    def get(method: str | None) -> LLM:
        if method not in llms:
            spec = None if method is None else spec_config(method, DEFAULT_MODEL, 4)
            llms[method] = LLM(DEFAULT_MODEL, speculative_config=spec)
        return llms[method]

    return get


def test_real_model_grounded_prompt(real):
    """The built-in SmolLM2 (Q4_1, bfloat16) asked to repeat a text: n-gram proposals come from the prompt."""
    params = [greedy(max_tokens=20), seeded(1, temperature=0.8, max_tokens=12)]
    base = real(None).chat([GROUNDED] * 2, params)
    assert "closes at six" in base[0].outputs[0].text
    for method in ("ngram", "draft"):
        p = Pair(method, real(None), real(method))
        p.against(base, [GROUNDED] * 2, params, chat=True)
        assert p.spec.stats()["spec_decode_num_accepted_tokens"] > 0
