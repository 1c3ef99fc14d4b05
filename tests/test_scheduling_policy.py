"""Priorities, decode-protecting chunked prefill and the admission watermark."""
from __future__ import annotations

from test_scheduler import make_sched, make_seq, run_to_end, step

from conveyor.config import SchedulerConfig
from conveyor.engine.kv_cache_manager import KVCacheManager
from conveyor.engine.scheduler import Scheduler


def test_priority_policy_orders_waiting_by_priority_then_arrival():
    sched = make_sched(max_num_seqs=1, policy="priority")
    seqs = [make_seq("low", 3, 1, priority=5), make_seq("high", 3, 1, priority=-1), make_seq("mid1", 3, 1, 2),
            make_seq("mid2", 3, 1, 2)]
    for s in seqs:
        sched.add(s)
    assert [s.request_id for s in sched.waiting] == ["high", "mid1", "mid2", "low"]
    order = []
    while sched.num_unfinished:
        out, _ = step(sched)
        order += [s.seq.request_id for s in out.scheduled if s.seq.request_id not in order]
    assert order == ["high", "mid1", "mid2", "low"]


def test_fcfs_ignores_priority():
    sched = make_sched(max_num_seqs=1)
    for s in (make_seq("a", 3, 1, priority=5), make_seq("b", 3, 1, priority=-1)):
        sched.add(s)
    assert [s.request_id for s in sched.waiting] == ["a", "b"]


def test_long_prefill_never_stalls_running_decodes():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=32, long_prefill_token_threshold=8)
    sched = Scheduler(cfg, KVCacheManager(256, 4))
    decoders = [make_seq(f"d{i}", 4, 60) for i in range(10)]
    for d in decoders:
        sched.add(d)
    step(sched)  # all ten prefill (40 tokens > 32: some take two steps)
    step(sched)
    long = make_seq("long", 400, 2)
    sched.add(long)
    for _ in range(20):
        out, _ = step(sched)
        got = {s.seq.request_id: s.num_tokens for s in out.scheduled}
        assert all(got.get(d.request_id) == 1 for d in decoders), "a decode missed its token this step"
        assert got.get("long", 0) <= 8
    assert long.num_computed_tokens > 0
    run_to_end(sched)


def test_without_threshold_a_prompt_takes_what_the_decodes_leave():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=32)
    sched = Scheduler(cfg, KVCacheManager(256, 4))
    decoders = [make_seq(f"d{i}", 2, 30) for i in range(6)]
    for d in decoders:
        sched.add(d)
    step(sched)
    long = make_seq("long", 200, 4)
    sched.add(long)
    for _ in range(3):
        out, _ = step(sched)
        got = {s.seq.request_id: s.num_tokens for s in out.scheduled}
        assert all(got[d.request_id] == 1 for d in decoders)
        assert got["long"] == 32 - 6


def test_watermark_stops_admission_before_the_pool_is_exhausted():
    # keep 3 blocks free at admission; a and b have the same prompt: no prefix caching, so b needs blocks of its own
    kv = KVCacheManager(num_blocks=10, block_size=4, watermark=0.3, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
    a, b = make_seq("a", 16, 8), make_seq("b", 16, 8)  # 4 blocks each
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a"]  # b would leave 2 free, under the reserve of 3
    assert kv.pool.num_free == 6
    run_to_end(sched)  # running sequences may still grow into the reserve, and b runs once a is done
