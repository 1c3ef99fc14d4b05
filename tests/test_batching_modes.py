"""The baseline batching modes and the contiguous KV layout are real engine policies: same tokens, different
admission and reservation."""
from __future__ import annotations

import time

import pytest

from conveyor import LLM, SamplingParams
from conveyor.engine.block_pool import BlockPool
from conveyor.engine.kv_cache_manager import cdiv

PROMPTS = [{"prompt_token_ids": [65 + i] * (5 + 7 * i)} for i in range(6)]
LENGTHS = [3, 17, 6, 30, 9, 12]


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]


def run_steps(llm: LLM) -> list[set[int]]:
    """Add PROMPTS and step the engine to completion, recording the running set after each step."""
    eng = llm.engine
    for i, (p, sp) in enumerate(zip(PROMPTS, params())):
        eng.add_request(f"r{i}", p, sp)
    history = []
    deadline = time.monotonic() + 60
    while eng.has_unfinished_requests() and time.monotonic() < deadline:
        eng.step()
        history.append({s.seq_id for s in eng.scheduler.running})
    assert not eng.has_unfinished_requests()
    return history


@pytest.fixture(scope="module")
def reference():
    outs = LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4).generate(PROMPTS, params())
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("batching", ["continuous", "static", "dynamic", "none"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_every_mode_gives_the_same_tokens(reference, batching, layout):
    llm = LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4, batching=batching, kv_layout=layout,
              batch_window_s=0.0, batch_timeout_s=0.01)
    outs = llm.generate(PROMPTS, params())
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert llm.stats()["kv_blocks_in_use"] == 0


@pytest.mark.parametrize("batching", ["static", "dynamic"])
def test_batch_modes_admit_only_at_batch_boundaries(batching):
    llm = LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4, batching=batching, batch_window_s=0.0,
              batch_timeout_s=0.0)
    history = run_steps(llm)
    for before, after in zip(history, history[1:]):
        joined = after - before
        assert not joined or not before, "a sequence joined a batch that was still running"
        assert len(after) <= 4
    assert max(len(h) for h in history) == 4


def test_continuous_admits_as_soon_as_a_slot_frees():
    history = run_steps(LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4))
    assert any((after - before) and (before & after) for before, after in zip(history, history[1:]))


def test_none_runs_one_sequence_at_a_time():
    history = run_steps(LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4, batching="none"))
    assert max(len(h) for h in history) == 1


def test_dynamic_waits_for_its_window_or_a_full_batch():
    llm = LLM(max_num_seqs=3, num_kv_blocks=64, block_size=4, batching="dynamic", batch_window_s=0.3)
    eng = llm.engine
    eng.add_request("a", PROMPTS[0], SamplingParams(max_tokens=2))
    eng.step()
    assert eng.last_step_num_seqs == 0 and len(eng.scheduler.waiting) == 1
    time.sleep(0.35)
    eng.step()
    assert eng.last_step_num_seqs == 1
    while eng.has_unfinished_requests():
        eng.step()
    for i in range(3):  # a full batch goes at once, window or not
        eng.add_request(f"b{i}", PROMPTS[i], SamplingParams(max_tokens=2))
    eng.step()
    assert eng.last_step_num_seqs == 3


def test_contiguous_reserves_prompt_plus_max_tokens_in_one_run():
    llm = LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4, kv_layout="contiguous")
    eng = llm.engine
    eng.add_request("a", PROMPTS[3], SamplingParams(max_tokens=30))
    eng.step()
    (seq,) = eng.scheduler.running
    assert len(seq.block_table) == cdiv(len(PROMPTS[3]["prompt_token_ids"]) + 30, 4)
    assert seq.block_table == list(range(seq.block_table[0], seq.block_table[0] + len(seq.block_table)))
    eng.abort_request("a")
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_contiguous_wastes_more_than_paged():
    waste = {}
    for layout in ("paged", "contiguous"):
        llm = LLM(max_num_seqs=4, num_kv_blocks=64, block_size=4, kv_layout=layout)
        llm.generate(PROMPTS, params())  # contiguous holds every output slot from admission on
        waste[layout] = llm.stats()["kv_waste_ratio"]
    assert 0 <= waste["paged"] < waste["contiguous"] < 1
    assert waste["paged"] < 0.25  # only the partly filled last block of each sequence


def test_first_fit_contiguous_allocation_and_fragmentation():
    pool = BlockPool(10)
    a = pool.allocate_contiguous(4)
    b = pool.allocate_contiguous(4)
    assert a == [0, 1, 2, 3] and b == [4, 5, 6, 7]
    assert pool.allocate_contiguous(3) is None  # only 2 left
    pool.free(a)
    assert pool.allocate_contiguous(3) == [0, 1, 2]
    assert pool.allocate_contiguous(2) == [8, 9]  # block 3 is free but alone: fragmentation
    assert pool.num_free == 1 and pool.allocate(1) == [3]
