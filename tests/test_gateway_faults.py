"""Fault injection into the gateway (issue 11): an exception raised at each stage of a request — auth, body parse,
routing, rate limiting, the dispatch queue, the upstream connection, mid-stream, assembling the answer — gets the
client an OpenAI error (or an error event, once a stream has started), one access-log line and one count in
requests_total, and leaves every slot, reservation, queue entry, in-flight count and token bucket as it was.

The gateway runs in this process (uvicorn on a loopback port, same event loop) so that its state can be read
directly; the replica is a real `conveyor serve` process. Faults are injected with monkeypatch: that is the point.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest
import uvicorn
from server_process import ServerProcess, free_port

from conveyor.gateway import app as app_module
from conveyor.gateway import upstream
from conveyor.gateway.admission import ModelQueue
from conveyor.gateway.app import Gateway
from conveyor.gateway.config import parse_config
from conveyor.http_limits import timed_h11

KEY = "faults-key"
REPLICA_ARGS = ("--model", "demo", "--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "512")


class Injected(RuntimeError):
    pass


def boom(*args, **kw):
    raise Injected("injected fault")


async def aboom(*args, **kw):
    raise Injected("injected fault")


@pytest.fixture(scope="module")
def replica():
    r = ServerProcess(*REPLICA_ARGS, "--served-model-name", "m")
    yield r
    r.stop()


def config(replica: ServerProcess) -> dict:
    return {"models": [{"name": "m", "replicas": [replica.base_url], "tokenizer": "demo"}],
            "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                         "requests_per_minute": 100_000, "tokens_per_minute": 1_000_000, "max_concurrent": 4}],
            "breaker_failures": 1000,  # injected connection errors must not eject the only replica
            "retry_backoff_s": 0.001, "health_interval_s": 0.2}


SMALL = {"model": "m", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
BIG = {"model": "m", "prompt": "hello " * 10_000, "max_tokens": 4}  # parsed and counted in the CPU pool
STREAM = {**SMALL, "stream": True}
SHARED = {**SMALL, "temperature": 0}  # coalescable: identical requests share one upstream response


def held(gw: Gateway) -> dict:
    """Everything a request may hold; all zero (or empty) when the gateway is idle."""
    m = gw.metrics.registry.get_sample_value
    pool = gw.pools["m"]
    return {"tenant_slots": dict(gw.concurrent), "slots": m("conveyor_gateway_concurrency_slots",
                                                            {"tenant_class": "interactive"}) or 0,
            "reserved": m("conveyor_gateway_reserved_tokens", {"tenant_class": "interactive"}) or 0,
            "cpu_jobs": m("conveyor_gateway_cpu_jobs"), "queued": len(gw.queues["m"]),
            "in_flight": sum(r.in_flight for r in pool.replicas.values()),
            "in_flight_tokens": sum(r.in_flight_tokens for r in pool.replicas.values()),
            "coalescing": len(gw.coalescing)}


IDLE = {"tenant_slots": {}, "slots": 0, "reserved": 0, "cpu_jobs": 0, "queued": 0, "in_flight": 0,
        "in_flight_tokens": 0, "coalescing": 0}


def requests_total(gw: Gateway) -> float:
    return sum(s.value for metric in gw.metrics.requests.collect() for s in metric.samples
               if s.name.endswith("_total"))


async def serve(gw: Gateway, scenario) -> None:
    server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=free_port(), log_config=None,
                                          lifespan="on", http=timed_h11(10)))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started and gw.pools["m"].usable():
                break
            await asyncio.sleep(0.05)
        assert gw.pools["m"].usable()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30,
                                     headers={"authorization": f"Bearer {KEY}"}) as client:
            await scenario(client)
    finally:
        server.should_exit = True
        await task


async def until_idle(gw: Gateway) -> None:
    for _ in range(200):
        if held(gw) == IDLE:
            break
        await asyncio.sleep(0.05)
    assert held(gw) == IDLE


def is_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def cut_after_first_line(monkeypatch) -> None:
    """Upstream responses break after their first whole event."""
    real = upstream.Response.__aiter__

    async def cut(self):  # whatever the pieces: the whole stream may come in one
        seen = b""
        async for piece in real(self):
            seen += piece
            if (end := seen.find(b"\n\n")) >= 0:
                yield piece[:len(piece) - (len(seen) - end - 2)]
                raise upstream.RemoteProtocolError("injected: connection lost mid-stream")
            yield piece
    monkeypatch.setattr(upstream.Response, "__aiter__", cut)


def cut_body(monkeypatch) -> None:
    """Upstream non-streamed responses break while their body is read."""
    async def cut(self):  # the proxy reads a body by its pieces (bounded: proxy.read_body)
        raise upstream.RemoteProtocolError("injected: connection lost while reading the body")
        yield b""  # an async generator, as Response.__aiter__ is
    monkeypatch.setattr(upstream.Response, "__aiter__", cut)


# (name, how to inject, the request, what the client gets)
STAGES = [
    ("auth", lambda gw, mp: mp.setattr(app_module, "find_tenant", boom), SMALL, 500),
    ("parse_inline", lambda gw, mp: mp.setattr(app_module, "parse_body", boom), SMALL, 500),
    ("parse_in_pool", lambda gw, mp: mp.setattr(app_module, "parse_body", boom), BIG, 500),
    ("count_in_pool", lambda gw, mp: mp.setattr(app_module, "count_prompt_tokens", boom), BIG, 500),
    ("route", lambda gw, mp: mp.setattr(gw, "_route", aboom), SMALL, 500),
    ("rate_limit", lambda gw, mp: mp.setattr(gw.limiter, "acquire", aboom), SMALL, 500),
    ("queue", lambda gw, mp: mp.setattr(ModelQueue, "admit", aboom), SMALL, 500),
    ("queue_stream", lambda gw, mp: mp.setattr(ModelQueue, "admit", aboom), STREAM, 500),
    ("connect", lambda gw, mp: mp.setattr(gw.forwarder.upstream, "post", aboom), SMALL, 500),
    ("connect_refused", lambda gw, mp: mp.setattr(
        gw.forwarder.upstream, "post", lambda *a, **k: (_ for _ in ()).throw(upstream.ConnectError("injected"))),
     SMALL, 502),
    ("mid_body_shared", lambda gw, mp: cut_body(mp), SHARED, 502),
    ("respond", lambda gw, mp: mp.setattr(app_module, "_client_wait", aboom), SMALL, 500),
    ("respond_stream", lambda gw, mp: mp.setattr(app_module, "_client_wait", aboom), STREAM, 500),
]


@pytest.mark.parametrize("name, inject, body, status", STAGES, ids=[s[0] for s in STAGES])
def test_a_fault_at_each_stage_leaves_the_gateway_as_it_was(replica, monkeypatch, caplog, name, inject, body,
                                                           status):
    gw = Gateway(parse_config(config(replica)))
    gw.limiter.clock = lambda: 1000.0  # no refill: the token bucket's level tells exactly what was kept

    async def scenario(client: httpx.AsyncClient) -> None:
        ok = await client.post("/v1/completions", json=SMALL)  # the state a healthy request leaves behind
        assert ok.status_code == 200
        await until_idle(gw)
        _, tokens = gw.limiter.buckets["t"]
        level, total = tokens.level, requests_total(gw)
        with monkeypatch.context() as mp:
            inject(gw, mp)
            if body.get("stream"):
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    text = (await r.aread()).decode()
                assert r.status_code == status, text[:300]
                assert '"error"' in text
            else:
                is_openai_error(await client.post("/v1/completions", json=body), status)
            await until_idle(gw)
        await asyncio.sleep(0.05)  # refunds run as tasks
        assert requests_total(gw) == total + 1
        assert tokens.level == level  # the whole reservation was given back
        again = await client.post("/v1/completions", json=SMALL)  # and it still serves
        assert again.status_code == 200
        await until_idle(gw)

    with caplog.at_level(logging.INFO, logger="conveyor.gateway.access"):
        asyncio.run(serve(gw, scenario))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "conveyor.gateway.access"]
    assert [e["status"] for e in lines] == [200, status, 200]  # one access-log line per request


def test_a_stream_cut_after_its_first_event_ends_with_an_error_event(replica, monkeypatch):
    gw = Gateway(parse_config(config(replica)))

    async def scenario(client: httpx.AsyncClient) -> None:
        cut_after_first_line(monkeypatch)
        async with client.stream("POST", "/v1/completions", json=STREAM) as r:
            events = [line async for line in r.aiter_lines() if line]
        assert r.status_code == 200
        assert json.loads(events[-2][6:])["error"]["code"] == "upstream_failed" and events[-1] == "data: [DONE]"
        await until_idle(gw)
        assert gw.pools["m"].usable()  # one cut stream is no evidence against the replica

    asyncio.run(serve(gw, scenario))


def test_clients_gone_at_each_stage_leave_nothing_behind(replica):
    """Cancel requests at random points (while being parsed, queued, streamed): nothing is left held."""
    gw = Gateway(parse_config(config(replica)))

    async def scenario(client: httpx.AsyncClient) -> None:
        async def one(i: int) -> None:
            body = [SMALL, BIG, STREAM, SHARED][i % 4] | {"max_tokens": 64}
            try:
                await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=0.01 * (i % 10))
            except (TimeoutError, httpx.HTTPError):
                pass
        await asyncio.gather(*(one(i) for i in range(40)))
        await until_idle(gw)

    asyncio.run(serve(gw, scenario))
