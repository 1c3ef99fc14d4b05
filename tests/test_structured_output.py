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
import time

import jsonschema
import pytest
import torch
import xgrammar as xgr

from conveyor import LLM, SamplingParams
from conveyor.engine.async_engine import AsyncEngine, EngineOverloaded
from conveyor.engine.structured_output import (CompileBusy, GrammarCompiler, GrammarConfig, GrammarState,
                                               apply_grammar_masks)
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
        pool = grammars._small.pool
        real_submit = pool.submit
        pool.submit = lambda *a: (submitters.append(threading.current_thread().name), real_submit(*a))[1]
        try:
            deltas, final = [], None
            async for out in engine.generate("s1", "stream:", sampled(SO(json=schema), stop=["\n"])):
                deltas.append(out.outputs[0].new_text)
                final = out.outputs[0].text
            assert submitters and "conveyor-engine" not in submitters
            return "".join(deltas), final
        finally:
            pool.submit = real_submit
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


# ---- compile pool: deadlines from the start, overload, cancellation, no starvation (issue 13, tester's item 1) ---

def slow_grammar(tag: int, rules: int = 2000) -> SO:
    """A large GBNF grammar (~50 kB) that takes about a second or more to compile on the demo vocabulary."""
    return SO(grammar="\n".join(f'r{i} ::= r{i + 1} "a" | "b{tag}"' for i in range(rules)) + f'\nr{rules} ::= "c"'
              + "\nroot ::= r0")


def quietly(fn, *args) -> None:
    """fn(*args) in a helper thread, whose ValueError (a too-slow compile) the test does not need."""
    try:
        fn(*args)
    except ValueError:
        pass


def wait_until(cond) -> None:
    deadline = time.monotonic() + 120  # a hang fails instead
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def compiler(**kw) -> GrammarCompiler:
    gc = GrammarCompiler(demo.demo_tokenizer(), 262, [257, 261], GrammarConfig(**kw))
    gc._compiler()  # the vocabulary is read before any clock starts
    return gc


def test_small_constraints_are_not_starved_and_a_full_queue_is_busy_not_bad():
    gc = compiler(compile_threads=1, compile_queue_size=1)
    results: dict[int, object] = {}

    def run(tag: int) -> None:
        try:
            results[tag] = gc.compile(slow_grammar(tag))
        except Exception as e:  # noqa: BLE001 - recorded for the asserts below
            results[tag] = e

    threads = [threading.Thread(target=run, args=(tag,)) for tag in (1, 2)]
    for i, t in enumerate(threads):  # one compiling, then one queued
        t.start()
        wait_until(lambda: len(gc._pending) == i + 1 and gc._large.queued == i)
    with pytest.raises(CompileBusy, match="busy"):  # one compiling, one queued: the lane is full
        gc.compile(slow_grammar(3))
    small = gc.compile(SO(regex="[0-9]+x"))  # its own lane: done while the slow ones are still compiling
    assert small is not None and len(gc._pending) == 2
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert gc._small.queued == gc._large.queued == 0


def test_deadline_counts_from_the_start_and_a_late_compile_is_cached_not_refused_for_good():
    gc = compiler(compile_timeout_s=0.05, compile_threads=1)
    hard = slow_grammar(4)
    with pytest.raises(ValueError, match="too complex"):
        gc.compile(hard)
    job = gc._pending[hard.key()]
    with pytest.raises(ValueError, match="too complex"):  # refused at once while its compilation still runs
        gc.compile(hard)
    job.future.result()  # it runs to its end
    n = gc.num_compiled
    assert gc.compile(hard) is job.future.result() and gc.num_compiled == n  # served from the cache
    # a queued compilation's wait is not its compile time: behind a slow one, a quick one is not "too complex"
    gc = compiler(compile_timeout_s=0.5, compile_threads=1, small_constraint_chars=1)  # one lane for all
    first = threading.Thread(target=quietly, args=(gc.compile, slow_grammar(5)))
    first.start()
    wait_until(lambda: len(gc._pending) == 1)
    assert gc.compile(SO(regex="[0-9]+x")) is not None
    first.join()


def test_a_queued_compile_is_busy_after_its_wait_and_dropped_when_nobody_waits():
    gc = compiler(compile_threads=1, small_constraint_chars=1, compile_queue_timeout_s=0.05)
    blocker = threading.Thread(target=quietly, args=(gc.compile, slow_grammar(6)))
    blocker.start()
    wait_until(lambda: gc._pending and next(iter(gc._pending.values())).started.done())
    with pytest.raises(CompileBusy):
        gc.compile(SO(regex="[a-z]+"))
    assert SO(regex="[a-z]+").key() not in gc._pending and gc._large.queued == 0  # cancelled before it started

    async def leave_early() -> None:
        task = asyncio.ensure_future(gc.compile_async(SO(regex="[b-z]+")))
        await asyncio.sleep(0.01)
        assert SO(regex="[b-z]+").key() in gc._pending
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_early())
    assert SO(regex="[b-z]+").key() not in gc._pending and gc._large.queued == 0
    n = gc.num_compiled
    blocker.join()
    assert gc.num_compiled == n + 1  # only the blocker ran


def test_a_busy_compiler_is_engine_overloaded(llm):
    real = llm.engine.grammars
    llm.engine.grammars = compiler(compile_threads=1, compile_queue_size=1, compile_queue_timeout_s=60)

    async def main() -> None:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            async def consume(rid: str, so: SO) -> None:
                async for _ in engine.generate(rid, "x", SamplingParams(max_tokens=2, structured_outputs=so)):
                    pass
            gc = llm.engine.grammars
            slow = []
            for i in range(2):  # one compiling, then one queued
                slow.append(asyncio.ensure_future(consume(f"s{i}", slow_grammar(10 + i))))
                while not (len(gc._pending) == i + 1 and gc._large.queued == i):
                    await asyncio.sleep(0.01)
            with pytest.raises(EngineOverloaded, match="busy"):
                await consume("third", slow_grammar(12))
            await consume("small", SO(regex="[0-9]+x"))
            await asyncio.gather(*slow)
        finally:
            engine.shutdown()

    try:
        asyncio.run(main())
    finally:
        llm.engine.grammars = real
    assert not llm.engine.has_unfinished_requests()


# ---- JSON-schema keywords that xgrammar would ignore are refused (issue 13, tester's item 2) ----------------------

REFUSED = [
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "allOf", "#"),
    ({"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 1}}}}, "not", "#/properties/a"),
    ({"$ref": "http://example.com/s.json"}, "$ref", "#"),
    ({"$defs": {"i": {"$anchor": "i", "type": "integer"}}, "$ref": "#i"}, "$ref", "#"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 6}}, "if", "#"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "#"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas", "#"),
    ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies", "#"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, "contains", "#"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "#"),
    ({"type": "array", "items": [{"type": "integer"}], "additionalItems": False}, "additionalItems", "#"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf", "#"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf", "#"),
    ({"type": "integer", "multipleOf": 3, "maximum": 9}, "multipleOf", "#"),
    ({"type": "string", "pattern": "a+", "maxLength": 2}, "maxLength", "#"),
    ({"type": "string", "format": "email", "minLength": 5}, "minLength", "#"),
    ({"type": "integer", "maximum": 5, "anyOf": [{"minimum": 3}, {"minimum": 4}]}, "maximum", "#"),
    ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "maximum": 3}, "maximum", "#"),
    ({"type": "string", "enum": ["a", 1]}, "type", "#"),
    ({"enum": ["a", "abc"], "minLength": 2}, "minLength", "#"),
    ({"type": "array", "items": {"maximum": 3}}, "maximum", "#/items"),
    ({"required": ["a"]}, "required", "#"),
    ({"$defs": {"n": {"$id": "urn:n", "type": "integer"}}}, "$id", "#/$defs/n"),
    ({"$dynamicAnchor": "n", "type": "object", "properties": {"c": {"$dynamicRef": "#n"}}}, "$dynamicAnchor", "#"),
    ({"type": "object", "properties": {"a/b": {"type": "string", "if": True}}}, "if", "#/properties/a~1b"),
]
ACCEPTED = [
    {"allOf": [{"type": "integer", "minimum": 1}], "title": "one member", "description": "d", "default": 1},
    {"anyOf": [{"$ref": "#/$defs/i"}, {"type": "null"}], "$defs": {"i": {"type": "integer", "maximum": 3}}},
    {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
               {"type": "object", "properties": {"k": {"const": "b"}, "v": {"type": "integer"}}, "required": ["k"]}]},
    {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:root", "$comment": "c",
     "type": "object", "properties": {"d": {"type": "string", "format": "date", "examples": ["2020-01-01"]},
                                      "n": {"type": ["integer", "null"], "multipleOf": 3, "deprecated": True},
                                      "t": {"type": "array", "prefixItems": [{"type": "boolean"}], "items": False,
                                            "uniqueItems": False}},
     "required": ["d", "n", "t"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-c]{1,4}$", "readOnly": True},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "exclusiveMaximum": 5}, "minItems": 1,
     "maxItems": 3},
    {"type": "string", "enum": ["x", "yy"]},
]


@pytest.mark.parametrize("schema,keyword,path", REFUSED, ids=[f"{k}@{p}" for _, k, p in REFUSED])
def test_unenforced_json_schema_keywords_are_refused_with_their_path(schema, keyword, path):
    gc = GrammarCompiler(demo.demo_tokenizer(), 262, [257, 261])
    with pytest.raises(ValueError, match=f"structured_outputs.json: the keyword {re.escape(repr(keyword))} at "
                                         f"{re.escape(path)} is not supported"):
        gc.compile(SO(json=schema))
    assert gc.num_compiled == 0  # refused before anything compiled


def test_enforced_json_schema_keywords_are_accepted_and_generated_output_is_valid(llm):
    for schema in ACCEPTED:
        params = sampled(SO(json=schema), n=4, max_tokens=60)
        for o in llm.generate("json:", params):
            for c in o.outputs:
                if c.finish_reason == "stop":
                    jsonschema.validate(json.loads(c.text), schema)
    with pytest.raises(ValueError, match="the keyword 'allOf' at #"):
        llm.generate("x", sampled(SO(json=REFUSED[0][0])))
    deep: dict = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="structured_outputs.json is not valid: RecursionError"):
        SO(json=deep)
    assert not llm.engine.has_unfinished_requests()
