"""Structured outputs in the engine (issue 13 item 1): JSON schema, any JSON object, regex, choice and EBNF/Lark
grammars as a token mask per sequence, with n > 1, stop strings, preemption by recompute and swap, prefix caching,
streaming through AsyncEngine, and bad constraints refused before anything is queued.

The demo model's text is random, so every constraint here bounds its output's length (maxLength, enum, bounded
ranges) or the test accepts a run cut by max_tokens only when its text is a valid prefix."""
from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest
import torch
import xgrammar as xgr

from conveyor import LLM, SamplingParams
from conveyor.engine.async_engine import AsyncEngine
from conveyor.engine.structured_output import GrammarCompiler, GrammarConfig, GrammarState, apply_grammar_masks
from conveyor.model import demo
from conveyor.model.builtin import DEFAULT_MODEL
from conveyor.sampling_params import StructuredOutputsParams as SO

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "active"],
    "additionalProperties": False,
}
WORD = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{6,10}$"},
                                         "n": {"type": "integer", "minimum": 100, "maximum": 999}},
        "required": ["word", "n"], "additionalProperties": False}


def sampled(so: SO, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 120, "structured_outputs": so, **kw})


def texts(outs) -> list[str]:
    return [c.text for o in outs for c in o.outputs]


def assert_valid_json(outs, schema: dict) -> None:
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", (c.finish_reason, c.text)
            jsonschema.validate(json.loads(c.text), schema)


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


def test_json_schema_50_sampled_completions_validate(llm):
    outs = llm.generate([f"Person {i}:" for i in range(10)], sampled(SO(json=PERSON), n=5))
    assert len(texts(outs)) == 50
    assert_valid_json(outs, PERSON)
    assert len(set(texts(outs))) > 25  # sampled, not one answer repeated
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_json_object_regex_choice_and_grammars(llm):
    choices = ["yes", "no", 'a "quoted" answer', "naïve ✓", "two\nlines"]
    cases = [
        SO(json_object=True),
        SO(regex=r"[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{1,2})?"),
        SO(choice=choices),
        SO(grammar='root ::= "(" root ")" | "x"'),  # GBNF: balanced parentheses
        SO(grammar='start: "a" start "b" | "c"'),  # Lark: a^n c b^n
    ]
    outs = llm.generate(["Answer:"] * len(cases), [sampled(so, n=6, max_tokens=150) for so in cases])
    objects, regex, choice, parens, lark = [[c for c in o.outputs] for o in outs]
    stopped = [c for c in objects if c.finish_reason == "stop"]
    assert stopped, [c.text for c in objects]
    for c in stopped:
        assert isinstance(json.loads(c.text), dict)
    compiled = llm.engine.grammars.compile(SO(json_object=True))
    for c in objects:  # a run cut by max_tokens is still a prefix of some JSON object
        assert xgr.GrammarMatcher(compiled.compiled).accept_string(c.text), c.text
    assert all(re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{1,2})?", c.text) for c in regex)
    assert all(c.text in choices for c in choice) and all(c.finish_reason == "stop" for c in choice)
    for c in parens:
        m = re.fullmatch(r"(\(*)x(\)*)", c.text)
        assert m and len(m[1]) == len(m[2]), c.text
    for c in lark:
        m = re.fullmatch(r"(a*)c(b*)", c.text)
        assert m and len(m[1]) == len(m[2]), c.text


def test_greedy_seeds_n_and_a_mixed_batch(llm):
    free = SamplingParams(temperature=1.0, max_tokens=20, seed=7)
    alone = llm.generate(["free text"], free)[0].outputs[0].token_ids
    greedy = sampled(SO(json=WORD), temperature=0.0)
    mixed = llm.generate(["free text", "w1", "w2", "w2"],
                         [free, sampled(SO(json=WORD), n=4, seed=3), greedy, greedy])
    assert mixed[0].outputs[0].token_ids == alone  # a constrained neighbour changes nothing for the others
    assert_valid_json(mixed[1:], WORD)
    assert mixed[2].outputs[0].text == mixed[3].outputs[0].text
    again = llm.generate(["w1"], sampled(SO(json=WORD), n=4, seed=3))[0]
    assert [c.text for c in again.outputs] == [c.text for c in mixed[1].outputs]  # seeds repeat with a grammar
    assert len({c.text for c in again.outputs}) > 1  # each sample has its own grammar state


def test_stop_strings_min_tokens_and_ignore_eos(llm):
    outs = llm.generate(["a", "b", "c"], [
        sampled(SO(regex=r"[a-z]{5} END [0-9]{3}"), stop=[" END"]),
        # after "o" the grammar allows only "k", which min_tokens bans (a stop token): the grammar wins
        sampled(SO(choice=["ok"]), min_tokens=10, stop_token_ids=[ord("k")]),
        sampled(SO(choice=["ok"]), ignore_eos=True),
    ])
    cut = outs[0].outputs[0]
    assert re.fullmatch(r"[a-z]{5}", cut.text) and cut.finish_reason == "stop"
    for o in outs[1:]:
        assert o.outputs[0].text == "ok" and o.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_grammar_state_survives_preemption(mode):
    prompts = [{"prompt_token_ids": [40 + i] * 60} for i in range(10)]
    params = sampled(SO(json=WORD), temperature=0.0, max_tokens=60)
    small = LLM(block_size=16, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode=mode,
                swap_space=0.01, watermark=0.0)
    outs = small.generate(prompts, params)
    st = small.stats()
    assert st["num_preemptions_" + mode] >= 1
    assert st["kv_blocks_in_use"] == 0 and st["num_swapped_out_blocks"] == 0
    assert_valid_json(outs, WORD)
    reference = LLM(num_kv_blocks=256).generate(prompts, params)
    assert texts(outs) == texts(reference)


def test_prefix_cache_hit_with_a_grammar(llm):
    prompt = {"prompt_token_ids": list(range(65, 65 + 48))}
    params = sampled(SO(json=WORD), seed=11)
    first = llm.generate(prompt, params)[0].outputs[0].text
    hits = llm.stats()["prefix_cache_hits"]
    second = llm.generate(prompt, params)[0].outputs[0].text
    assert llm.stats()["prefix_cache_hits"] >= hits + 32
    assert first == second
    jsonschema.validate(json.loads(second), WORD)


def test_bad_constraints_are_value_errors_and_the_engine_serves_on(llm):
    bad = [SO(regex="("), SO(json={"type": "foo"}), SO(json={"type": "integer", "minimum": 5, "maximum": 1}),
           SO(json=False), SO(grammar="root ::= undefined_rule"), SO(grammar='start: "a" ('),
           SO(regex=r"[^\x00-\U0010FFFF]")]  # compiles, but no token can start it
    for so in bad:
        with pytest.raises(ValueError, match=f"structured_outputs.{so.kind}"):
            llm.generate(["ok", "x"], [SamplingParams(), sampled(so)])
    assert not llm.engine.has_unfinished_requests() and llm.stats()["kv_blocks_in_use"] == 0
    assert_valid_json(llm.generate("still here", sampled(SO(json=WORD))), WORD)


def test_compilation_is_cached_and_bounded():
    tok = demo.demo_tokenizer()
    gc = GrammarCompiler(tok, 262, [257, 261], GrammarConfig(cache_size=2))
    a, b, c = SO(regex="a+"), SO(regex="b+"), SO(regex="c+")
    assert gc.compile(a) is gc.compile(SO(regex="a+"))  # keyed by the constraint, not the object
    gc.compile(b)
    gc.compile(c)  # evicts a, the least recently used
    n = gc.num_compiled
    gc.compile(c)
    gc.compile(a)
    assert gc.num_compiled == n + 1
    tiny = GrammarCompiler(tok, 262, [257, 261], GrammarConfig(cache_bytes=1))  # only the newest is kept
    first = tiny.compile(a)
    assert tiny.compile(a) is first
    tiny.compile(b)
    assert tiny.compile(a) is not first
    slow = GrammarCompiler(tok, 262, [257, 261], GrammarConfig(compile_timeout_s=0.005))
    slow._compiler()  # the vocabulary is read before the clock starts
    hard = SO(regex="(.{1,300}){1,300}")  # tens of ms or more on any vocabulary
    for _ in range(2):  # the second refusal is immediate: the key is remembered as too slow
        with pytest.raises(ValueError, match="too complex"):
            slow.compile(hard)


def test_mask_covers_vocabulary_padding_and_keeps_other_rows():
    tok = demo.demo_tokenizer()
    gc = GrammarCompiler(tok, 300, [257, 261])  # model logits wider than the tokenizer's 262 tokens
    state = GrammarState(gc.compile(SO(choice=["hi"])))
    logits = torch.zeros(3, 300)
    logits[:, 262:] = 50.0  # padding ids the model favours
    apply_grammar_masks(logits, [1], [state])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [ord("h")]
    assert torch.isfinite(logits[[0, 2]]).all()
    state.accept(ord("h"))
    state.accept(ord("i"))
    assert state.done
    with pytest.raises(ValueError, match="not allowed"):
        GrammarState(gc.compile(SO(choice=["hi"]))).accept(ord("x"))


def test_mask_equals_xgrammars_own_apply():
    gc = GrammarCompiler(demo.demo_tokenizer(), 262, [257, 261])
    grammar = gc.compile(SO(regex=r"[a-f]+(-[0-9]{2})?"))
    states = [GrammarState(grammar) for _ in range(3)]
    for text, s in zip(["", "ab", "abc-1"], states):
        for ch in text:
            s.accept(ord(ch))
    logits = torch.randn(5, 262)
    expected = logits.clone()
    apply_grammar_masks(logits, [0, 2, 4], states)
    bitmask = xgr.allocate_token_bitmask(5, 262)
    for row, s in zip([0, 2, 4], states):
        s.matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(expected, bitmask, indices=[0, 2, 4])
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[4]).nonzero().flatten().tolist() == list(range(ord("0"), ord("9") + 1))


def test_streaming_through_async_engine_compiles_off_the_engine_thread(llm):
    compiled_on: list[str] = []
    grammars = llm.engine.grammars
    real_compile = grammars._compile

    def spy(so):
        compiled_on.append(threading.current_thread().name)
        return real_compile(so)

    schema = {**WORD, "properties": {**WORD["properties"], "k": {"enum": ["stream"]}}, "required": ["word", "n", "k"]}

    async def main() -> tuple[str, str]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        submitters: list[str] = []
        real_submit = grammars._pool.submit
        grammars._pool.submit = lambda *a: (submitters.append(threading.current_thread().name), real_submit(*a))[1]
        try:
            deltas, final = [], None
            async for out in engine.generate("s1", "stream:", sampled(SO(json=schema), stop=["\n"])):
                deltas.append(out.outputs[0].new_text)
                final = out.outputs[0].text
            assert submitters and "conveyor-engine" not in submitters
            return "".join(deltas), final
        finally:
            grammars._pool.submit = real_submit
            engine.shutdown()

    grammars._compile = spy
    try:
        streamed, final = asyncio.run(main())
    finally:
        grammars._compile = real_compile
    assert compiled_on and all(n.startswith("conveyor-grammar") for n in compiled_on)
    assert streamed == final
    jsonschema.validate(json.loads(final), schema)


@pytest.fixture(scope="module")
def real_llm():
    return LLM(DEFAULT_MODEL)


def test_real_model_json_schema_50_sampled_completions_validate(real_llm):
    schema = {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima", "Cairo"]},
        "country": {"type": "string", "minLength": 2, "maxLength": 16},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 40}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
    tok = real_llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a big city as JSON with its country and "
                                       "population in millions."}], add_generation_prompt=True, tokenize=False)
    outs = real_llm.generate(prompt, sampled(SO(json=schema), n=50, max_tokens=48))
    assert_valid_json(outs, schema)
    assert len(set(texts(outs))) > 5
