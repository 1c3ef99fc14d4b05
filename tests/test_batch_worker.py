"""The batch worker's rules, on real gateway parts (config, pool, dispatch queue, store), no processes: which answers
are retried, and when a model's batch lines are held back for interactive traffic."""
from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from conveyor.gateway.admission import ModelQueue, Waiter
from conveyor.gateway.app import Gateway
from conveyor.gateway.batch_store import BatchStore
from conveyor.gateway.batch_worker import SHARED_FOR_S, BatchWorker, retry_reason
from conveyor.gateway.config import parse_config
from conveyor.gateway.picker import Breaker, Pool, Replica


@pytest.mark.parametrize("status, code, reason", [
    (200, None, None), (400, "invalid_request", None), (404, "model_not_found", None),
    (429, "request_too_large", None),  # waiting never helps: final, in the error file
    (429, "rate_limit_exceeded", "rate_limited"), (503, "shed", "rejected"), (503, "no_replica", "rejected"),
    (408, "deadline", "deadline"), (502, "upstream_unreachable", "upstream_error"), (500, "internal_error",
                                                                                    "upstream_error")])
def test_retryable_answers(status, code, reason):
    body = {"error": {"message": "x", "type": "t", "param": None, "code": code}} if code else {"choices": []}
    assert retry_reason(status, body) == reason


def _backoffs(gw: Gateway, reason: str) -> float:
    return gw.metrics.registry.get_sample_value("conveyor_gateway_batch_backoffs_total", {"reason": reason}) or 0


def _one_replica(tmp_path, batch: dict, slots: int) -> tuple[Gateway, Pool, Replica, BatchWorker]:
    """A gateway for model m with one started replica of `slots` dispatch slots, and its batch worker (call from a
    running event loop)."""
    cfg = parse_config({"models": [{"name": "m", "replicas": []}], "batch": batch,
                        "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(b"k").hexdigest()}]})
    gw = Gateway(cfg)
    pool = Pool("m", slots, client=None)
    r = pool.replicas["r1"] = Replica("r1", Breaker(3, 5.0), started=True)
    gw.pools["m"], gw.queues["m"] = pool, ModelQueue("m", pool, 16, 0.5, 60.0)
    return gw, pool, r, BatchWorker(gw, BatchStore(tmp_path / "b.sqlite3"))


def test_lines_are_held_while_interactive_requests_wait(tmp_path):
    async def go() -> None:
        gw, pool, r, worker = _one_replica(tmp_path, {"max_in_flight": 8}, 4)
        assert worker._room("m") == 4  # the window (8) is larger than the replica's free slots
        r.in_flight = 4
        assert worker._room("m") == 0  # no free slot: never queued ahead of capacity, not a backoff
        waiting = asyncio.create_task(gw.queues["m"].admit(Waiter("t", "interactive", 10)))
        await asyncio.sleep(0)
        assert worker._room("m") == 0 and worker.models["m"].window == 4  # held, the window halved
        assert worker._room("m") == 0 and worker.models["m"].window == 4  # once per CUT_EVERY_S
        assert _backoffs(gw, "interactive_waiting") == 1  # counted once per hold
        r.in_flight = 0
        gw.queues["m"].pump()
        pool.release(await waiting, 10, True)
        r.metrics, r.metrics_at = {"running": 4, "waiting": 2}, time.monotonic()
        assert worker._room("m") == 0 and _backoffs(gw, "replica_busy") == 1  # the engine's own queue
        r.metrics_at -= 10  # stale numbers are not evidence
        assert worker._room("m") == 4
        r.draining = True  # no usable replica: one line goes, so the queue shows the demand
        assert worker._room("m") == 1
        await pool.close()
        await gw.client.aclose()

    asyncio.run(go())


def test_the_window_narrows_while_interactive_requests_run(tmp_path):
    async def go() -> None:
        gw, pool, r, worker = _one_replica(tmp_path, {"max_in_flight": 8, "max_in_flight_shared": 3}, 64)
        assert worker._room("m") == 8  # nothing else runs: the whole window
        worker._state("m").in_flight = r.in_flight = 2  # only the worker's own lines at the replica
        assert worker._room("m") == 6
        r.in_flight = 3  # one interactive request runs beside them: at most max_in_flight_shared lines
        assert worker._room("m") == 1
        r.in_flight = 6
        assert worker._room("m") == 1  # the shared window does not shrink with the interactive load itself
        worker._state("m").in_flight = 4
        assert worker._room("m") == 0  # over the shared window: lines already running finish, none starts
        r.in_flight = worker._state("m").in_flight = 2
        assert worker._room("m") == 1  # the interactive request ended, but steady traffic comes back: still shared
        worker._state("m").interactive_at -= SHARED_FOR_S
        assert worker._room("m") == 6  # none seen for SHARED_FOR_S: the whole window again
        await pool.close()
        await gw.client.aclose()

    asyncio.run(go())


def test_lines_fit_this_process_s_share_of_the_replicas(tmp_path):
    """With several gateway processes (shared.py) only what this process may dispatch is room: its quota of the
    model, and each replica's slots less the other processes' requests there."""
    async def go() -> None:
        gw, pool, r, worker = _one_replica(tmp_path, {"max_in_flight": 8}, 6)
        assert worker._room("m") == 6
        pool.quota = 2  # this process's share of the model
        assert worker._room("m") == 2
        pool.quota, r.others = 6, 5  # the other processes hold 5 of the replica's 6 slots
        assert worker._room("m") == 1
        pool.quota, r.others = 0, 0  # no share yet (before the first syncs)
        assert worker._room("m") == 0
        await pool.close()
        await gw.client.aclose()

    asyncio.run(go())


def test_batch_lines_leave_the_tenants_per_minute_budget_alone():
    """A tenant's own batch must not use up the rate limits of its interactive requests (the batch tier is bounded
    by batch_queued_tokens instead)."""
    from conveyor.gateway.app import Ctx, _Reject
    cfg = parse_config({"models": [{"name": "m", "replicas": []}],
                        "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(b"k").hexdigest(),
                                     "tokens_per_minute": 100, "requests_per_minute": 2}]})
    tenant = cfg.tenants[0]

    async def go() -> None:
        gw = Gateway(cfg)
        for _ in range(5):  # lines far past both per-minute limits
            line = Ctx(rid="x", started=time.monotonic(), tenant=tenant, batch_line=True)
            await gw._reserve(line, tenant, 90)
            assert not line.reserved
        for _ in range(2):  # the interactive budget is untouched
            await gw._reserve(Ctx(rid="y", started=time.monotonic(), tenant=tenant), tenant, 40)
        with pytest.raises(_Reject):  # and still enforced
            await gw._reserve(Ctx(rid="z", started=time.monotonic(), tenant=tenant), tenant, 40)
        await gw.client.aclose()

    asyncio.run(go())


def test_a_line_that_fails_while_others_pass_is_given_up(tmp_path):
    """A line whose every attempt fails at the replica (it outlives the read timeout) ends in the error file on its
    third failure once other lines of its model were answered meanwhile; a replica failing everything is waited out
    (never recorded), however long."""
    from conveyor.gateway.batch_store import Line
    from conveyor.gateway.batch_worker import LINE_MAX_FAILURES, ModelState

    async def go() -> None:
        gw, pool, _, worker = _one_replica(tmp_path, {}, 4)
        st, bad = ModelState(window=4), Line("batch_x", 3, "c3", "/v1/completions", {"model": "m"}, 10)
        for _ in range(2 * LINE_MAX_FAILURES):  # nothing else answered: a replica fault, retried
            assert not worker._given_up(st, bad, "upstream_error")
        other = Line("batch_x", 4, "c4", "/v1/completions", {"model": "m"}, 10)
        assert not worker._given_up(st, other, "upstream_error")
        st.answered += 1  # another line of the model was answered after this one's first failure
        assert not worker._given_up(st, other, "upstream_error")
        assert worker._given_up(st, other, "upstream_error")  # its third failure: final
        assert worker._given_up(st, bad, "upstream_error")
        assert not worker._given_up(st, Line("batch_x", 5, "c5", "/v1/completions", {}, 1), "rejected")
        await pool.close()
        await gw.client.aclose()

    asyncio.run(go())
