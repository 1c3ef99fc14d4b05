"""Preemption by swap: blocks go to host memory and come back whole; outputs equal recompute's."""
from __future__ import annotations

import pytest
from test_parity import MAX_TOKENS, PROMPTS, hf_greedy

from conveyor import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_swap_and_recompute_give_transformers_tokens(checkpoint, kind):
    path = checkpoint(kind)
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    for mode in ("recompute", "swap"):
        llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=32,
                  preemption_mode=mode, swap_space=0.01, watermark=0.0)
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected, mode
        st = llm.stats()
        assert st["num_preemptions_" + mode] >= 1
        assert st["kv_blocks_in_use"] == 0 and st["num_swapped_out_blocks"] == 0
        if mode == "swap":
            assert st["blocks_swapped_out"] == st["blocks_swapped_in"] > 0
            assert st["num_preemptions_recompute"] == 0


def test_full_swap_space_falls_back_to_recompute():
    prompts = [{"prompt_token_ids": [40 + i] * 60} for i in range(10)]
    # 6 host blocks of 16 tokens: one victim of 4-6 blocks fits, a second one does not
    llm = LLM(block_size=16, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode="swap",
              swap_space=6 * 2 * 4 * 16 * 4 * 32 * 4 / 2**30, watermark=0.0)
    assert llm.engine.kv.host_pool.num_blocks == 6
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    st = llm.stats()
    assert st["num_preemptions_swap"] >= 1 and st["num_preemptions_recompute"] >= 1
    reference = LLM(num_kv_blocks=256).generate(prompts, SamplingParams(temperature=0, max_tokens=30,
                                                                        ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert st["kv_blocks_in_use"] == 0 and st["num_swapped_out_blocks"] == 0


def test_aborting_a_swapped_sequence_frees_its_host_blocks():
    llm = LLM(block_size=16, num_kv_blocks=12, max_num_batched_tokens=64, preemption_mode="swap", swap_space=0.01,
              watermark=0.0)
    eng = llm.engine
    for i in range(4):
        eng.add_request(f"r{i}", {"prompt_token_ids": [50 + i] * 40}, SamplingParams(max_tokens=60, ignore_eos=True))
    for _ in range(200):
        eng.step()
        if eng.scheduler.swapped:
            break
    victim = eng.scheduler.swapped[0]
    eng.abort_request(victim.request_id)
    assert victim.block_table == []
    while eng.has_unfinished_requests():
        eng.step()
    st = llm.stats()
    assert st["kv_blocks_in_use"] == 0 and st["num_swapped_out_blocks"] == 0
