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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

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


def other_seed_checkpoint(path: Path, target: str) -> Path:
    """A draft for target (a Hugging Face checkpoint directory, or "demo") whose weights come from another seed:
    target's configuration and tokenizer, or for the demo a smaller model with its vocabulary. Its proposals are
    mostly wrong."""
    torch.manual_seed(99)
    if target == "demo":
        cfg = {k: v for k, v in DEMO_CONFIG.items() if k not in ("model_type", "torch_dtype")}
        config = LlamaConfig(**{**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.15})
        tokenizer = demo_tokenizer()
    else:
        config, tokenizer = AutoConfig.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spec_config(tmp_path_factory):
    """(method, target model, k) -> speculative_config; proposals at any batch size (disable_by_batch_size)."""
    drafts: dict[str, str] = {}

    def get(method: str, target: str = "demo", k: int = K) -> dict:
        common = {"num_speculative_tokens": k, "disable_by_batch_size": 1000}
        if method == "ngram":
            return {"method": "ngram", "prompt_lookup_min": 1, **common}  # 1: proposals even in random text
        if method == "draft":
            return {"model": target, **common}
        if target not in drafts:
            drafts[target] = str(other_seed_checkpoint(tmp_path_factory.mktemp("draft"), target))
        return {"model": drafts[target], **common}

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
        stats = self.spec.stats()
        per_pos = stats["spec_decode_num_accepted_tokens_per_pos"]
        assert len(per_pos) == self.spec.engine.config.speculative.num_speculative_tokens
        assert sum(per_pos) == now_accepted and per_pos == sorted(per_pos, reverse=True)
        assert stats["spec_decode_num_drafts"] <= now_drafted
        assert stats["spec_decode_acceptance_rate"] == pytest.approx(now_accepted / now_drafted)
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
def test_parity_checkpoints_under_queueing_and_preemption(pair, checkpoint, kind):
    """Each architecture, each method: 40 blocks of 4 slots and 32 tokens a step make requests queue, prefill in
    chunks and get preempted (as in test_parity)."""
    for method in METHODS:
        p = pair(method, checkpoint(kind), block_size=4, num_kv_blocks=40, max_num_batched_tokens=32)
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
            if spec is not None and "model" in spec:
                spec["quantization"] = "none"  # the draft dequantized like the target
            # 2 slots and 9 blocks of 16: four requests queue and running ones are preempted. float32: in bfloat16
            # a recompute after preemption or another batch shape rounds differently, which flips near-ties with
            # or without speculation (bench/README.md, speculative decoding)
            llms[method] = LLM(DEFAULT_MODEL, speculative_config=spec, max_num_seqs=2, num_kv_blocks=9,
                               dtype="float32", quantization="none")
        return llms[method]

    return get


def test_real_model_grounded_prompt(real):
    """The built-in SmolLM2 (dequantized to float32) asked to repeat a text: n-gram proposals come from the prompt. Four
    conversations sharing the instruction and the text (prefix-cache hits) queue for 2 slots and get preempted."""
    convs = [GROUNDED] + [[{"role": "user", "content": f"{GROUNDED[0]['content']}\n\n({i})"}] for i in range(3)]
    params = [greedy(max_tokens=40, ignore_eos=True), seeded(1, temperature=0.8, max_tokens=40, ignore_eos=True),
              greedy(max_tokens=24), seeded(2, temperature=0.8, max_tokens=16)]
    base = real(None).chat(convs, params)
    assert "six in the evening" in base[0].outputs[0].text
    for method in ("ngram", "draft"):
        p = Pair(method, real(None), real(method))
        p.against(base, convs, params, chat=True)
        stats = p.spec.stats()
        assert stats["spec_decode_num_accepted_tokens"] > 0
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats


# ---- 2. scheduling ------------------------------------------------------------------------------------------------
def mixed(n: int, max_tokens: int | None = 24, **kw) -> list[SamplingParams]:
    """Greedy and seeded requests in turn, with lengths that end at different points of a proposal run (None: up
    to max_model_len)."""
    lengths = [None if max_tokens is None else max_tokens + i % 4 for i in range(n)]
    return [greedy(max_tokens=m, **kw) if i % 2 == 0 else seeded(i, max_tokens=m, **kw)
            for i, m in enumerate(lengths)]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("method", METHODS)
def test_queueing_and_preemption(pair, method, mode):
    """12 requests for 4 slots and 32 blocks of 4: they queue, and running ones are preempted by mode."""
    kw = {"swap_space": 0.01} if mode == "swap" else {}
    p = pair(method, max_num_seqs=4, block_size=4, num_kv_blocks=32, max_num_batched_tokens=64,
             preemption_mode=mode, **kw)
    p.run(DEMO_PROMPTS * 2, mixed(12, ignore_eos=True))
    assert p.spec.stats()[f"num_preemptions_{mode}"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_prefix_caching(pair, method):
    """Requests sharing a long prefix, then requests whose prompt is an earlier prompt plus its output: they reuse
    blocks that the verification of accepted proposals filled (wrong hashes there would change the outputs)."""
    p = pair(method, block_size=4, num_kv_blocks=256)
    prefix = "The quick brown fox jumps over the lazy dog. " * 2
    prompts = [prefix + s for s in ("One", "Two", "Three", "Four")]
    first = p.run(prompts[:2], greedy(max_tokens=30, ignore_eos=True))
    hits = p.spec.stats()["prefix_cache_hits"]
    p.run(prompts[2:], mixed(2, ignore_eos=True))
    assert p.spec.stats()["prefix_cache_hits"] > hits
    hits = p.spec.stats()["prefix_cache_hits"]
    grown = [o.prompt_token_ids + o.outputs[0].token_ids for o in first]
    p.run(grown, mixed(2, ignore_eos=True))
    assert p.spec.stats()["prefix_cache_hits"] - hits >= sum(len(g) // 4 - 1 for g in grown) * 4


@pytest.mark.parametrize("method", METHODS)
def test_n_and_best_of(pair, method):
    p = pair(method, block_size=4, num_kv_blocks=256)
    outs = p.run(DEMO_PROMPTS[:3], [seeded(7, n=3, max_tokens=20), seeded(8, n=2, best_of=4, max_tokens=20),
                                    seeded(9, n=2, max_tokens=20, temperature=2.0)])
    assert [len(o.outputs) for o in outs] == [3, 2, 2]


def drive(llm: LLM, arrivals: dict[int, list[tuple[str, object, SamplingParams]]],
          aborts: dict[int, list[str]] | None = None) -> tuple[dict[str, RequestOutput], list, dict]:
    """Step the engine, adding requests and aborting others at the given step numbers. Returns the final outputs
    by request id, every step's scheduled sequences (as they were after the step), and per (request id, sample)
    the text and token count of all its step outputs' deltas joined, as a stream would send them."""
    engine, aborts = llm.engine, aborts or {}
    done: dict[str, RequestOutput] = {}
    steps: list = []
    streamed: dict[tuple[str, int], tuple[str, int]] = {}
    schedule = engine.scheduler.schedule

    def recording(lookahead=None):
        out = schedule(lookahead)
        steps.append(out.scheduled)
        return out

    engine.scheduler.schedule = recording
    try:
        step = 0
        while engine.has_unfinished_requests() or step <= max(arrivals):
            for rid, prompt, params in arrivals.get(step, []):
                engine.add_request(rid, prompt, params)
            for rid in aborts.get(step, []):
                assert rid in engine.requests, f"{rid} already finished: abort it earlier"
                done[rid] = engine.abort_request(rid)
            for out in engine.step():
                for c in out.outputs:
                    text, n = streamed.get((out.request_id, c.index), ("", 0))
                    streamed[out.request_id, c.index] = (text + c.new_text, n + c.num_new_tokens)
                if out.finished:
                    done[out.request_id] = out
            step += 1
    finally:
        engine.scheduler.schedule = schedule
    return done, steps, streamed


def drive_both(p: Pair, arrivals: dict, aborts: dict | None = None) -> list:
    """drive() both engines: the same outputs for every request not aborted, streamed deltas that add up to them;
    returns the speculative engine's steps."""
    drafted, accepted = p.counts()
    base, _, _ = drive(p.base, arrivals, aborts)
    spec, steps, streamed = drive(p.spec, arrivals, aborts)
    aborted = {rid for rids in (aborts or {}).values() for rid in rids}
    assert base.keys() == spec.keys()
    for rid in aborted:
        assert spec[rid].finished and all(c.finish_reason == "abort" for c in spec[rid].outputs)
    kept = sorted(base.keys() - aborted)
    assert_same([base[r] for r in kept], [spec[r] for r in kept])
    for r in kept:
        for c in spec[r].outputs:
            assert streamed[r, c.index] == (c.text, len(c.token_ids))
    p.check(drafted, accepted)
    return steps


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_of_arrivals_and_priorities(pair, method):
    """Long prompts arrive while others decode: their prefill is chunked (long_prefill_token_threshold) into
    steps that also verify proposals; under the priority policy the later, more urgent ones go first."""
    p = pair(method, max_num_seqs=4, block_size=4, num_kv_blocks=48, max_num_batched_tokens=24,
             long_prefill_token_threshold=8, scheduling_policy="priority")
    long = "The quick brown fox jumps over the lazy dog, again and again. "
    arrivals = {0: [(f"low{i}", DEMO_PROMPTS[i], p_) for i, p_ in enumerate(mixed(3, priority=5))],
                3: [(f"high{i}", long + DEMO_PROMPTS[i], p_) for i, p_ in enumerate(mixed(3, 16, priority=0))],
                6: [(f"mid{i}", long * 2, p_) for i, p_ in enumerate(mixed(2, 12, priority=2))]}
    steps = drive_both(p, arrivals)
    assert any(any(s.spec_token_ids for s in step) and any(s.num_tokens > 1 for s in step) for step in steps)


# ---- 2. what a request asks for -------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 999},
                                           "c": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "c"], "additionalProperties": False}
REGEX = r"[a-c]{2,6}-[0-9]{3}"
CHOICES = ["ZZZ apples", "ZZZ pears", "bananas"]  # the demo model likes Z: a proposal run fits the first two


@pytest.mark.parametrize("method", METHODS)
def test_structured_outputs(pair, method):
    """A proposal the grammar forbids is never emitted: outputs are valid and identical."""
    p = pair(method)
    constraints = [SO(json=SCHEMA), SO(regex=REGEX), SO(choice=CHOICES)]
    params = [f(**{"max_tokens": 60, "structured_outputs": so}) for so in constraints
              for f in (greedy, lambda **kw: seeded(3, **kw))]
    outs = p.run(["Answer: ZZZZ"] * len(params), params)
    texts = [o.outputs[0] for o in outs]
    for c in texts:
        assert c.finish_reason == "stop", c.text
    for c in texts[:2]:
        obj = json.loads(c.text)
        assert obj.keys() == {"ok", "n", "c"}
    assert all(re.fullmatch(REGEX, c.text) for c in texts[2:4])
    assert all(c.text in CHOICES for c in texts[4:])


def test_ngram_proposing_eos_after_a_complete_choice(pair):
    """The n-gram method proposes what followed "Q:" earlier: the answer and then EOS (id 257), which ends the
    grammar; the target must sample that EOS itself (a verify row after it would have no grammar mask)."""
    p = pair("ngram")
    prompt = list(b"Q:yes") + [257] + list(b"Q:no") + [257] + list(b"Q:")
    outs = p.run([prompt], greedy(max_tokens=10, structured_outputs=SO(choice=["yes", "no"])))
    assert outs[0].outputs[0].finish_reason == "stop"


def first_unique(seq, start: int, width: int):
    """The first index i >= start where seq[i:i + width] does not occur before i (a stop that ends the output
    there and not earlier), or None."""
    for i in range(start, len(seq) - width + 1):
        piece = seq[i:i + width]
        if not any(seq[j:j + width] == piece for j in range(i)):
            return i
    return None


@pytest.mark.parametrize("method", METHODS)
def test_stops_inside_an_accepted_run(pair, method):
    """Stop strings (with and without include_stop_str_in_output), stop_token_ids, max_tokens, EOS and min_tokens
    end the output where the engine without speculation ends it: the same text, finish reason and token count."""
    p = pair(method)
    prompts = DEMO_PROMPTS[:4]
    free = p.base.generate(prompts, [seeded(i, max_tokens=30, ignore_eos=True) for i in range(4)])
    cases: list[tuple[str, SamplingParams]] = []
    for i, o in enumerate(free):
        text, ids = o.outputs[0].text, o.outputs[0].token_ids
        at = first_unique(text, 6, 2)
        if at is not None:
            stop = text[at:at + 2]
            cases.append((prompts[i], seeded(i, max_tokens=30, ignore_eos=True, stop=[stop])))
            cases.append((prompts[i], seeded(i, max_tokens=30, ignore_eos=True, stop=["\x00never", stop],
                                                include_stop_str_in_output=True)))
        at = first_unique(ids, 5, 1)
        if at is not None:
            cases.append((prompts[i], seeded(i, max_tokens=30, ignore_eos=True, stop_token_ids=[ids[at]])))
        cases.append((prompts[i], seeded(i, max_tokens=4 + i, ignore_eos=True)))
        cases.append((prompts[i], greedy(max_tokens=5 + i, ignore_eos=True)))
    # at temperature 2 these seeds end the demo model's output with EOS after 13, 15, 3 and 3 tokens
    cases += [("Hello world, this is", seeded(s, temperature=2.0, max_tokens=40, min_tokens=m))
              for s in (1, 7, 8, 18) for m in (0, 6)]
    outs = p.run([c[0] for c in cases], [c[1] for c in cases])
    stopped = [(sp, o.outputs[0]) for (_, sp), o in zip(cases, outs) if o.outputs[0].finish_reason == "stop"]
    assert sum(1 for sp, _ in stopped if sp.stop) >= 4
    assert sum(1 for sp, _ in stopped if sp.stop_token_ids) >= 2
    eos = [c for sp, c in stopped if not sp.stop and not sp.stop_token_ids]
    assert len(eos) >= 2 and all(c.token_ids[-1] in DEMO_CONFIG["eos_token_id"] for c in eos)
    assert any(len(c.token_ids) < 6 for c in eos)  # ... and min_tokens changes those
    for sp, c in stopped:
        if sp.include_stop_str_in_output:
            assert any(c.text.endswith(s) for s in sp.stop)


@pytest.mark.parametrize("method", METHODS)
def test_max_model_len_inside_a_run(pair, method):
    """Requests that run up to max_model_len (max_tokens None) end at the same token."""
    p = pair(method, max_model_len=64, block_size=4, num_kv_blocks=64)
    outs = p.run(DEMO_PROMPTS[:4], mixed(4, None, ignore_eos=True))
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 64 for o in outs)


@pytest.mark.parametrize("method", METHODS)
def test_logprobs_penalties_and_logit_bias(pair, method):
    p = pair(method)
    params = [greedy(max_tokens=20, logprobs=3), seeded(1, max_tokens=20, logprobs=2),
              seeded(2, max_tokens=20, presence_penalty=0.5, frequency_penalty=0.3),
              greedy(max_tokens=20, repetition_penalty=1.3, logprobs=1),
              seeded(3, max_tokens=20, logit_bias={90: -100, 65: 5.0}),
              greedy(max_tokens=20, logit_bias={90: 3.0}, logprobs=1),
              seeded(4, max_tokens=20, top_k=5, top_p=0.9, min_p=0.05, logprobs=2, prompt_logprobs=2)]
    outs = p.run((DEMO_PROMPTS * 2)[:len(params)], params)
    assert all(len(c.logprobs) == 20 for o in (outs[0], outs[1], outs[3]) for c in o.outputs)
    assert len(outs[-1].prompt_logprobs) == len(outs[-1].prompt_token_ids)
    assert 90 not in outs[4].outputs[0].token_ids


# ---- 3. abort -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_abort_between_steps(pair, method):
    """Aborting running, waiting and n > 1 requests mid-run frees their blocks and changes nothing for the rest."""
    p = pair(method, max_num_seqs=4, block_size=4, num_kv_blocks=40, max_num_batched_tokens=32,
             preemption_mode="swap", swap_space=0.01)
    params = mixed(6, 30, ignore_eos=True)
    arrivals = {0: [(f"r{i}", DEMO_PROMPTS[i], sp) for i, sp in enumerate(params)],
                2: [("n3", "abc abc", seeded(5, n=3, max_tokens=30, ignore_eos=True))]}
    drive_both(p, arrivals, aborts={3: ["r0", "r5"], 6: ["n3", "r2"]})


# ---- beam search and errors ---------------------------------------------------------------------------------------
def test_beam_search_does_not_speculate(pair):
    p = pair("ngram")
    beam = SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=12, ignore_eos=True)
    drafted, _ = p.counts()
    assert_same(p.base.generate(DEMO_PROMPTS[:2], beam), p.spec.generate(DEMO_PROMPTS[:2], beam))
    assert p.counts()[0] == drafted
    assert_clean(p.spec)


def test_a_draft_with_another_vocabulary_is_a_value_error(checkpoint):
    with pytest.raises(ValueError, match="vocabulary"):
        LLM("demo", device="cpu", speculative_config={"model": checkpoint("llama"), "num_speculative_tokens": 2})


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_the_contiguous_kv_layout_is_a_value_error(spec_config, method):
    with pytest.raises(ValueError, match="paged"):
        LLM("demo", device="cpu", kv_layout="contiguous", speculative_config=spec_config(method))
