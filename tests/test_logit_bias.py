"""logit_bias in the engine (issue 13 item 3): OpenAI's semantics (the bias is added to the logit: +100 forces a
token, -100 bans it), token ids checked against the model's vocabulary, logprobs still those of the raw model, and
with a structured output's grammar the grammar decides what is allowed."""
from __future__ import annotations

import pytest

from conveyor import LLM, SamplingParams
from conveyor.sampling_params import StructuredOutputsParams as SO


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


def tokens(outs) -> list[int]:
    return [t for o in outs for c in o.outputs for t in c.token_ids]


def test_plus_100_forces_a_token_with_raw_logprobs(llm):
    forced = 200  # a byte the demo head gives a zero logit, far below the printable ones
    outs = llm.generate(["one", "two"], SamplingParams(temperature=1.0, max_tokens=8, n=3, logprobs=0,
                                                       logit_bias={forced: 100}))
    assert set(tokens(outs)) == {forced}
    for c in (c for o in outs for c in o.outputs):
        assert all(lp[forced] < -5 for lp in c.logprobs)  # the model's own distribution, not the biased one


def test_minus_100_bans_tokens_greedy_and_sampled(llm):
    prompts = ["alpha", "beta", "gamma"]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    favourite = {t for t in tokens(llm.generate(prompts, greedy))}
    banned = {t: -100 for t in favourite}
    again = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                 logit_bias=banned))
    assert not favourite & set(tokens(again))
    sampled = llm.generate(prompts, SamplingParams(temperature=1.5, max_tokens=16, n=4, ignore_eos=True,
                                                   logit_bias=banned))
    assert not favourite & set(tokens(sampled))


def test_small_bias_shifts_without_forcing(llm):
    base = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    first = llm.generate("x", base)[0].outputs[0]
    top = first.token_ids[0]
    runner_up = sorted((v, t) for t, v in first.logprobs[0].items() if t != top)[-1][1]
    gap = first.logprobs[0][top] - first.logprobs[0][runner_up]
    nudged = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=1, logit_bias={runner_up: gap + 0.5}))
    assert nudged[0].outputs[0].token_ids == [runner_up]
    held = llm.generate("x", SamplingParams(temperature=0.0, max_tokens=1, logit_bias={runner_up: gap - 0.5}))
    assert held[0].outputs[0].token_ids == [top]


def test_bias_against_a_grammar_the_grammar_wins(llm):
    choices = SO(choice=["yes", "no"])
    outs = llm.generate(["q"] * 3, [
        SamplingParams(temperature=1.0, n=4, structured_outputs=choices, logit_bias={ord("y"): 100}),
        SamplingParams(temperature=1.0, n=4, structured_outputs=choices, logit_bias={ord("y"): -100}),
        SamplingParams(temperature=1.0, n=4, structured_outputs=choices, logit_bias={ord("z"): 100}),
    ])
    assert [c.text for c in outs[0].outputs] == ["yes"] * 4
    assert [c.text for c in outs[1].outputs] == ["no"] * 4
    assert all(c.text in ("yes", "no") for c in outs[2].outputs)  # a forced token the grammar bans stays banned


@pytest.mark.parametrize("bias, match", [
    ({262: 1.0}, "logit_bias token id 262 is outside the model's vocabulary"),
    ({5: 1.0, 10**12: -1.0}, "logit_bias token id 1000000000000"),
    ({-1: 1.0}, "logit_bias keys must be token ids"),
    ({5: 101}, "logit_bias values must be numbers in"),
    ({5: float("nan")}, "logit_bias values must be numbers in"),
])
def test_bad_logit_bias_is_a_value_error_and_the_engine_serves_on(llm, bias, match):
    with pytest.raises(ValueError, match=match):
        params = SamplingParams(max_tokens=4)
        params.logit_bias = bias  # set after construction: the engine validates again when the request is added
        llm.generate(["fine", "bad"], [SamplingParams(max_tokens=4), params])
    assert not llm.engine.has_unfinished_requests() and llm.stats()["kv_blocks_in_use"] == 0
    assert llm.generate("ok", SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].finish_reason == "length"
