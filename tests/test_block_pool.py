"""Unit tests of BlockPool and KVCacheManager: allocation, reference counts, frees, peak tracking."""
from __future__ import annotations

import pytest

from conveyor.engine.block_pool import BlockPool
from conveyor.engine.kv_cache_manager import KVCacheManager, cdiv
from conveyor.engine.sequence import Sequence
from conveyor.sampling_params import SamplingParams


def make_seq(num_prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence("r", 0, list(range(num_prompt)), num_prompt, SamplingParams(max_tokens=max_tokens), max_tokens)


# ---- BlockPool ------------------------------------------------------------------------------------------------------
def test_fresh_pool_is_all_free():
    pool = BlockPool(8)
    assert pool.num_blocks == 8
    assert pool.num_free == 8 and pool.num_in_use == 0 and pool.peak_in_use == 0
    assert pool.ref_counts == [0] * 8


def test_pool_needs_a_block():
    with pytest.raises(AssertionError):
        BlockPool(0)


def test_allocate_gives_distinct_blocks_with_one_reference():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(a) == 3 and len(b) == 5
    assert sorted(a + b) == list(range(8))  # all distinct, all valid ids
    assert all(pool.ref_counts[x] == 1 for x in a + b)
    assert pool.num_free == 0 and pool.num_in_use == 8
    assert pool.allocate(0) == []


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.num_in_use == 3
    assert [pool.ref_counts[b] for b in held] == [1, 1, 1]
    assert sum(pool.ref_counts) == 3


def test_free_returns_blocks_and_they_are_reused():
    pool = BlockPool(4)
    a = pool.allocate(4)
    pool.free(a[:2])
    assert pool.num_free == 2 and pool.num_in_use == 2
    assert [pool.ref_counts[b] for b in a] == [0, 0, 1, 1]
    again = pool.allocate(2)
    assert sorted(again) == sorted(a[:2])  # only the freed blocks can come back
    assert pool.num_free == 0


def test_double_free_is_an_assertion():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.free(a)
    with pytest.raises(AssertionError, match="double free"):
        pool.free([a[0]])
    # the failed free did not corrupt the pool
    assert pool.num_free == 4 and pool.ref_counts == [0] * 4


def test_double_free_within_one_call_is_an_assertion():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    with pytest.raises(AssertionError, match="double free"):
        pool.free([b, b])


def test_free_of_a_never_allocated_block_is_an_assertion():
    pool = BlockPool(4)
    with pytest.raises(AssertionError):
        pool.free([2])


def test_refcounts_shared_block_freed_only_by_last_reference():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.incref(b)
    pool.incref(b)
    assert pool.ref_counts[b] == 3
    pool.free([b])
    pool.free([b])
    assert pool.ref_counts[b] == 1 and pool.num_in_use == 1 and b not in pool.free_queue
    pool.free([b])
    assert pool.ref_counts[b] == 0 and pool.num_in_use == 0 and b in pool.free_queue
    with pytest.raises(AssertionError):
        pool.free([b])


def test_incref_of_a_free_block_is_an_assertion():
    pool = BlockPool(4)
    with pytest.raises(AssertionError, match="is free"):
        pool.incref(0)


def test_peak_in_use_tracks_the_maximum():
    pool = BlockPool(10)
    a = pool.allocate(3)
    b = pool.allocate(4)
    assert pool.peak_in_use == 7
    pool.free(a)
    pool.free(b)
    assert pool.num_in_use == 0 and pool.peak_in_use == 7
    c = pool.allocate(2)
    assert pool.peak_in_use == 7
    d = pool.allocate(8)
    assert pool.peak_in_use == 10
    pool.free(c + d)
    assert pool.num_in_use == 0 and pool.peak_in_use == 10


def test_free_queue_never_holds_a_block_twice():
    pool = BlockPool(6)
    blocks = pool.allocate(6)
    for b in blocks:
        pool.incref(b)
    pool.free(blocks)
    pool.free(list(reversed(blocks)))
    assert sorted(pool.free_queue) == list(range(6))


# ---- KVCacheManager -------------------------------------------------------------------------------------------------
def test_cdiv():
    assert [cdiv(a, 4) for a in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_blocks_needed():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = make_seq(10)
    assert kv.blocks_needed(seq, 0) == 0
    assert kv.blocks_needed(seq, 1) == 1
    assert kv.blocks_needed(seq, 4) == 1
    assert kv.blocks_needed(seq, 5) == 2
    assert kv.blocks_needed(seq, 10) == 3
    assert kv.allocate_slots(seq, 5)
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 5
    assert kv.blocks_needed(seq, 3) == 0  # positions 5..7 fit in block 1
    assert kv.blocks_needed(seq, 4) == 1  # position 8 starts block 2
    assert kv.blocks_needed(seq, 12) == 3


def test_allocate_slots_extends_the_table():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = make_seq(6)
    assert kv.allocate_slots(seq, 6)
    assert len(seq.block_table) == 2 and kv.pool.num_in_use == 2
    seq.num_computed_tokens = 6
    first = list(seq.block_table)
    assert kv.allocate_slots(seq, 2)  # fills block 1: nothing new
    assert seq.block_table == first
    seq.num_computed_tokens = 8
    assert kv.allocate_slots(seq, 1)
    assert seq.block_table[:2] == first and len(seq.block_table) == 3
    assert all(kv.pool.ref_counts[b] == 1 for b in seq.block_table)
    assert kv.usage == pytest.approx(3 / 8)


def test_allocate_slots_false_when_short_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_seq(8)
    assert kv.allocate_slots(a, 8)  # 2 blocks
    b = make_seq(9)
    assert not kv.allocate_slots(b, 9)  # needs 3, 1 free
    assert b.block_table == [] and kv.pool.num_free == 1 and kv.pool.num_in_use == 2
    assert kv.allocate_slots(b, 4)  # a chunk that fits
    assert len(b.block_table) == 1 and kv.pool.num_free == 0
    b.num_computed_tokens = 4
    assert not kv.allocate_slots(b, 1)
    assert len(b.block_table) == 1


def test_free_returns_a_sequences_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = make_seq(3), make_seq(4)
    assert kv.allocate_slots(a, 3) and kv.allocate_slots(b, 4)
    assert kv.pool.num_free == 0
    assert not set(a.block_table) & set(b.block_table)
    kv.free(a)
    assert a.block_table == [] and kv.pool.num_free == 2 and kv.pool.num_in_use == 2
    kv.free(b)
    assert kv.pool.num_in_use == 0 and kv.usage == 0.0
    kv.free(a)  # an empty table frees nothing
    assert kv.pool.num_in_use == 0
