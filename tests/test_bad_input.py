"""Bad requests are rejected with a clear ValueError, and the engine keeps serving the good ones afterwards."""
from __future__ import annotations

import math

import pytest

from conveyor.llm import LLM
from conveyor.sampling_params import SamplingParams as SP

MAX_LEN = 64
BLOCK = 4
NUM_BLOCKS = 8  # 32 token slots: less than max_model_len, so a request can fit the model but not the cache
VOCAB = 262


@pytest.fixture(scope="module")
def llm():
    return LLM(model="demo", block_size=BLOCK, num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_LEN, device="cpu")


def assert_idle(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not llm.engine.requests
    assert sum(llm.engine.kv.pool.ref_counts) == 0


def run_until_done(llm: LLM, max_steps: int = 500) -> dict:
    eng, done = llm.engine, {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return done
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("requests did not finish")


# ---- SamplingParams -------------------------------------------------------------------------------------------------
BAD_PARAMS = [
    dict(temperature=-1.0), dict(temperature=1000.0), dict(temperature=float("nan")),
    dict(top_p=0.0), dict(top_p=-0.5), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(top_k=-2), dict(top_k=2.5),
    dict(min_p=-0.1), dict(min_p=1.5),
    dict(n=0), dict(n=-1), dict(n=1.5), dict(n=100000),
    dict(max_tokens=0), dict(max_tokens=-5), dict(max_tokens=2.5),
    dict(min_tokens=-1), dict(min_tokens=10, max_tokens=5),
    dict(logprobs=1000), dict(logprobs=-1),
    dict(presence_penalty=5.0), dict(frequency_penalty=-3.0), dict(presence_penalty=float("nan")),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(repetition_penalty=100.0),
    dict(stop=""), dict(stop=["ok", ""]), dict(stop=[3]), dict(stop=[f"s{i}" for i in range(17)]),
    dict(stop_token_ids=[-1]), dict(stop_token_ids=[1.5]),
    dict(seed="abc"), dict(seed=1.5),
    dict(priority=None), dict(priority="high"), dict(priority=1.5),
    # issue 11: absurd numbers and text the engine would only trip over inside a step
    dict(use_beam_search=True, beam_width=2, length_penalty=1e300), dict(length_penalty=float("inf")),
    dict(length_penalty=float("nan")), dict(length_penalty=-11.0), dict(temperature=float("inf")),
    dict(top_p=float("-inf")), dict(min_p=float("nan")), dict(repetition_penalty=float("inf")),
    dict(frequency_penalty=1e300), dict(presence_penalty=-1e300),
    dict(seed=1 << 64), dict(seed=-(1 << 63) - 1), dict(priority=10 ** 30), dict(priority=-(10 ** 30)),
    dict(top_k=1 << 63), dict(max_tokens=10 ** 30), dict(min_tokens=10 ** 30), dict(logprobs=10 ** 30),
    dict(n=10 ** 30), dict(use_beam_search=True, beam_width=10 ** 30), dict(beam_width=1 << 63),
    dict(beam_width="4"), dict(stop_token_ids=[1 << 63]), dict(stop_token_ids=[True]),
    dict(stop_token_ids=list(range(1025))), dict(stop_token_ids=5), dict(stop=5), dict(stop={"a": 1}),
    dict(stop="\ud800"), dict(stop=["ok", "a\udfffb"]), dict(ignore_eos="yes"), dict(skip_special_tokens=None),
    dict(use_beam_search=1), dict(early_stopping="always"),
]


@pytest.mark.parametrize("kw", BAD_PARAMS, ids=[repr(k)[:40] for k in BAD_PARAMS])
def test_bad_sampling_params_raise_value_error(kw):
    with pytest.raises(ValueError):
        SP(**kw)


def test_edge_sampling_params_are_accepted():
    assert SP(top_k=-1).top_k == 0
    assert SP(temperature=0.0).greedy
    assert SP(stop="x").stop_list == ["x"]
    assert SP(stop_token_ids=None).stop_token_ids == []
    SP(n=128, top_p=1e-9, min_p=1.0, logprobs=20, max_tokens=None, min_tokens=0, repetition_penalty=10.0,
       presence_penalty=-2.0, frequency_penalty=2.0, temperature=100.0, seed=0)


# ---- engine-level rejections ----------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("empty string", "", SP(max_tokens=4), "empty"),
    ("empty token list", [], SP(max_tokens=4), "empty"),
    ("empty dict prompt", {"prompt_token_ids": []}, SP(max_tokens=4), "empty"),
    ("dict with both prompt and ids", {"prompt": "hi", "prompt_token_ids": [1]}, SP(max_tokens=4), "exactly one"),
    ("dict with an unknown key", {"text": "hi"}, SP(max_tokens=4), "unknown keys"),
    ("token id = vocab size", [1, 2, VOCAB], SP(max_tokens=4), "vocabulary"),
    ("huge token id", [10 ** 12], SP(max_tokens=4), "vocabulary"),
    ("negative token id", [5, -1], SP(max_tokens=4), "vocabulary"),
    ("bool token id", [5, True], SP(max_tokens=4), "vocabulary"),
    ("float token id", [5, 1.0], SP(max_tokens=4), "vocabulary"),
    ("str token id", [5, "a"], SP(max_tokens=4), "vocabulary"),
    ("not a prompt", 42, SP(max_tokens=4), "prompt"),
    ("None prompt", None, SP(max_tokens=4), "prompt"),
    ("lone surrogate in the prompt", "hi \ud800 there", SP(max_tokens=4), "UTF-8"),
    ("lone low surrogate alone", "\udc80", SP(max_tokens=4), "UTF-8"),
    ("dict with non-list ids", {"prompt_token_ids": 5}, SP(max_tokens=4), "prompt_token_ids"),
    ("dict with string ids", {"prompt_token_ids": "abc"}, SP(max_tokens=4), "prompt_token_ids"),
    ("params not SamplingParams", "hello", {"max_tokens": 4}, "SamplingParams"),
    ("prompt longer than max_model_len", "x" * (MAX_LEN + 10), SP(max_tokens=4), "maximum length"),
    ("prompt exactly max_model_len", [1] * MAX_LEN, SP(max_tokens=1), "maximum length"),
    ("prompt fills max_model_len, default max_tokens", [1] * MAX_LEN, SP(max_tokens=None), "no room"),
    ("prompt + max_tokens over max_model_len", [1] * 40, SP(max_tokens=30), "maximum length"),
    ("bigger than the whole KV cache", [1] * 20, SP(max_tokens=20), "KV blocks"),
    ("default max_tokens bigger than the cache", "hello", SP(max_tokens=None), "KV blocks"),
]


@pytest.mark.parametrize("prompt,params,match", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_rejected_request_leaves_the_engine_serving(llm, prompt, params, match):
    eng = llm.engine
    eng.add_request("good-before", "hello", SP(temperature=0.0, max_tokens=5))
    eng.step()  # the good one is already running when the bad one comes
    with pytest.raises(ValueError, match=match):
        eng.add_request("bad", prompt, params)
    assert "bad" not in eng.requests
    assert all(s.request_id != "bad" for s in list(eng.scheduler.waiting) + eng.scheduler.running)
    eng.add_request("good-after", [72, 105], SP(temperature=0.0, max_tokens=6))
    eng.add_request("bad", "reused id", SP(max_tokens=3))  # the rejected id was never taken
    done = run_until_done(llm)
    assert set(done) == {"good-before", "good-after", "bad"}
    assert len(done["good-before"].outputs[0].token_ids) == 5
    assert len(done["good-after"].outputs[0].token_ids) == 6
    assert all(o.outputs[0].finish_reason in ("length", "stop") for o in done.values())
    assert_idle(llm)


def test_duplicate_request_id(llm):
    eng = llm.engine
    eng.add_request("dup", "hello", SP(max_tokens=3))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", "other", SP(max_tokens=3))
    done = run_until_done(llm)
    assert done["dup"].prompt == "hello"
    assert_idle(llm)


def test_limits_are_inclusive(llm):
    eng = llm.engine
    # exactly the whole KV cache: 28 + 4 = 32 slots = 8 blocks
    eng.add_request("whole-cache", [1] * 28, SP(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.add_request("small", [2, 3], SP(temperature=0.0, max_tokens=3, ignore_eos=True))
    done = run_until_done(llm)
    assert len(done["whole-cache"].outputs[0].token_ids) == 4
    assert done["whole-cache"].outputs[0].finish_reason == "length"
    assert llm.stats()["kv_blocks_peak"] <= NUM_BLOCKS
    assert_idle(llm)
    # exactly max_model_len tokens in all (more than this cache holds: a roomier engine)
    roomy = LLM(model="demo", block_size=BLOCK, num_kv_blocks=32, max_model_len=MAX_LEN, device="cpu")
    [out] = roomy.generate([[1] * (MAX_LEN - 3)], SP(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    [out] = roomy.generate([[1] * (MAX_LEN - 3)], SP(temperature=0.0, max_tokens=None, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3  # max_tokens=None: up to max_model_len
    assert_idle(roomy)


def test_n_sequences_that_each_need_the_whole_cache(llm):
    # each sample fits the cache alone, the three together do not: they take turns (preemption) and all finish
    outs = llm.generate([[1] * 20], SP(n=3, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True))
    assert [len(c.token_ids) for c in outs[0].outputs] == [12, 12, 12]
    assert_idle(llm)


def test_extreme_but_valid_params_do_not_break_the_batch(llm):
    """Values at or past the ends of their ranges are served (or rejected up front), never fail inside a step,
    which would take every other request in the batch down with them."""
    params = [
        SP(temperature=1.0, top_k=(1 << 63) - 1, max_tokens=4),  # k beyond the vocabulary: no top-k
        SP(temperature=1.0, top_k=VOCAB + 1, max_tokens=4),
        SP(temperature=1.0, seed=(1 << 64) - 1, max_tokens=4),
        SP(temperature=1.0, seed=-(1 << 63), max_tokens=4),
        SP(temperature=0.0, priority=(1 << 63) - 1, max_tokens=4),
        SP(temperature=0.0, priority=-(1 << 63), max_tokens=4),
        SP(temperature=0.0, stop_token_ids=[(1 << 63) - 1] * 1024, min_tokens=2, max_tokens=4),
        SP(temperature=0.0, stop=["\u00e9\U0001f600"], max_tokens=4),
        SP(temperature=100.0, top_p=1e-9, max_tokens=4),
        SP(temperature=1e-5, min_p=1.0, max_tokens=4),
        SP(temperature=1.0, logprobs=20, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=10.0,
           max_tokens=4),
        SP(temperature=0.0, stop=["x" * 1000], max_tokens=4),
    ]
    outs = llm.generate(["hello"] * len(params), params)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert_idle(llm)
    # top_k past the vocabulary samples exactly as no top_k
    a = llm.generate(["hello"], SP(temperature=1.0, seed=5, max_tokens=8, top_k=(1 << 63) - 1))[0].outputs[0].token_ids
    b = llm.generate(["hello"], SP(temperature=1.0, seed=5, max_tokens=8))[0].outputs[0].token_ids
    assert a == b


# ---- LLM.generate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[VOCAB + 5], "", [1] * (MAX_LEN + 1), {"prompt_token_ids": [-3]}],
                         ids=["out of vocab", "empty", "too long", "negative in dict"])
@pytest.mark.parametrize("where", [0, 1, 3])
def test_generate_with_one_bad_prompt_queues_nothing(llm, bad, where):
    prompts = ["hello", [72, 105, 33], "good prompt"]
    prompts.insert(where, bad)
    before = llm.stats()["num_preemptions"]
    with pytest.raises(ValueError):
        llm.generate(prompts, SP(temperature=0.0, max_tokens=4))
    assert_idle(llm)
    assert llm.stats()["num_preemptions"] == before
    # and it still serves
    good = [p for i, p in enumerate(prompts) if i != where]
    outs = llm.generate(good, SP(temperature=0.0, max_tokens=4))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]
    assert_idle(llm)


def test_generate_with_one_bad_request_by_its_params(llm):
    # every prompt is fine on its own, but the last one's max_tokens does not fit: the others are rolled back
    params = [SP(max_tokens=4), SP(max_tokens=4), SP(max_tokens=MAX_LEN)]
    with pytest.raises(ValueError):
        llm.generate(["a", "b", "c"], params)
    assert_idle(llm)


def test_generate_param_count_mismatch(llm):
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [SP(max_tokens=2)])
    assert_idle(llm)


def test_generate_empty_list_and_single_token_prompt(llm):
    assert llm.generate([], SP(max_tokens=2)) == []
    outs = llm.generate([72, 105], SP(temperature=0.0, max_tokens=2))  # one prompt given as token ids
    assert len(outs) == 1 and outs[0].prompt_token_ids == [72, 105]
    assert_idle(llm)


def test_results_after_rejections_match_a_fresh_engine(llm):
    prompts = ["hello", "abc", [1, 2, 3]]
    params = SP(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    fresh = LLM(model="demo", block_size=BLOCK, num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_LEN, device="cpu")
    want = [o.outputs[0].token_ids for o in fresh.generate(prompts, params)]
    assert got == want
    assert not math.isnan(llm.stats()["kv_cache_usage"])
