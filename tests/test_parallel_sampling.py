"""n > 1 samples share the prompt's blocks; the partly filled last block is copied when they diverge."""
from __future__ import annotations

import pytest

from conveyor import LLM, SamplingParams

LONG = {"prompt_token_ids": [(7 * i) % 200 + 32 for i in range(203)]}  # 12.7 blocks of 16


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_samples_equal_unshared_ones(checkpoint, kind):
    path = checkpoint(kind)
    sp = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 3, "数字"]
    shared = LLM(path, dtype="float32", block_size=4, num_kv_blocks=128)
    unshared = LLM(path, dtype="float32", block_size=4, num_kv_blocks=128, kv_layout="contiguous")
    a = shared.generate(prompts, sp)
    b = unshared.generate(prompts, sp)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert len({tuple(c.token_ids) for c in a[0].outputs}) > 1  # the samples did diverge
    assert shared.stats()["num_cow_copies"] > 0
    assert shared.stats()["kv_blocks_in_use"] == 0


def test_n_samples_of_a_long_prompt_cost_one_prompt_plus_tails():
    n, out = 8, 12
    sp = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=out, ignore_eos=True)
    shared = LLM(num_kv_blocks=512, enable_prefix_caching=False)
    shared.generate(LONG, sp)
    separate = LLM(num_kv_blocks=512, enable_prefix_caching=False)
    separate.generate([LONG] * n, SamplingParams(temperature=1.0, seed=3, max_tokens=out, ignore_eos=True))
    prompt_blocks = 203 // 16  # full blocks of the prompt, shared
    assert shared.stats()["kv_blocks_peak"] <= prompt_blocks + n * 2
    assert separate.stats()["kv_blocks_peak"] >= n * prompt_blocks
    assert shared.stats()["kv_blocks_in_use"] == 0


def test_abort_before_the_fork_frees_everything():
    llm = LLM(num_kv_blocks=64, max_num_batched_tokens=64)
    eng = llm.engine
    eng.add_request("r", LONG, SamplingParams(n=3, max_tokens=5))
    eng.step()  # a first chunk of the prompt: the samples are still pending
    assert len(eng.scheduler.running) == 1
    eng.abort_request("r")
    assert llm.stats()["kv_blocks_in_use"] == 0 and not eng.has_unfinished_requests()


def test_n_above_max_num_seqs_is_rejected():
    llm = LLM(max_num_seqs=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate("x", SamplingParams(n=3))
