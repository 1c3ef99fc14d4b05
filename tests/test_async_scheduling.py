"""Asynchronous scheduling (conveyor/engine/async_scheduling.py): step N + 1 is scheduled while step N's forward runs
on the worker, with placeholder tokens. Outputs must equal the synchronous engine's (greedy and seeded sampling,
stop strings, EOS, preemption by recompute and swap, prefix caching), requests it cannot run make steps synchronous,
aborts and failing forwards in flight cost no other request anything, and nothing is leaked."""
from __future__ import annotations

import threading

import pytest

from conveyor import LLM, SamplingParams
from conveyor.cli import build_parser, engine_kwargs
from conveyor.engine.sequence import PENDING
from conveyor.sampling_params import StructuredOutputsParams


def prompts(n: int, length: int = 3, step: int = 7) -> list[dict]:
    return [{"prompt_token_ids": [(5 * i + 3 * j) % 200 + 10 for j in range(length + step * i)]} for i in range(n)]


def outputs(outs) -> list[tuple]:
    return [(o.request_id, [(c.token_ids, c.text, c.finish_reason, c.cumulative_logprob) for c in o.outputs])
            for o in outs]


def both(path: str, reqs, params, **kw) -> tuple[list, list, LLM]:
    """Outputs of the synchronous and the asynchronous engine; the asynchronous LLM (checked for leaks)."""
    sync = LLM(path, dtype="float32", **kw).generate(reqs, params)
    llm = LLM(path, dtype="float32", async_scheduling=True, **kw)
    got = llm.generate(reqs, params)
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
    assert llm.engine._inflight is None and not llm.engine.requests
    return outputs(sync), outputs(got), llm


def close(a: list[tuple], b: list[tuple]) -> None:
    """Same tokens, text and finish reasons; cumulative logprobs equal within float noise."""
    assert [[c[:3] for c in o[1]] for o in a] == [[c[:3] for c in o[1]] for o in b]
    for x, y in zip(a, b):
        for cx, cy in zip(x[1], y[1]):
            assert cx[3] == pytest.approx(cy[3], abs=1e-4)


def test_greedy_seeded_and_stops_match_the_synchronous_engine(checkpoint):
    path = checkpoint("llama")
    lengths = [12, 3, 11, 5, 10, 7, 9, 30, 2]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in lengths[:4]]
    params += [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + m, max_tokens=m, logprobs=1)
               for m in lengths[4:7]]
    params += [SamplingParams(temperature=0, max_tokens=30, stop=["e", "a"]),  # stop strings end it early
               SamplingParams(temperature=0, max_tokens=2, stop_token_ids=[11, 12, 13])]
    sync, got, _ = both(path, prompts(9), params)
    close(sync, got)


def test_preemption_by_recompute_and_swap(checkpoint):
    path = checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for mode in ("recompute", "swap"):
        kw = dict(num_kv_blocks=14, preemption_mode=mode, swap_space=0.01 if mode == "swap" else 0.0)
        sync, got, llm = both(path, prompts(6, length=20, step=1), params, **kw)
        close(sync, got)
        assert llm.engine.scheduler.preemptions_by_mode[mode] > 0


def test_prefix_caching_burst_and_later_hits(checkpoint):
    """Blocks are registered only once the job that wrote them has finished: later requests still hit them."""
    path = checkpoint("llama")
    system = [(7 * i) % 200 + 10 for i in range(64)]
    reqs = [{"prompt_token_ids": system + [20 + i, 30 + i]} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sync, got, llm = both(path, reqs, params, num_kv_blocks=64)
    close(sync, got)
    hits = llm.engine.kv.prefix_cache_hits
    again = outputs(llm.generate(reqs, params))
    close(sync, again)
    assert llm.engine.kv.prefix_cache_hits - hits >= 6 * 64


def test_the_forward_runs_on_the_worker_while_the_next_step_is_scheduled(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", async_scheduling=True)
    engine, threads = llm.engine, []
    forward = engine.runner.forward

    def recording(chunks):
        threads.append(threading.current_thread().name)
        return forward(chunks)

    engine.runner.forward = recording
    engine.add_request("a", {"prompt_token_ids": [11, 12, 13]}, SamplingParams(temperature=0, max_tokens=5,
                                                                               ignore_eos=True))
    assert engine.step() == []  # submitted; nothing to apply yet
    assert engine._inflight is not None
    seq = engine.requests["a"].seqs[0]
    assert seq.token_ids[-1] == PENDING and seq.num_computed_tokens == 3
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 5 and PENDING not in outs[-1].outputs[0].token_ids
    assert threads and all(t.startswith("conveyor-step") for t in threads)


def test_requests_it_cannot_run_make_steps_synchronous(checkpoint):
    """A grammar request joining mid-stream: the step in flight completes first, then steps run synchronously
    until it is gone; every output equals the synchronous engine's."""
    path = checkpoint("llama")
    results = {}
    for asynchronous in (False, True):
        llm = LLM(path, dtype="float32", async_scheduling=asynchronous)
        e = llm.engine
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        e.add_request("a", {"prompt_token_ids": [11, 12, 13]}, greedy)
        e.add_request("b", {"prompt_token_ids": [21, 22, 23, 24]}, greedy)
        outs = e.step() + e.step()
        inflight_before = e._inflight is not None
        e.add_request("g", {"prompt_token_ids": [31, 32]}, SamplingParams(
            temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))
        e.add_request("p", {"prompt_token_ids": [41, 42]}, SamplingParams(
            temperature=0, max_tokens=6, presence_penalty=1.0, ignore_eos=True))
        outs += e.step()
        assert e._inflight is None  # drained: the grammar request cannot run asynchronously
        while e.has_unfinished_requests():
            outs += e.step()
        results[asynchronous] = ({o.request_id: o.outputs[0].token_ids for o in outs if o.finished},
                                 inflight_before)
        assert llm.stats()["kv_blocks_in_use"] == 0
    assert results[True][0] == results[False][0] and results[True][0]["g"]
    assert results[True][1] and not results[False][1]


def test_abort_while_a_step_is_in_flight(checkpoint):
    path = checkpoint("llama")
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = outputs(LLM(path, dtype="float32").generate([{"prompt_token_ids": [21, 22, 23]}], greedy))
    llm = LLM(path, dtype="float32", async_scheduling=True)
    e = llm.engine
    e.add_request("a", {"prompt_token_ids": [11, 12, 13]}, greedy)
    e.add_request("offline-0", {"prompt_token_ids": [21, 22, 23]}, greedy)
    for _ in range(3):
        e.step()
    assert e._inflight is not None
    out = e.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort" and PENDING not in out.outputs[0].token_ids
    outs = []
    while e.has_unfinished_requests():
        outs += e.step()
    close(outputs([o for o in outs if o.finished]), want)
    assert llm.stats()["kv_blocks_in_use"] == 0


@pytest.mark.parametrize("when", [0, 1, 4])
def test_a_failing_forward_in_flight_fails_only_its_request(checkpoint, caplog, when):
    """A forward that raises whenever request "bad" is in it: the job fails, the job after it is skipped and
    undone, the step runs again synchronously, which ends "bad" with an error; the others' outputs equal a run
    without it. "twin" joins with bad and shares its first 32 prompt tokens: it reads bad's blocks in flight, so
    it starts over. when: the step at which both join."""
    path = checkpoint("llama")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    shared = [(11 * j) % 200 + 10 for j in range(32)]
    reqs = {f"r{i}": [(3 * i + j) % 200 + 10 for j in range(4 + 5 * i)] for i in range(4)}
    reqs["twin"] = shared + [60, 61]
    want = {}
    llm = LLM(path, dtype="float32")
    for rid, ids in reqs.items():
        want[rid] = llm.generate([{"prompt_token_ids": ids}], greedy)[0].outputs[0].token_ids
    llm = LLM(path, dtype="float32", async_scheduling=True, num_kv_blocks=64)
    e = llm.engine
    forward = e.runner.forward

    def failing(chunks):
        if any(c.seq.request_id == "bad" for c in chunks):
            raise RuntimeError("this request breaks the forward")
        return forward(chunks)

    e.runner.forward = failing
    for rid, ids in reqs.items():
        if rid != "twin":
            e.add_request(rid, {"prompt_token_ids": ids}, greedy)
    outs = []
    for i in range(200):
        if i == when:
            e.add_request("bad", {"prompt_token_ids": shared + [50, 51, 52]}, greedy)
            e.add_request("twin", {"prompt_token_ids": reqs["twin"]}, greedy)
        if not e.has_unfinished_requests():
            break
        outs += e.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert final["bad"].error and final["bad"].outputs[0].finish_reason == "error"
    assert {rid: final[rid].outputs[0].token_ids for rid in reqs} == want
    assert all(PENDING not in c.token_ids for o in outs for c in o.outputs)
    assert llm.stats()["kv_blocks_in_use"] == 0 and e._inflight is None
    assert "runs again synchronously" in caplog.text


def test_async_scheduling_flag(checkpoint):
    args = build_parser().parse_args(["serve", checkpoint("llama"), "--async-scheduling"])
    assert engine_kwargs(args)["async_scheduling"] is True
    args = build_parser().parse_args(["serve", checkpoint("llama")])
    assert engine_kwargs(args)["async_scheduling"] is False


def test_a_block_is_registered_only_once_the_job_writing_it_has_run(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32", async_scheduling=True, block_size=16)
    e = llm.engine
    e.add_request("a", {"prompt_token_ids": list(range(20, 35))}, SamplingParams(temperature=0, max_tokens=4,
                                                                                 ignore_eos=True))
    e.step()  # job 1: the 15 prompt tokens
    e.step()  # job 2 (in flight): position 15, which fills block 0; job 1 applied
    seq = e.requests["a"].seqs[0]
    assert seq.num_computed_tokens == 16 and e._inflight is not None
    assert e.kv.pool.block_hash[seq.block_table[0]] is None
    e.step()  # job 2 applied
    assert e.kv.pool.block_hash[seq.block_table[0]] is not None


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("where", ["forward", "sample"])
def test_any_job_failing_once_changes_no_output(checkpoint, mode, where):
    """The k-th job raises, for every k, in its forward (before it writes anything) or in its sampler (after the
    forward wrote K/V, also into blocks just freed by a swap-out): the step runs again synchronously (and succeeds)
    with its block moves applied once, the job after it is undone, and every output equals the synchronous
    engine's, under preemption and with requests sharing a prefix (some admitted onto blocks in flight)."""
    path = checkpoint("llama")
    shared = [(11 * j) % 200 + 10 for j in range(40)]
    reqs = [{"prompt_token_ids": shared + [60 + i] * (1 + 3 * i)} for i in range(5)]
    reqs += prompts(3, length=20, step=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(num_kv_blocks=20, preemption_mode=mode, swap_space=0.01 if mode == "swap" else 0.0, max_num_seqs=6)
    want = outputs(LLM(path, dtype="float32", **kw).generate(reqs, params))
    llm = LLM(path, dtype="float32", async_scheduling=True, **kw)
    owner = llm.engine.runner if where == "forward" else llm.engine.sampler
    real = getattr(owner, where)
    calls, fail_at = [0], [0]

    def failing_once(*args, **kwargs):
        if threading.current_thread().name.startswith("conveyor-step"):
            calls[0] += 1
            if calls[0] == fail_at[0]:
                raise RuntimeError("a transient failure")
        return real(*args, **kwargs)

    setattr(owner, where, failing_once)
    jobs = len(outputs(llm.generate(reqs, params))) and calls[0]
    assert llm.engine.scheduler.preemptions_by_mode[mode] > 0
    for k in range(1, jobs + 1):
        calls[0], fail_at[0] = 0, k
        close(outputs(llm.generate(reqs, params)), want)
        assert llm.stats()["kv_blocks_in_use"] == 0 and not llm.engine.requests


def test_served_with_async_scheduling():
    """`conveyor serve --async-scheduling`: concurrent streamed and plain requests give the synchronous server's
    text; a client that leaves mid-stream is aborted; a grammar request in between runs; no block is left."""
    import concurrent.futures

    import httpx
    from server_process import ServerProcess, wait_until

    kw = dict(model="demo", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    texts = {}
    for flag in ("--no-async-scheduling", "--async-scheduling"):
        s = ServerProcess(flag, "--max-num-seqs", "8", "--num-kv-blocks", "256")
        try:
            client = s.openai_client()

            def one(i: int, stream: bool) -> str:
                r = client.completions.create(prompt=f"request {i}: " + "x" * (5 * i), stream=stream, **kw)
                return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                texts[flag] = list(pool.map(one, range(12), [i % 2 == 0 for i in range(12)]))
            with httpx.stream("POST", s.base_url + "/v1/completions", json={
                    "model": "demo", "prompt": "leave early", "max_tokens": 200, "stream": True,
                    "ignore_eos": True}) as r:
                next(r.iter_lines())
            choice = client.completions.create(model="demo", prompt="pick", max_tokens=5, extra_body={
                "structured_outputs": {"choice": ["yes", "no"]}}).choices[0].text
            assert choice in ("yes", "no")
            wait_until(lambda: s.metric("vllm:num_requests_running") == 0 and s.metric("vllm:kv_cache_usage_perc")
                       == 0, what="the engine to be idle with no block in use")
        finally:
            assert s.stop() == 0
    assert texts["--async-scheduling"] == texts["--no-async-scheduling"]
    assert all(len(t) == 24 for t in texts["--async-scheduling"])  # the demo tokenizer: one token per byte
