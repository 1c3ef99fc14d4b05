"""Automatic prefix caching: reuse of full blocks across requests, with identical outputs."""
from __future__ import annotations

import pytest
from test_parity import PROMPTS, hf_greedy

from conveyor import LLM, SamplingParams
from conveyor.engine.block_pool import BlockPool
from conveyor.engine.kv_cache_manager import KVCacheManager, hash_block
from conveyor.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SYSTEM = "You are a helpful assistant. Paged attention stores keys and values in fixed-size blocks. " * 2


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_outputs_identical_with_caching_on_and_off(checkpoint, kind):
    path = checkpoint(kind)
    prompts = [SYSTEM + p for p in PROMPTS]
    expected = hf_greedy(path, prompts, 12)
    for caching in (False, True):
        llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=256, enable_prefix_caching=caching)
        first = llm.generate(prompts[:1], GREEDY)  # fills the cache with the shared system prompt
        rest = llm.generate(prompts, GREEDY)  # later requests start after the cached blocks
        assert [o.outputs[0].token_ids for o in first + rest] == expected[:1] + expected
        stats = llm.stats()
        assert (stats["prefix_cache_hits"] > 0) == caching
        assert stats["kv_blocks_in_use"] == 0


def test_hits_are_counted_in_tokens_and_salt_isolates():
    llm = LLM(block_size=8, num_kv_blocks=128)
    prompt = {"prompt_token_ids": list(range(40, 120))}  # 80 tokens = 10 blocks
    llm.generate(prompt, GREEDY)
    before = llm.stats()
    llm.generate(prompt, GREEDY)
    after = llm.stats()
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 80
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 72  # 9 blocks: the last token is recomputed
    eng = llm.engine
    eng.add_request("salted", prompt, GREEDY, cache_salt="tenant-b")
    while eng.has_unfinished_requests():
        eng.step()
    assert llm.stats()["prefix_cache_hits"] == after["prefix_cache_hits"]  # another tenant's salt: no reuse


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], 5, SamplingParams(), 1)
    assert kv.match_prefix(a) == 0
    assert kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.free(a)
    assert kv.pool.num_free == 4 and len(kv.pool.cached) == 2
    b = Sequence("b", 0, [1, 2, 3, 4, 9], 5, SamplingParams(), 1)
    assert kv.match_prefix(b) == 4 and kv.pool.num_free == 2
    kv.free(b)
    c = Sequence("c", 0, list(range(20, 27)), 7, SamplingParams(), 1)
    assert kv.match_prefix(c) == 0 and kv.allocate_slots(c, 7)  # needs every block: the cache is evicted
    assert not kv.pool.cached and kv.pool.num_free == 0


def test_a_hash_collision_cannot_return_wrong_blocks():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, (1, 2), None)
    pool.register(b, h, (1, 2))
    assert pool.lookup(h, (1, 2)) == b
    assert pool.lookup(h, (3, 4)) is None  # same hash, other tokens: not a hit


def test_chained_hash_depends_on_parent_and_salt():
    h1 = hash_block(None, (1, 2), None)
    assert hash_block(h1, (3, 4), None) != hash_block(None, (3, 4), None)
    assert hash_block(None, (1, 2), "a") != hash_block(None, (1, 2), "b") != h1
