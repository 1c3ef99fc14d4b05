"""Attacks on the batch tier's latest rules (issue 16): the queued-tokens bound that replaces the per-minute rate
limits for batch lines, and the worker's bookkeeping of a line's replica failures."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json

from conveyor.gateway.admission import ModelQueue
from conveyor.gateway.app import Gateway
from conveyor.gateway.batch_store import BatchStore, LinePolicy, estimate_tokens
from conveyor.gateway.batch_worker import LINE_MAX_FAILURES, BatchWorker
from conveyor.gateway.config import parse_config
from conveyor.gateway.picker import Breaker, Pool, Replica


def test_every_prompt_of_a_completion_line_counts_its_generation():
    """Batch lines skip the per-minute limits, so batch_queued_tokens is their only bound: a completion line of
    1000 prompts generates max_tokens for each (as the gateway reserves), not once."""
    assert estimate_tokens("/v1/completions", {"prompt": ["a"] * 1000, "max_tokens": 1000}, None) == 1000 + 1000 * 1000
    assert estimate_tokens("/v1/completions", {"prompt": [[1, 2], [3]], "n": 2}, None) == 3 + 16 * 2 * 2
    assert estimate_tokens("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4}, None) == 3 + 4  # one prompt


def _crashing_replica_gateway(tmp_path):
    """A gateway for model m whose one replica takes each request and drops the connection (a replica that
    crashes with the request in flight), a batch store with one batch of three lines, and the batch worker."""
    cfg = parse_config({"models": [{"name": "m", "replicas": [], "fallback_max_model_len": 512}],
                        "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(b"k").hexdigest()}],
                        "retry_backoff_s": 0})
    gw = Gateway(cfg)
    store = BatchStore(tmp_path / "b.sqlite3")
    lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": "m", "prompt": "hi", "max_tokens": 2}}).encode() + b"\n"
                     for i in range(3))
    f = store.create_file("t", "in.jsonl", "batch", io.BytesIO(lines))
    store.create_batch("t", f["id"], "/v1/completions", "24h", 86_400.0, None, LinePolicy({"m": None}, 10))
    return gw, cfg.tenants[0], BatchWorker(gw, store)


async def _drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


def test_lines_failing_together_are_not_at_fault(tmp_path):
    """A replica that crashes three times with the same lines in flight (answers of other lines in between) fails
    each of them three times: they must be retried, never recorded as failed; a line failing on its own three
    times is (it outlives the read timeout, say)."""
    async def go() -> None:
        server = await asyncio.start_server(_drop, "127.0.0.1", 0)
        gw, tenant, worker = _crashing_replica_gateway(tmp_path)
        pool = gw.pools["m"] = Pool("m", 8, gw.client)
        r = pool.replicas["r"] = Replica(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                                         Breaker(3, 5.0), started=True)
        gw.queues["m"] = ModelQueue("m", pool, 16, 0.5, 60.0)
        batch = worker.store.active_batches()[0]
        lines = worker.store.pending_lines(batch["id"], 10)
        st = worker._state("m")
        for _ in range(LINE_MAX_FAILURES):  # three crashes, each with every line in flight
            for line in lines:
                worker.in_flight.setdefault(batch["id"], set()).add(line.idx)
                st.in_flight += 1
            await asyncio.gather(*(worker._send(batch, tenant, line, "m") for line in lines))
            st.answered += 1  # other lines of the model were answered between the crashes
            st.backoff.until = 0
        assert len(worker.store.pending_lines(batch["id"], 10)) == 3  # all still queued
        assert all(n == 0 for n, _, _ in worker.strikes.values())  # none failed alone
        assert r.in_flight == 0
        worker.strikes.clear()
        alone = lines[0]
        for _ in range(LINE_MAX_FAILURES):  # the same line failing on its own
            worker.in_flight[batch["id"]].add(alone.idx)
            st.in_flight += 1
            await worker._send(batch, tenant, alone, "m")
            st.answered += 1
        assert [ln.idx for ln in worker.store.pending_lines(batch["id"], 10)] == [1, 2]  # it is final now
        worker.store.cancel_batch("t", batch["id"])
        await worker.step()  # the batch ended: its lines' failures are forgotten
        assert worker.strikes == {} and worker.store.get_batch("t", batch["id"])["status"] == "cancelled"
        server.close()
        await pool.close()
        await gw.client.aclose()
        await asyncio.to_thread(worker.threads.shutdown, True)
        worker.store.close()

    asyncio.run(go())


def test_a_tenant_with_many_batches_gets_no_more_turns(tmp_path):
    """Batch lines skip the per-minute limits, so the worker's turns are what shares the spare capacity between
    tenants: a tenant that splits its work into nine batches is served first as often as one with a single batch
    (each pass fills the free room from the first batches in turn: rotating over batches gave it 9 passes in 10)."""
    gw, _, worker = _crashing_replica_gateway(tmp_path)
    live = [{"id": f"a{i}", "tenant": "a"} for i in range(9)] + [{"id": "b0", "tenant": "b"}]
    firsts = [worker._in_turn(live)[0]["tenant"] for _ in range(10)]
    assert firsts.count("b") == 5 and firsts.count("a") == 5
    assert [b["id"] for b in worker._in_turn(live) if b["tenant"] == "a"] == [f"a{i}" for i in range(9)]  # oldest first
    assert [b["id"] for b in worker._in_turn(live[:2])] == ["a0", "a1"]
    asyncio.run(gw.client.aclose())
    worker.store.close()
