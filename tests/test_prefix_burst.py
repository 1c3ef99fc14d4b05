"""Requests that arrive together with one system prompt compute it once: blocks a step computes are read by the
sequences admitted after their owner in the same step (blocks in flight), with outputs identical to no prefix
caching, and a failing, aborted or preempted owner costs its readers nothing."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from server_process import ServerProcess

from conveyor import LLM, SamplingParams
from conveyor.config import SchedulerConfig
from conveyor.engine.kv_cache_manager import KVCacheManager
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.sequence import FinishReason, Sequence
from conveyor.sampling_params import StructuredOutputsParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SYSTEM = [(7 * i) % 240 + 5 for i in range(160)]  # 10 blocks of 16, ids inside every test vocabulary


def burst(n: int, system: list[int] = SYSTEM) -> list[dict]:
    return [{"prompt_token_ids": system + [20 + i, 30 + 2 * i, 40 + 3 * i]} for i in range(n)]


def count_prompt_tokens(llm: LLM) -> list[int]:
    """Wrap the real runner: per forward, the prompt tokens it computes."""
    runner = llm.engine.runner
    execute, counts = runner.execute, []

    def counting(scheduled):
        counts.append(sum(max(0, min(s.num_tokens, s.seq.num_prompt_tokens - s.seq.num_computed_tokens))
                          for s in scheduled))
        return execute(scheduled)

    runner.execute = counting
    return counts


def token_ids(outs) -> dict[str, list[list[int]]]:
    return {o.request_id: [c.token_ids for c in o.outputs] for o in outs}


@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the C++ kernel where it builds
def test_eight_requests_sharing_a_system_prompt_compute_it_once(checkpoint, backend):
    """Sharing in the step relies on every attention backend writing all new K/V before any query reads."""
    path = checkpoint("llama")
    got, computed = {}, {}
    for caching in (False, True):
        llm = LLM(path, dtype="float32", block_size=16, num_kv_blocks=256, enable_prefix_caching=caching,
                  attention_backend=backend)
        computed[caching] = count_prompt_tokens(llm)
        got[caching] = [o.outputs[0].token_ids for o in llm.generate(burst(8), GREEDY)]
        stats = llm.stats()
        assert stats["kv_blocks_in_use"] == 0
    assert got[True] == got[False]
    assert computed[False][0] == 8 * 163
    # all eight run in the first step: the first computes the 160 shared tokens, the other seven only their own 3
    assert computed[True][0] == sum(computed[True]) == 160 + 8 * 3
    assert stats["prefix_cache_hits"] == 7 * 160 and stats["prefix_cache_queries"] == 8 * 163


def engine_step(sched: Scheduler):
    """Schedule one step and do the engine's bookkeeping after a successful forward: a sequence whose chunk reached
    its end gets token 7 and stops after 4 of them."""
    out = sched.schedule()
    sampling = [s.seq for s in out.scheduled if s.samples]
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
        sched.kv.cache_full_blocks(s.seq)
    for seq in sampling:
        seq.token_ids.append(7)
        if seq.num_output_tokens == 4:
            sched.finish(seq, FinishReason.STOP)
    return out


def test_only_blocks_a_chunk_completes_are_shared_and_salts_never_share():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, long_prefill_token_threshold=10),
                      kv)
    seqs = [Sequence(f"r{i}", 0, list(range(30)), 30, SamplingParams(), 4, cache_salt=salt)
            for i, salt in enumerate([None, None, "t", "t", None])]
    for s in seqs[:4]:
        sched.add(s)
    out = engine_step(sched)
    # r0 computes 10 tokens: blocks 0-1 complete, block 2 only partly, so r1 takes 2 blocks; r3 takes r2's, never r0's
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("r0", 10), ("r1", 10), ("r2", 10),
                                                                           ("r3", 10)]
    r0, r1, r2, r3, r4 = seqs
    assert r1.block_table[:2] == r0.block_table[:2] and r1.block_table[2] != r0.block_table[2]
    assert r3.block_table[:2] == r2.block_table[:2] and not set(r2.block_table) & set(r0.block_table)
    assert [s.num_computed_tokens for s in seqs[:4]] == [10, 18, 10, 18]
    assert kv.prefix_cache_hits == 16
    sched.add(r4)  # joins while r0 completes block 4 and r1 blocks 5-6
    out = engine_step(sched)
    cached = r0.block_table[:2] + r1.block_table[2:4]  # r1 registered blocks 2-3 first: r0's copies are not cached
    assert r4.block_table[:7] == cached + r0.block_table[4:5] + r1.block_table[5:7]  # then two owners' in flight
    assert [s.num_tokens for s in out.scheduled if s.seq is r4] == [2]
    while sched.num_unfinished:
        engine_step(sched)
    assert kv.pool.num_in_use == 0


def test_a_failed_forward_sends_the_readers_back_to_waiting():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
    seqs = [Sequence(f"r{i}", 0, list(range(12)) + [20 + i], 13, SamplingParams(), 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule().scheduled
    assert [s.num_tokens for s in batch] == [13, 1, 1]
    assert sched.requeue_in_step_readers(batch)
    assert [s.seq.request_id for s in batch] == ["r0"]  # the owner runs again alone
    assert [s.request_id for s in sched.waiting] == ["r1", "r2"]
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in seqs[1:])
    assert kv.pool.num_in_use == 4 and set(kv.pool.ref_counts) == {0, 1}
    assert not sched.requeue_in_step_readers(batch)  # undone once: nothing is left to undo


def reference(prompts: dict, params: SamplingParams = GREEDY) -> dict:
    llm = LLM(model="demo", block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    for rid, p in prompts.items():
        llm.engine.add_request(rid, p, params)
    return run(llm)


def run(llm: LLM) -> dict:
    done = {}
    while llm.engine.has_unfinished_requests():
        done |= {o.request_id: o for o in llm.engine.step() if o.finished}
    return done


SHORT = [(5 * i) % 200 + 30 for i in range(32)]  # 8 blocks of 4 for the demo model
PROMPTS = {f"q{i}": p for i, p in enumerate(burst(6, SHORT))}


@pytest.mark.parametrize("fault", ["owner", "reader", "transient"])
def test_a_failing_forward_fails_only_its_request(fault):
    llm = LLM(model="demo", block_size=4, num_kv_blocks=256)
    eng, execute, raised = llm.engine, llm.engine.runner.execute, []
    bad = {"owner": "q0", "reader": "q3", "transient": None}[fault]

    def faulty(scheduled):
        if any(s.seq.request_id == bad for s in scheduled) or (fault == "transient" and not raised):
            raised.append([s.seq.request_id for s in scheduled])
            raise RuntimeError("injected fault")
        return execute(scheduled)

    eng.runner.execute = faulty
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, GREEDY)
    done = run(llm)
    assert len(raised[0]) == 6  # the fault fired in the step that shared the prefix
    want = token_ids(reference(PROMPTS).values())
    if bad:
        assert "RuntimeError" in done.pop(bad).error
        del want[bad]
    assert token_ids(done.values()) == want
    assert all(o.error is None for o in done.values())
    stats = llm.stats()
    assert stats["num_failed_requests"] == (bad is not None) and stats["kv_blocks_in_use"] == 0
    assert stats["prefix_cache_hits"] >= 4 * len(SHORT)


def test_readers_outlive_an_owner_aborted_or_preempted():
    llm = LLM(model="demo", block_size=4, num_kv_blocks=256)
    eng = llm.engine
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, GREEDY)
    eng.step()
    assert llm.stats()["prefix_cache_hits"] == 5 * len(SHORT)
    eng.abort_request("q0")  # the owner leaves after the step: the blocks it computed stay with the readers
    got = token_ids(run(llm).values())
    assert got == {k: v for k, v in token_ids(reference(PROMPTS).values()).items() if k != "q0"}
    assert llm.stats()["kv_blocks_in_use"] == 0

    # a low-priority owner mid-prefill is joined by readers, then preempted for their growth
    tight = LLM(model="demo", block_size=4, num_kv_blocks=24, long_prefill_token_threshold=13,
                scheduling_policy="priority", watermark=0.0)
    eng = tight.engine
    low = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, priority=1)
    high = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    eng.add_request("q0", PROMPTS["q0"], low)
    eng.step()  # q0 computes 13 of its 35 tokens
    for rid in ("q1", "q2", "q3"):
        eng.add_request(rid, PROMPTS[rid], high)
    eng.step()  # q0 computes 13 more; q1 takes 3 cached and 3 in-flight blocks, not the one q0 left partial, which
    assert tight.stats()["prefix_cache_hits"] == 24 + 2 * 32  # q1 completes and q2, q3 take

    owner, preempted = eng.requests["q0"].seqs[0], 0
    done = {}
    while eng.has_unfinished_requests():
        done |= {o.request_id: o for o in eng.step() if o.finished}
        preempted = max(preempted, owner.num_preemptions)
    assert preempted
    want = reference({k: PROMPTS[k] for k in ("q0", "q1", "q2", "q3")}, high)
    assert token_ids(done.values()) == token_ids(want.values())
    assert tight.stats()["kv_blocks_in_use"] == 0


SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@pytest.mark.parametrize("spec", [None, SPEC], ids=["plain", "ngram"])
def test_samples_beams_grammars_and_speculation_in_a_burst_are_unchanged(spec):
    params = {"q0": GREEDY, "q1": SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=10, ignore_eos=True),
              "q2": SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=6),
              "q3": SamplingParams(temperature=0, max_tokens=10,
                                   structured_outputs=StructuredOutputsParams(regex="[a-z]{3,8}")),
              "q4": SamplingParams(temperature=0.8, seed=9, max_tokens=10, ignore_eos=True), "q5": GREEDY}
    got = {}
    for caching in (False, True):
        llm = LLM(model="demo", block_size=4, num_kv_blocks=256, enable_prefix_caching=caching,
                  speculative_config=spec)
        for rid, p in PROMPTS.items():
            llm.engine.add_request(rid, p, params[rid])
        got[caching] = token_ids(run(llm).values())
        stats = llm.stats()
        assert stats["kv_blocks_in_use"] == 0
    assert got[True] == got[False]
    assert stats["prefix_cache_hits"] >= 5 * len(SHORT)


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--num-kv-blocks", "512", "--block-size", "16")
    yield s
    s.stop()


def test_a_burst_over_http_shares_within_each_tenant_only(server):
    """Two tenants send four prompts each at once: every prompt after a tenant's first reuses its 160 tokens,
    whether it joined the step computing them or a later one; no tenant reads another's."""
    async def complete(client, salt):
        r = await client.post("/v1/completions", json={
            "model": "demo", "prompt": [p["prompt_token_ids"] for p in burst(4)], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "cache_salt": salt})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await asyncio.gather(complete(client, "tenant-a"), complete(client, "tenant-b"))

    a, b = asyncio.run(main())
    assert a == b
    assert server.metric("vllm:prefix_cache_hits_total") == 2 * 3 * 160
    assert server.metric("vllm:kv_cache_usage_perc") == 0
