"""Issue 17: the gateway knows its own limit (conveyor/gateway/overload.py). Over its open-request limit, or while
its event loop lags, a new request is refused at once with a 503, Retry-After and OpenAI's error JSON; /health and
/metrics still answer; nothing is leaked, however requests end. Against a real gateway process and the slow fake
upstream of bench/gateway_streams.py (one chunk a second, as many as the request's max_tokens)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_process import GatewayProcess, free_port, wait_healthy, wait_until

from conveyor.gateway.app import Gateway
from conveyor.gateway.config import ConfigError, parse_config
from conveyor.gateway.overload import (ACCEPT_QUEUE, ACCEPT_QUEUE_READ_S, EVENT_LOOP_LAG, SUSTAINED_TICKS,
                                       AcceptQueue, Overload, default_max_open, raise_nofile_limit)

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "gateway_streams.py")
KEYS = {"a": "overload-key-a", "cap": "overload-key-cap"}
ADMIN_KEY = "overload-admin-key"


def tenant(name: str, **kw) -> dict:
    return {"name": name, "api_key_sha256": hashlib.sha256(KEYS[name].encode()).hexdigest(), **kw}


def config(upstream: str, tmp: str, **top) -> dict:
    return {"models": [{"name": "fake", "replicas": [upstream]}],
            "tenants": [tenant("a"), tenant("cap", max_concurrent=1)],
            "batch": {"db_path": os.path.join(tmp, "batches.sqlite3")}, "health_interval_s": 0.2, **top}


def body(max_tokens: int) -> dict:
    return {"model": "fake", "prompt": "hi", "max_tokens": max_tokens, "stream": True}


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    proc = subprocess.Popen([sys.executable, BENCH, "--fake-upstream", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 30, lambda: "")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overload")
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config(upstream, str(tmp), overload={"max_open_requests": 2, "retry_after_s": 2},
                                      admin_api_key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest())))
    g = GatewayProcess(str(path))
    wait_until(lambda: httpx.get(f"{g.base_url}/health", timeout=5).json()["models"]["fake"]["healthy"] == 1,
               what="the upstream healthy")
    yield g
    g.stop()


class Held:
    """A stream the client holds open after its first event (the upstream would go on for max_tokens seconds);
    close() leaves mid-stream."""

    def __init__(self, gw: GatewayProcess, who: str = "a", max_tokens: int = 300) -> None:
        self.client = httpx.Client(timeout=30, trust_env=False)
        self.cm = self.client.stream("POST", f"{gw.base_url}/v1/completions", json=body(max_tokens),
                                     headers={"authorization": f"Bearer {KEYS[who]}"})
        r = self.cm.__enter__()
        assert r.status_code == 200, r.read()
        self.lines = r.iter_lines()
        assert next(line for line in self.lines if line.startswith("data: {"))

    def finish(self) -> list[str]:
        rest = list(self.lines)
        self.close()
        return rest

    def close(self) -> None:
        if not self.client.is_closed:
            self.cm.__exit__(None, None, None)
            self.client.close()


def post(gw: GatewayProcess, payload, who: str = "a", **kw) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/completions", content=payload if isinstance(payload, bytes) else None,
                      json=None if isinstance(payload, bytes) else payload,
                      headers={"authorization": f"Bearer {KEYS.get(who, who)}"}, timeout=30, **kw)


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    try:
        return gw.metric(name, **labels)
    except KeyError:  # a labelled series not created yet
        return 0.0


def open_requests(gw: GatewayProcess) -> float:
    return metric(gw, "conveyor_gateway_open_requests")


def idle(gw: GatewayProcess) -> bool:
    return open_requests(gw) == 0 and metric(gw, "conveyor_gateway_concurrency_slots", tenant_class="interactive") == 0


def test_the_request_over_the_limit_is_refused_at_once_while_health_and_metrics_answer(gw):
    held = [Held(gw), Held(gw)]
    try:
        assert open_requests(gw) == 2
        before = metric(gw, "conveyor_gateway_rejections_total", reason="overloaded_open_requests")
        r = post(gw, body(1))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2" and r.headers["connection"] == "close"
        error = r.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("service_unavailable", "gateway_overloaded", None)
        assert httpx.get(f"{gw.base_url}/health", timeout=5).status_code == 200
        assert metric(gw, "conveyor_gateway_rejections_total", reason="overloaded_open_requests") == before + 1
        assert metric(gw, "conveyor_gateway_max_open_requests") == 2
        held[1].close()  # a client leaves mid-stream
        wait_until(lambda: open_requests(gw) == 1, what="the stream left mid-way no longer open")
    finally:
        for h in held:
            h.close()
    wait_until(lambda: idle(gw), what="no open request after the clients left")
    rest = Held(gw, max_tokens=1).finish()  # a new request passes once there is room, and runs to its end
    assert "data: [DONE]" in rest
    wait_until(lambda: idle(gw), what="no open request after a stream ended")


def test_the_admin_api_is_served_while_the_gateway_is_overloaded(gw, upstream):
    held = [Held(gw), Held(gw)]
    try:
        assert post(gw, body(1)).status_code == 503
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        extra = {"model": "fake", "url": "http://127.0.0.1:9"}
        r = httpx.post(f"{gw.base_url}/admin/replicas", json=extra, headers=admin, timeout=10)
        assert r.status_code == 200, r.text
        urls = [x["url"] for x in httpx.get(f"{gw.base_url}/admin/replicas", headers=admin,
                                            timeout=10).json()["models"]["fake"]]
        assert sorted(urls) == sorted([upstream, extra["url"]])
        assert httpx.request("DELETE", f"{gw.base_url}/admin/replicas", json=extra, headers=admin,
                             timeout=10).status_code == 200
        # without the admin key: its own 401, not the overload's 503
        assert httpx.get(f"{gw.base_url}/admin/replicas", timeout=10).status_code == 401
        assert open_requests(gw) == 2  # admin calls are not counted among the open requests
    finally:
        for h in held:
            h.close()
    wait_until(lambda: idle(gw), what="no open request after the clients left")


def test_requests_refused_for_other_reasons_hold_nothing(gw):
    cap = Held(gw, "cap")
    try:
        assert post(gw, body(1), "cap").status_code == 429  # its tenant's max_concurrent
        assert post(gw, body(1), "wrong-key").status_code == 401
        assert post(gw, b"{not json").status_code == 400
        assert post(gw, {**body(1), "max_tokens": -1}).status_code == 400
        assert httpx.get(f"{gw.base_url}/v1/nowhere", timeout=5).status_code == 404
        assert httpx.put(f"{gw.base_url}/v1/completions", timeout=5).status_code == 405
        assert open_requests(gw) == 1
    finally:
        cap.close()
    wait_until(lambda: idle(gw), what="no open request after refusals")
    both = [Held(gw), Held(gw)]  # the whole limit is free again
    for h in both:
        h.close()
    wait_until(lambda: idle(gw), what="no open request at the end")


async def stall(times: int, seconds: float = 0.25) -> None:
    """Block the running loop `times` times, letting it turn once in between (its lag timer then fires, late)."""
    for _ in range(times):
        time.sleep(seconds)
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def test_the_lag_monitor_sees_a_loop_blocked_by_a_callback():
    async def run() -> tuple:
        overload = Overload(parse_config(config("http://127.0.0.1:9", "/tmp")).overload, 1024)
        overload.max_lag_s = 0.15
        mon = overload.lag
        mon.interval_s = 0.02
        overload.start()
        await asyncio.sleep(0.2)
        seen = []

        def block() -> None:  # a callback that holds the loop: the timer due meanwhile fires late
            time.sleep(0.3)
            seen.append((mon.lag, overload.refusal()))
        asyncio.get_running_loop().call_soon(block)
        await asyncio.sleep(0.01)
        once = overload.refusal()  # one stall (a GC pause, a descheduled process) refuses nothing
        await stall(2 * SUSTAINED_TICKS)  # a loop that stays behind: refused
        behind = (mon.sustained, overload.refusal())
        for _ in range(500):  # the timer runs on time again: the lag falls back, requests are admitted
            await asyncio.sleep(0.01)
            if overload.refusal() is None:
                break
        after = overload.refusal()
        overload.stop()
        return seen, once, behind, after, mon.lag
    seen, once, behind, after, stopped = asyncio.run(run())
    assert seen[0][0] >= 0.25 and seen[0][1] is None and once is None
    assert behind[0] >= 0.2 and behind[1] == EVENT_LOOP_LAG
    assert after is None and stopped == 0.0


def test_a_lagging_gateway_refuses_with_503_but_answers_health(tmp_path):
    cfg = parse_config(config("http://127.0.0.1:9", str(tmp_path), overload={"max_event_loop_lag_s": 0.1}))
    gw = Gateway(cfg)

    async def run() -> tuple:
        async with gw.app.router.lifespan_context(gw.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gw.app), base_url="http://gw") as c:
                await stall(2 * SUSTAINED_TICKS)  # the event loop stays behind
                refused = await c.post("/v1/completions", json=body(1),
                                       headers={"authorization": f"Bearer {KEYS['a']}"})
                health = await c.get("/health")
                metrics = (await c.get("/metrics")).text
        return refused, health, metrics
    refused, health, metrics = asyncio.run(run())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "gateway_overloaded"
    assert health.status_code == 200
    assert 'reason="overloaded_event_loop_lag"' in metrics
    assert gw.overload.open == 0


def test_connections_waiting_to_be_accepted_are_seen_and_refused_for():
    overload = Overload(parse_config(config("http://127.0.0.1:9", "/tmp")).overload, 1024)
    overload.max_accept_queue = 2
    before = AcceptQueue().length()  # this process's other listening sockets, if any
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        clients = [socket.create_connection(server.getsockname()) for _ in range(3)]  # the kernel completes them
        accepted: list[socket.socket] = []
        try:
            assert overload.accept_queue.length() == before + 3
            assert overload.refusal() == ACCEPT_QUEUE
            accepted = [server.accept()[0] for _ in range(3)]
            assert overload.accept_queue.length() == before
            time.sleep(ACCEPT_QUEUE_READ_S)  # refusal() reads the queue at most this often
            assert overload.refusal() is None
        finally:
            for c in clients + accepted:
                c.close()
            overload.stop()


def test_the_default_limit_comes_from_the_descriptor_limit_raised_to_its_hard_one():
    soft = raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
    assert default_max_open(20_000) == (20_000 - 1024) // 2  # two descriptors a stream, 1024 kept
    assert default_max_open(1024) == (1024 - 256) // 2  # a small limit keeps a quarter
    assert parse_config(config("http://127.0.0.1:9", "/tmp")).overload.max_open_requests is None
    assert Overload(parse_config(config("http://127.0.0.1:9", "/tmp")).overload, 20_000).max_open == 9488


@pytest.mark.parametrize("overload, error", [
    ({"max_open_requests": 0}, "overload.max_open_requests: Input should be greater than or equal to 1"),
    ({"max_event_loop_lag_s": 0}, "overload.max_event_loop_lag_s: Input should be greater than 0"),
    ({"retry_after_s": 1.5}, "overload.retry_after_s: Input should be a valid integer"),
    ({"max_accept_queue": 0}, "overload.max_accept_queue: Input should be greater than or equal to 1"),
    ({"max_lag": 1}, "overload.max_lag: unknown field"),
])
def test_bad_overload_config_is_named(overload, error):
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_config(config("http://127.0.0.1:9", "/tmp", overload=overload))
