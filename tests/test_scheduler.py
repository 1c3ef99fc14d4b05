"""Scheduler + KVCacheManager driven directly with Sequence objects (no model): continuous batching, limits,
chunked prefill, preemption by recompute, freeing on finish."""
from __future__ import annotations

import pytest

from conveyor.config import SchedulerConfig
from conveyor.engine.kv_cache_manager import KVCacheManager
from conveyor.engine.scheduler import Scheduler, SchedulerOutput
from conveyor.engine.sequence import FinishReason, Sequence, SequenceStatus
from conveyor.sampling_params import SamplingParams

FAKE_TOKEN = 7


def make_sched(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
               max_num_batched_tokens: int = 64, policy: str = "fcfs") -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          scheduling_policy=policy)
    # the prompts here are alike (0, 1, 2, ...): without prefix caching each sequence computes its own blocks, as
    # these tests count (sharing a step's blocks is tested in test_prefix_burst.py)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, enable_prefix_caching=False))


def make_seq(name: str, num_prompt: int, max_tokens: int, priority: int = 0) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, priority=priority)
    return Sequence(name, 0, list(range(num_prompt)), num_prompt, params, max_tokens)


def advance(sched: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """What the engine does after the forward: count the computed tokens, append a token to the sequences whose
    chunk reached the end, finish those at max_tokens. Returns the sequences that finished."""
    sampling = [s.seq for s in out.scheduled if s.samples]
    out.sampled = sampling  # type: ignore[attr-defined]  # `samples` reads num_computed_tokens: keep it
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
    done = []
    for seq in sampling:
        seq.token_ids.append(FAKE_TOKEN)
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, FinishReason.LENGTH)
            done.append(seq)
    return done


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    check_output(sched, out)
    return out, advance(sched, out)


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg, bs = sched.config, sched.kv.block_size
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    ids = [s.seq.seq_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    for s in out.scheduled:
        assert s.seq.status == SequenceStatus.RUNNING and s.seq in sched.running
        assert 1 <= s.num_tokens <= s.seq.num_uncomputed_tokens
        assert len(s.seq.block_table) * bs >= s.seq.num_computed_tokens + s.num_tokens
    for p in out.preempted:
        assert p.status == SequenceStatus.WAITING and p.block_table == [] and p.num_computed_tokens == 0
        assert p in sched.waiting and p not in sched.running
        assert p.seq_id not in ids


def scheduled_map(out: SchedulerOutput) -> dict[str, int]:
    return {s.seq.request_id: s.num_tokens for s in out.scheduled}


def run_to_end(sched: Scheduler, max_steps: int = 1000) -> int:
    for n in range(max_steps):
        if not sched.num_unfinished:
            return n
        out, _ = step(sched)
        assert out.scheduled, "no progress with unfinished sequences"
    raise AssertionError("did not finish")


# ---- continuous batching ---------------------------------------------------------------------------------------------
def test_waiting_sequences_join_as_others_finish():
    sched = make_sched(max_num_seqs=2)
    a, b, c, d = (make_seq("a", 3, 2), make_seq("b", 3, 6), make_seq("c", 3, 3), make_seq("d", 3, 2))
    for s in (a, b, c, d):
        sched.add(s)
    out, done = step(sched)  # prefill a and b
    assert scheduled_map(out) == {"a": 3, "b": 3}
    assert [s.request_id for s in sched.waiting] == ["c", "d"]
    out, done = step(sched)  # decode a (its 2nd token: done) and b
    assert scheduled_map(out) == {"a": 1, "b": 1}
    assert done == [a] and a.status == SequenceStatus.FINISHED and a.finish_reason == FinishReason.LENGTH
    out, done = step(sched)  # c joins while b keeps decoding
    assert scheduled_map(out) == {"b": 1, "c": 3}
    assert b.status == SequenceStatus.RUNNING and [s.request_id for s in sched.waiting] == ["d"]
    out, _ = step(sched)
    out, done = step(sched)
    assert scheduled_map(out) == {"b": 1, "c": 1} and done == [c]
    out, done = step(sched)  # d takes c's place at once
    assert scheduled_map(out) == {"b": 1, "d": 3} and done == [b]
    run_to_end(sched)
    assert all(s.is_finished for s in (a, b, c, d))
    assert all(s.num_output_tokens == s.max_tokens for s in (a, b, c, d))
    assert sched.kv.pool.num_in_use == 0


def test_max_num_seqs_respected():
    sched = make_sched(max_num_seqs=3)
    seqs = [make_seq(f"s{i}", 2, 4) for i in range(7)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert len(out.scheduled) == 3 and len(sched.running) == 3 and len(sched.waiting) == 4
    assert [s.seq for s in out.scheduled] == seqs[:3]  # first come, first served
    for _ in range(200):
        if not sched.num_unfinished:
            break
        out, _ = step(sched)
        assert len(out.scheduled) <= 3 and len(sched.running) <= 3
    assert all(s.is_finished for s in seqs)


def test_max_num_batched_tokens_respected_and_admission_chunked():
    sched = make_sched(max_num_batched_tokens=10)
    a, b, c = make_seq("a", 6, 3), make_seq("b", 6, 3), make_seq("c", 6, 3)
    for s in (a, b, c):
        sched.add(s)
    out, _ = step(sched)
    assert scheduled_map(out) == {"a": 6, "b": 4}  # b admitted with the rest of the budget
    assert out.num_tokens == 10
    assert out.sampled == [a]
    assert b.num_computed_tokens == 4 and b.num_output_tokens == 0
    out, _ = step(sched)
    assert scheduled_map(out) == {"a": 1, "b": 2, "c": 6}
    for _ in range(100):
        if not sched.num_unfinished:
            break
        out, _ = step(sched)
        assert out.num_tokens <= 10
    assert all(s.is_finished for s in (a, b, c))


def test_long_prompt_is_prefilled_in_chunks():
    sched = make_sched(max_num_batched_tokens=8, block_size=4)
    seq = make_seq("long", 25, 3)
    sched.add(seq)
    chunks = []
    while not seq.is_finished:
        out, _ = step(sched)
        [s] = out.scheduled
        chunks.append((s.num_tokens, out.sampled == [seq]))
        if not seq.is_finished:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)  # blocks grow with the chunks
    assert chunks == [(8, False), (8, False), (8, False), (1, True), (1, True), (1, True)]
    assert seq.num_output_tokens == 3 and sched.kv.pool.num_in_use == 0


def test_running_decodes_go_before_a_new_prefill():
    sched = make_sched(max_num_batched_tokens=8)
    a = make_seq("a", 4, 10)
    sched.add(a)
    step(sched)
    b = make_seq("b", 20, 2)
    sched.add(b)
    out, _ = step(sched)
    assert scheduled_map(out) == {"a": 1, "b": 7}


# ---- preemption ------------------------------------------------------------------------------------------------------
def test_preemption_of_the_newest_running_sequence_by_recompute():
    # 4 blocks of 4 tokens; two 4-token prompts decode until the pool runs dry
    sched = make_sched(num_blocks=4, block_size=4)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sched.add(a)
    sched.add(b)
    step(sched)  # prefill: 1 block each
    step(sched)  # first decode: 2 blocks each
    assert len(a.block_table) == 2 and len(b.block_table) == 2 and sched.kv.pool.num_free == 0
    for _ in range(3):
        step(sched)  # tokens at positions 5..7 fit in the second blocks
    assert a.num_computed_tokens == 8 and a.num_tokens == 9
    b_tokens = list(b.token_ids)
    out, _ = step(sched)  # a needs a 3rd block: b, the newest, is preempted
    assert out.preempted == [b]
    assert scheduled_map(out) == {"a": 1}
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert b.token_ids == b_tokens  # generated tokens are kept, to be recomputed
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert len(a.block_table) == 3 and sched.kv.pool.num_in_use == 3
    # b comes back once there is room, recomputing prompt + its generated tokens in one chunk
    resumed = None
    while resumed is None:
        out, _ = step(sched)
        m = scheduled_map(out)
        if "b" in m:
            resumed = m["b"]
    assert resumed == len(b_tokens)
    run_to_end(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert sched.kv.pool.num_in_use == 0


def test_preemption_picks_the_lowest_ranked_not_the_one_short_of_blocks():
    sched = make_sched(num_blocks=5, block_size=2)
    a, b, c = make_seq("a", 2, 8), make_seq("b", 2, 8), make_seq("c", 3, 7)
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # a: 1 block, b: 1 block, c: 2 blocks
    assert sched.kv.pool.num_in_use == 4
    out, _ = step(sched)  # a takes the last block; b needs one too: c, the newest, is preempted for it
    assert out.preempted == [c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert len(a.block_table) == 2 and len(b.block_table) == 2 and sched.kv.pool.num_in_use == 4
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and sched.waiting[0] is c
    assert sched.num_preemptions == 1
    run_to_end(sched)
    assert [s.num_output_tokens for s in (a, b, c)] == [8, 8, 7] and sched.kv.pool.num_in_use == 0


def test_preemption_respects_priority():
    # the newest arrival has the better (lower) priority value: the older, lower-ranked one is preempted
    sched = make_sched(num_blocks=4, block_size=4, policy="priority")
    old = make_seq("old", 4, 8, priority=1)
    new = make_seq("new", 4, 8, priority=0)
    sched.add(old)
    sched.add(new)
    preempted = []
    for _ in range(20):
        out, _ = step(sched)
        preempted += out.preempted
        if preempted:
            break
    assert preempted == [old]
    assert new.status == SequenceStatus.RUNNING


def test_lower_priority_sequence_is_preempted_to_let_a_higher_one_grow():
    sched = make_sched(num_blocks=2, block_size=2, policy="priority")
    x = make_seq("x", 2, 2)  # 1 block, 2 at its last decode
    y = make_seq("y", 2, 2)
    sched.add(x)
    sched.add(y)
    step(sched)
    assert sched.kv.pool.num_free == 0
    x.params = SamplingParams(max_tokens=2, priority=5)  # x now ranks last although it arrived first
    out = sched.schedule()
    check_output(sched, out)
    # y (ranked first) needs a block for position 2: x is preempted; nothing is admitted in that step
    assert out.preempted == [x] and [s.seq for s in out.scheduled] == [y]
    advance(sched, out)
    run_to_end(sched)
    assert x.num_output_tokens == 2 and y.num_output_tokens == 2 and sched.kv.pool.num_in_use == 0


def test_sequence_short_of_blocks_and_ranked_last_preempts_itself():
    sched = make_sched(num_blocks=3, block_size=2)
    x = make_seq("x", 3, 3)  # 2 blocks; its next position (3) still fits in block 1
    y = make_seq("y", 2, 4)  # 1 block; its next position (2) needs a new block
    sched.add(x)
    sched.add(y)
    step(sched)
    assert sched.kv.pool.num_free == 0
    out, _ = step(sched)
    assert out.preempted == [y] and [s.seq for s in out.scheduled] == [x]
    assert y.status == SequenceStatus.WAITING and y.num_output_tokens == 1 and y.block_table == []
    run_to_end(sched)
    assert x.num_output_tokens == 3 and y.num_output_tokens == 4 and sched.kv.pool.num_in_use == 0


def test_no_admission_in_a_step_that_preempted():
    sched = make_sched(num_blocks=4, block_size=4)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sched.add(a)
    sched.add(b)
    for _ in range(5):
        step(sched)
    c = make_seq("c", 1, 1)
    sched.add(c)
    out, _ = step(sched)
    assert out.preempted == [b]
    assert c not in [s.seq for s in out.scheduled] and c.status == SequenceStatus.WAITING


# ---- finishing -------------------------------------------------------------------------------------------------------
def test_finished_sequence_frees_its_blocks_in_the_same_step():
    sched = make_sched(num_blocks=3, block_size=4)
    a = make_seq("a", 8, 2)  # 8 + 2 tokens: 3 blocks, the whole pool, at its last decode
    b = make_seq("b", 8, 2)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert scheduled_map(out) == {"a": 8}  # b does not fit beside a
    out, done = step(sched)
    assert done == [a] and scheduled_map(out) == {"a": 1}
    assert a.block_table == [] and sched.kv.pool.num_in_use == 0  # freed by finish(), before the next step
    out, _ = step(sched)
    assert scheduled_map(out) == {"b": 8}


def test_finish_aborts_waiting_and_running_sequences():
    sched = make_sched(max_num_seqs=1)
    a, b = make_seq("a", 5, 10), make_seq("b", 5, 10)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.kv.pool.num_in_use == 2
    sched.finish(b, FinishReason.ABORT)  # waiting
    assert b.is_finished and b.finish_reason == FinishReason.ABORT and b not in sched.waiting
    sched.finish(a, FinishReason.ABORT)  # running
    assert a.is_finished and a not in sched.running and a.block_table == []
    assert sched.kv.pool.num_in_use == 0 and sched.num_unfinished == 0
    sched.finish(a, FinishReason.STOP)  # finishing twice is a no-op
    assert a.finish_reason == FinishReason.ABORT and sched.kv.pool.num_in_use == 0
    assert sched.schedule().scheduled == []


def test_add_rejects_a_sequence_that_is_not_fresh():
    sched = make_sched()
    a = make_seq("a", 3, 3)
    sched.add(a)
    step(sched)
    with pytest.raises(AssertionError):
        sched.add(a)


# ---- the same through the engine: chunking and preemption do not change what is generated ----------------------------
def test_engine_chunked_prefill_matches_one_shot_prefill():
    from conveyor.llm import LLM

    prompts = [[(i * 37 + 11) % 256 for i in range(45)], "short", [(i * 13) % 256 for i in range(20)]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    one_shot = LLM(model="demo", max_model_len=128, device="cpu")
    chunked = LLM(model="demo", max_model_len=128, max_num_batched_tokens=8, block_size=4, device="cpu")
    want = [o.outputs[0].token_ids for o in one_shot.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in chunked.generate(prompts, params)]
    assert got == want
    # seeded sampling too
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in one_shot.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in chunked.generate(prompts, params)]
    assert got == want
    assert chunked.stats()["kv_blocks_in_use"] == 0
