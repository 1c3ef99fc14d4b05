"""Attack on asynchronous scheduling (issue 15): reproducers of faults found.

A job that failed on the worker after its block moves were applied (here: the sampler raises after the forward
wrote its K/V) is run again synchronously by Engine._recover, which applied the job's swaps a second time (fixed:
each job's block moves are applied exactly once). A swap-out copies device block -> host block; by then the device
block belongs to the sequence whose need for it caused the preemption, and the failed forward has already written
that sequence's new K/V into it. The second swap-out copied that into the swapped-out sequence's host block, which
is later swapped back in: the swapped-out request's output silently differed from the synchronous engine's.
"""
from __future__ import annotations

import pytest

from conveyor import LLM, SamplingParams


def prompts(n: int, length: int, step: int) -> list[dict]:
    return [{"prompt_token_ids": [(5 * i + 3 * j) % 200 + 10 for j in range(length + step * i)]} for i in range(n)]


def _run_with_sampler_failure_after_swap_out(path: str, async_scheduling: bool) -> tuple[dict, dict, list]:
    """Run 6 greedy requests that force swap preemption; the first time a step whose block moves include a
    swap-out samples on the engine's worker (or in the step, synchronously), the sampler raises once."""
    kw = dict(dtype="float32", num_kv_blocks=14, preemption_mode="swap", swap_space=0.01)
    llm = LLM(path, async_scheduling=async_scheduling, **kw)
    e = llm.engine
    state = {"armed": False, "fired": False, "swap_outs": []}
    swap = e.runner.swap

    def recording_swap(out, into):
        if out:
            state["swap_outs"].append(list(out))
            if not state["fired"]:
                state["armed"] = True
        return swap(out, into)

    sample = e.sampler.sample

    def failing_sample(*a, **k):
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            raise RuntimeError("the sampler fails once, after the forward wrote its K/V")
        return sample(*a, **k)

    e.runner.swap = recording_swap
    e.sampler.sample = failing_sample
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    got = {o.request_id: o for o in llm.generate(prompts(6, length=20, step=1), params)}
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and e._inflight is None and not e.requests
    assert state["fired"], "the sampler failure was injected"
    return got, state, list(got)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_sampler_failure_in_a_step_with_a_swap_out_changes_no_output(checkpoint, async_scheduling):
    """Minimal: LLM(num_kv_blocks=14, preemption_mode="swap", swap_space=0.01, async_scheduling=True), 6 greedy
    requests of 20-25 tokens, max_tokens=60; the sampler raises once in the job that first swaps a sequence out.
    Every request must end (the failed step runs again and succeeds) with the synchronous engine's tokens. The
    synchronous engine (False) is the control: it retries the forward without applying its swaps again."""
    path = checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = LLM(path, dtype="float32", num_kv_blocks=14, preemption_mode="swap",
              swap_space=0.01).generate(prompts(6, length=20, step=1), params)
    got, state, ids = _run_with_sampler_failure_after_swap_out(path, async_scheduling=async_scheduling)
    assert all(got[i].error is None for i in ids)
    assert [got[i].outputs[0].token_ids for i in ids] == [o.outputs[0].token_ids for o in ref]
