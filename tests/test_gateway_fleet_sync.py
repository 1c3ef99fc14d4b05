"""Issue 17 faults: the admin-managed replica set shared by `conveyor gateway --workers 2` through Redis (a replica
added, drained or removed through one worker is served, drained or removed by both), and requests held by a replica
that went silent (SIGSTOP: no RST) — cut when the autoscaler removes it as dead (abort_in_flight), or when nothing
arrived for stream_idle_timeout_s: retried elsewhere before their first event, else ended with an error event and
[DONE]. Real processes: a redis-server, two slow fake upstreams of bench/gateway_streams.py (one event a second),
the gateway with two workers."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml
from server_process import GatewayProcess, free_port, wait_healthy, wait_until

from conveyor.gateway.app import Gateway
from conveyor.gateway.config import parse_config
from conveyor.prometheus_text import samples

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "gateway_streams.py")
KEY, ADMIN = "fleet-key", "fleet-admin"
AUTH, ADMIN_AUTH = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN}"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def fake_upstream() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, BENCH, "--fake-upstream", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 30, lambda: "")
    return proc, url


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Replica a (in the config), replica b (the autoscaler's, added through the admin API), Redis, the gateway."""
    tmp = tmp_path_factory.mktemp("fleet")
    redis_port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
    (pa, a), (pb, b) = fake_upstream(), fake_upstream()
    cfg = {"models": [{"name": "fake", "replicas": [a]}], "tenants": [{"name": "t", "api_key_sha256": sha(KEY)}],
           "admin_api_key_sha256": sha(ADMIN), "redis_url": f"redis://127.0.0.1:{redis_port}/0",
           "health_interval_s": 0.2, "batch": {"db_path": str(tmp / "batches.sqlite3")}}
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gw = GatewayProcess(str(path), "--workers", "2", env={"TMPDIR": str(tmp)})
    try:
        wait_until(lambda: metric(gw, "conveyor_gateway_workers") == 2, 60, "both workers up")
        yield {"gw": gw, "a": a, "b": b, "pb": pb, "cfg": cfg, "path": path}
    finally:
        os.kill(pb.pid, signal.SIGCONT)
        gw.stop()
        for p in (pa, pb, redis):
            p.terminate()
            p.wait(10)


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    return sum(s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items())


def admin(gw: GatewayProcess, method: str, path: str, **body) -> httpx.Response:
    r = httpx.request(method, f"{gw.base_url}/admin/replicas{path}", json={"model": "fake", **body},
                      headers=ADMIN_AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r


def listing(gw: GatewayProcess) -> dict[str, str]:
    """url → state, from whichever worker accepts the new connection."""
    r = httpx.get(f"{gw.base_url}/admin/replicas", headers=ADMIN_AUTH, timeout=10)
    return {x["url"]: x["state"] for x in r.json()["models"]["fake"]}


def settled(gw: GatewayProcess, want: dict[str, str], only: bool = True) -> None:
    """Both workers list `want` (ten listings in a row, each on a new connection, so either worker answers); only
    False: those replicas in those states, others as they may be."""
    def ok(got: dict[str, str]) -> bool:
        return got == want if only else want.items() <= got.items()
    wait_until(lambda: all(ok(listing(gw)) for _ in range(10)), 20, f"every worker listing {want}")


def events(gw: GatewayProcess, event: str) -> list[dict]:
    lines = (json.loads(line) for line in gw.logs().splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("event") == event]


def stream(gw: GatewayProcess, max_tokens: int, out: list, first: threading.Event | None = None) -> None:
    """One streamed completion on a new connection; appends (status, the data lines) to `out`."""
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{gw.base_url}/v1/completions", headers=AUTH, json={
            "model": "fake", "prompt": "hi", "max_tokens": max_tokens, "stream": True}) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if first is not None:
                    first.set()
        out.append((r.status_code, lines))


def background(gw: GatewayProcess, max_tokens: int, out: list) -> tuple[threading.Thread, threading.Event]:
    first = threading.Event()
    t = threading.Thread(target=stream, args=(gw, max_tokens, out, first), daemon=True)
    t.start()
    return t, first


def test_replicas_added_drained_and_removed_through_one_worker_apply_in_both(fleet):
    gw, a, b = fleet["gw"], fleet["a"], fleet["b"]
    admin(gw, "POST", "", url=b)
    admin(gw, "POST", "/drain", url=a)  # a config replica's drain is shared too
    settled(gw, {a: "draining", b: "healthy"})
    start = len(events(gw, "access"))
    out: list = []
    threads = [threading.Thread(target=stream, args=(gw, 1, out)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in out] == [200] * 12 and all(lines[-1] == "data: [DONE]" for _, lines in out)
    served = events(gw, "access")[start:]
    assert {e["replica"] for e in served} == {b}
    assert {e["worker"] for e in served} == {0, 1}  # both workers sent requests to the replica added through one

    admin(gw, "POST", "", url=a)  # adding a draining replica puts it back in service
    admin(gw, "DELETE", "", url=b)
    settled(gw, {a: "healthy"})
    r = httpx.request("DELETE", f"{gw.base_url}/admin/replicas", json={"model": "fake", "url": b},
                      headers=ADMIN_AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "replica_not_found"
    r = httpx.request("DELETE", f"{gw.base_url}/admin/replicas", headers=ADMIN_AUTH, timeout=10,
                      json={"model": "fake", "url": a, "abort_in_flight": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "abort_in_flight"


def streams_at_a_frozen_replica(fleet, while_frozen) -> tuple[tuple, tuple]:
    """Stream s1 under way at b, s2 waiting there for its first event, then b frozen (SIGSTOP) while
    while_frozen() runs and the streams end. a is drained first, so both went to b. Returns (status, lines) of each."""
    gw, a, b, pb = fleet["gw"], fleet["a"], fleet["b"], fleet["pb"]
    admin(gw, "POST", "", url=b)
    admin(gw, "POST", "/drain", url=a)
    settled(gw, {a: "draining", b: "healthy"})
    out1: list = []
    out2: list = []
    t1, first1 = background(gw, 20, out1)
    assert first1.wait(20)
    os.kill(pb.pid, signal.SIGSTOP)
    try:
        t2, _ = background(gw, 2, out2)
        wait_until(lambda: metric(gw, "conveyor_gateway_in_flight_requests") == 2, 10, "s2 at the frozen replica")
        admin(gw, "POST", "", url=a)
        while_frozen()
        t1.join(20)
        t2.join(20)
    finally:
        os.kill(pb.pid, signal.SIGCONT)
    return out1[0], out2[0]


def assert_cut_and_retried(s1_lines: tuple, s2_lines: tuple, why: str) -> None:
    """s1 ended with an error event naming `why` and [DONE]; s2 whole (2 events) from a, no error."""
    (s1, lines1), (s2, lines2) = s1_lines, s2_lines
    assert s1 == 200 and lines1[-1] == "data: [DONE]"
    assert why in json.loads(lines1[-2][6:])["error"]["message"]
    assert s2 == 200 and lines2[-1] == "data: [DONE]" and len(lines2) == 3
    assert not any('"error"' in line for line in lines2)


def test_a_frozen_replica_removed_as_dead_ends_its_requests_at_once(fleet):
    """b freezes; the autoscaler removes it with abort_in_flight through one worker: s1 ends with an error event and
    [DONE], s2 is served by a."""
    gw, a, b = fleet["gw"], fleet["a"], fleet["b"]
    before = metric(gw, "conveyor_gateway_upstream_cuts_total", reason="replica_dead")

    def remove_b() -> None:
        settled(gw, {a: "healthy"}, only=False)  # b's health checks fail meanwhile
        admin(gw, "DELETE", "", url=b, abort_in_flight=True)
    assert_cut_and_retried(*streams_at_a_frozen_replica(fleet, remove_b), "the replica was removed as dead")
    assert metric(gw, "conveyor_gateway_upstream_cuts_total", reason="replica_dead") == before + 2
    settled(gw, {a: "healthy"})


def test_a_stream_from_a_silent_replica_is_cut_after_stream_idle_timeout_s(fleet):
    """No autoscaler this time: b freezes and stays in the pool. Past stream_idle_timeout_s s1 (under way) ends with
    an error event and [DONE], s2 (no event yet) is retried on a."""
    gw = fleet["gw"]
    fleet["path"].write_text(yaml.safe_dump({**fleet["cfg"], "stream_idle_timeout_s": 3}))
    reloads = len(events(gw, "config_reloaded"))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(gw, "config_reloaded")) == reloads + 2, 20, "both workers reloaded")
    before = metric(gw, "conveyor_gateway_upstream_cuts_total", reason="idle_timeout")
    assert_cut_and_retried(*streams_at_a_frozen_replica(fleet, lambda: None),
                           "nothing arrived from the replica for 3 s")
    assert metric(gw, "conveyor_gateway_upstream_cuts_total", reason="idle_timeout") == before + 2


def test_an_admin_change_is_refused_while_redis_is_unreachable():
    """Applied here but unknown to the other processes it would split the fleet: refused, nothing changed."""
    async def go() -> None:
        cfg = parse_config({"models": [{"name": "fake", "replicas": []}], "admin_api_key_sha256": sha(ADMIN),
                            "tenants": [{"name": "t", "api_key_sha256": sha(KEY)}],
                            "redis_url": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens there
        gw = Gateway(cfg)
        gw.apply(cfg)
        gw._share(cfg)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw",
                                         headers=ADMIN_AUTH) as c:
                r = await c.post("/admin/replicas", json={"model": "fake", "url": "http://127.0.0.1:9"})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "shared_state_unavailable"
                assert gw.pools["fake"].replicas == {}
        finally:
            await gw.shared.close()
            await gw.client.aclose()
            gw.cpu.shutdown()

    asyncio.run(go())
