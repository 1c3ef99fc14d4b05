"""State shared by gateway processes through Redis (conveyor/gateway/shared.py): two real gateway processes, one
real redis-server, one slow fake upstream with a small capacity that records how many requests it holds at once."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from server_process import free_port, wait_until
from test_gateway_hardening import Gateway, Redis

from conveyor.gateway.admission import FairQueue, Waiter
from conveyor.gateway.shared import View, apportion, split, targets

CAP = 3  # the replica's max_in_flight_per_replica
TOKEN_S = 0.04  # the fake upstream's time per generated token
KEYS = {n: f"shared-key-{n}" for n in ("x", "a", "b", "c")}


class SlowUpstream:
    """An OpenAI-ish completions server generating one token every TOKEN_S; `peak` is the most requests it held
    at once since the last reset()."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.now = self.peak = 0
        self.server = uvicorn.Server(uvicorn.Config(self.app, port=self.port, log_level="warning", lifespan="off",
                                                    interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "the fake upstream")

    def reset(self) -> None:
        self.peak = self.now

    async def app(self, scope, receive, send) -> None:
        path = scope["path"]
        if path == "/health":
            return await _send(send, 200, b"{}")
        if path == "/v1/models":
            return await _send(send, 200, json.dumps({"data": [{"id": "m", "max_model_len": 4096}]}).encode())
        if path != "/v1/completions":
            return await _send(send, 404, b"{}")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = json.loads(body)
        self.now += 1
        self.peak = max(self.peak, self.now)
        held = [True]
        work = asyncio.ensure_future(self._generate(send, req["max_tokens"], req.get("stream", False), held))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)  # a client gone: abort it
        finally:
            work.cancel()
            gone.cancel()
            self._leave(held)

    def _leave(self, held: list[bool]) -> None:
        """Once per request, before its last bytes go (the gateway may send the next one as soon as they arrive)."""
        if held[0]:
            held[0] = False
            self.now -= 1

    async def _generate(self, send, n: int, stream: bool, held: list[bool]) -> None:
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        if not stream:
            await asyncio.sleep(n * TOKEN_S)
            self._leave(held)
            return await _send(send, 200, json.dumps({"id": "x", "object": "text_completion", "choices": [
                {"index": 0, "text": "a" * n, "finish_reason": "length"}], "usage": usage}).encode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(n):
            await asyncio.sleep(TOKEN_S)
            chunk = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "a"}], "usage": None}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        self._leave(held)
        tail = f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail.encode()})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def config(upstream: SlowUpstream, redis_port: int, **kw) -> dict:
    tenants = [{"name": n, "api_key_sha256": hashlib.sha256(k.encode()).hexdigest(), "requests_per_minute": 100_000,
                "tokens_per_minute": 100_000_000, "max_concurrent": 2 if n == "x" else 64} for n, k in KEYS.items()]
    return {"models": [{"name": "m", "replicas": [upstream.url], "max_in_flight_per_replica": CAP,
                        "max_queue": 1000}],
            "tenants": tenants, "redis_url": f"redis://127.0.0.1:{redis_port}/0", "redis_heartbeat_ttl_s": 1.0,
            "health_interval_s": 0.5, **kw}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared")
    upstream = SlowUpstream()
    redis = Redis(free_port())
    gws: list[Gateway] = []
    try:
        cfg = config(upstream, redis.port)
        with ThreadPoolExecutor(2) as ex:
            gws = list(ex.map(lambda i: Gateway(cfg, str(tmp / f"gw{i}.yaml")), range(2)))
        for g in gws:
            wait_until(lambda g=g: g.states("m") == ["healthy"], what="the replica healthy")
        yield upstream, redis, gws, tmp
    finally:
        for g in gws:
            g.stop()
        redis.stop()
        upstream.stop()


def body(n: int, stream: bool = False) -> dict:
    return {"model": "m", "prompt": "hi", "max_tokens": n, "stream": stream}


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


class OpenStream:
    """A streamed completion held open until close(): its concurrency slot stays taken."""

    def __init__(self, gw: Gateway, tenant: str) -> None:
        self.client = httpx.Client(timeout=30)
        self.cm = self.client.stream("POST", gw.url + "/v1/completions", json=body(500, stream=True),
                                     headers=auth(tenant))
        self.resp = self.cm.__enter__()
        assert self.resp.status_code == 200, self.resp.read()
        self.chunks = self.resp.iter_raw()  # kept: a dropped iterator would close the response
        next(self.chunks)  # streaming: at the replica

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def post(gw: Gateway, tenant: str, n: int = 1) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json=body(n), headers=auth(tenant), timeout=30)


def slots_in_redis(redis: Redis, tenant: str) -> dict[bytes, bytes]:
    import redis as redis_py
    return redis_py.Redis(port=redis.port).hgetall(f"conveyor:shared:slots:{tenant}")


def test_max_concurrent_holds_across_gateways_and_frees_on_release(stack):
    _, redis, (g1, g2), _ = stack
    held = [OpenStream(g1, "x"), OpenStream(g2, "x")]
    try:
        for g in (g1, g2):  # each gateway holds one of x's two slots: the third is refused on either
            r = post(g, "x")
            assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert sorted(slots_in_redis(redis, "x").values()) == [b"1", b"1"]
        held.pop(0).close()  # g1's slot comes back (released without the client waiting): g2 may take it
        wait_until(lambda: len(slots_in_redis(redis, "x")) == 1, 10, "the released slot")
        held.append(OpenStream(g2, "x"))
        assert post(g1, "x").status_code == 429
    finally:
        for s in held:
            s.close()
    wait_until(lambda: not slots_in_redis(redis, "x"), 10, "every slot back")
    assert post(g1, "x").status_code == 200


def test_a_dead_gateways_slots_are_freed_after_the_ttl(stack):
    upstream, redis, (g1, _), tmp = stack
    g3 = Gateway(config(upstream, redis.port), str(tmp / "gw3.yaml"))
    held = [OpenStream(g1, "x")]
    try:
        held.append(OpenStream(g3, "x"))
        assert post(g1, "x").status_code == 429
        os.kill(g3.proc.pid, signal.SIGKILL)  # no goodbye: its slot stays in Redis until its heartbeat is stale
        g3.proc.wait(10)
        t0 = time.monotonic()
        wait_until(lambda: post(g1, "x").status_code == 200, 10, "the dead gateway's slot freed")
        assert time.monotonic() - t0 < 5  # the TTL is 1 s
    finally:
        for s in held:
            s.close()
        g3.stop()


def _closed_loop(gw: Gateway, tenant: str, until: float, done: list) -> None:
    """Send 8-token completions back to back until `until`; append (tenant, end time, tokens) per answer."""
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < until:
            r = c.post(gw.url + "/v1/completions", json=body(8), headers=auth(tenant))
            assert r.status_code == 200, r.text
            done.append((tenant, time.monotonic(), r.json()["usage"]["total_tokens"]))


def test_three_backlogged_tenants_on_two_gateways_get_a_third_each_and_the_replica_is_not_overcommitted(stack):
    upstream, _, (g1, g2), _ = stack
    wait_until(lambda: upstream.now == 0, 10, "the upstream idle")
    upstream.reset()
    done: list = []
    t0 = time.monotonic()
    until = t0 + 7
    senders = [(g1, "a"), (g1, "c"), (g2, "b")] * 4  # 4 clients each: every tenant always has requests queued
    with ThreadPoolExecutor(len(senders)) as ex:
        for f in [ex.submit(_closed_loop, g, t, until, done) for g, t in senders]:
            f.result()
    # per-process queues would split the replica 3 + 3 (g2 alone serving b: half of all tokens) and hold 6 at once
    assert upstream.peak <= CAP, upstream.peak  # one replica: the processes' quotas never sum to more
    served = {t: sum(n for who, at, n in done if who == t and at > t0 + 1.5) for t in "abc"}
    total = sum(served.values())
    assert total > 0
    shares = {t: served[t] / total for t in "abc"}
    assert all(0.25 <= s <= 0.42 for s in shares.values()), shares  # a third each; b alone would be 0.5


def test_redis_killed_falls_back_counted_and_requests_are_answered(stack):
    upstream, redis, (g1, g2), _ = stack
    redis.stop()
    held: list[OpenStream] = []
    try:
        for g in (g1, g2):
            for _ in range(3):
                assert post(g, "x").status_code == 200  # on_error "open": each gateway's own count decides
        held = [OpenStream(g1, "x"), OpenStream(g1, "x")]
        assert post(g1, "x").status_code == 429  # max_concurrent still holds within the process
        for g in (g1, g2):
            assert g.metric("conveyor_gateway_shared_state_fallbacks_total", op="slot_acquire") >= 3
            assert g.metric("conveyor_gateway_shared_state_fallbacks_total", op="sync") >= 1
            assert g.logs().count('"shared_state_down"') == 1
        redis.proc = Redis(redis.port).proc  # back, empty: the gateways sync again and rewrite what they hold
        for g in (g1, g2):
            wait_until(lambda g=g: g.logs().count('"shared_state_recovered"') == 1, 10, "the store back")
        wait_until(lambda: list(slots_in_redis(redis, "x").values()) == [b"2"], 10, "the outage's slots counted")
        assert post(g2, "x").status_code == 429  # g2 sees the slots g1 took while Redis was down
    finally:
        for h in held:
            h.close()
    wait_until(lambda: post(g2, "x").status_code == 200, 10, "the slots back")


# ---- the split itself, in-process: syncs in a random order with views one sync old --------------------------------
def _simulate(seed: int, steps: int = 3000) -> None:
    """Three processes, a random backlog each, requests dispatched up to the quota and finishing at random; each
    sync publishes and reads as the Lua script does (Redis runs them one at a time)."""
    rng = random.Random(seed)
    cap = rng.randint(1, 12)
    gids = ["g0", "g1", "g2"]
    quota, claim, n = dict.fromkeys(gids, 0), dict.fromkeys(gids, 0), dict.fromkeys(gids, 0)
    backlog = {g: {} for g in gids}
    published: dict[str, View] = {}
    for _ in range(steps):
        g = rng.choice(gids)
        act = rng.random()
        if act < 0.4:  # sync: publish, then read the others' last published views
            published[g] = View(g, {"r": n[g]}, backlog[g], max(quota[g], claim[g]))
            views = [View(g, {"r": n[g]}, backlog[g], published[g].quota)]
            views += [v for o, v in published.items() if o != g]
            s = split(views, g, cap, quota[g], claim[g])
            quota[g], claim[g] = s.quota, s.claim
        elif act < 0.6:  # its tenants change
            backlog[g] = {c: {t: 1.0} for c, t in rng.sample([("interactive", "a"), ("interactive", "b"),
                                                             ("batch", "c")], rng.randint(0, 2))}
        elif act < 0.8 and backlog[g]:
            n[g] = max(n[g], quota[g])  # dispatches up to its quota
        else:
            n[g] = max(0, n[g] - rng.randint(0, 2))
        assert sum(quota.values()) <= cap and sum(n.values()) <= cap, (quota, n, cap)


@pytest.mark.parametrize("seed", range(20))
def test_quotas_never_sum_past_the_capacity_whatever_the_order_of_syncs(seed):
    _simulate(seed)


def test_targets_give_each_backlogged_tenant_its_weight_and_interactive_first():
    views = [View("g1", {}, {"interactive": {"a": 1.0, "x": 1.0}}), View("g2", {}, {"interactive": {"x": 1.0}}),
             View("g3", {"r": 2}, {"batch": {"c": 1.0}}), View("g4", {"r": 1}, {})]
    # a: 1, x: 1 over two processes (1/2 in each); g3's batch gets nothing new, g4 (no queue) keeps its one
    assert targets(views, 9) == {"g1": 6, "g2": 2, "g3": 0, "g4": 1}
    assert split(views, "g2", 9, 0, 0).spread == {("interactive", "a"): 2, ("interactive", "x"): 2,
                                                  ("batch", "c"): 2}
    idle = [View("g1", {"r": 1}, {}), View("g2", {}, {})]
    assert targets(idle, 5) == {"g1": 3, "g2": 2}  # the free room, split evenly
    assert apportion(4, {"a": 2.0, "b": 1.0}) == {"a": 3, "b": 1} and apportion(0, {"a": 1.0}) == {"a": 0}


def test_a_quota_grows_only_after_its_claim_is_published_and_shrinks_at_once():
    views = [View("g1", {}, {"interactive": {"a": 1.0}}, 0), View("g2", {"r": 4}, {}, 4)]
    s = split(views, "g1", 6, 0, 0)
    assert (s.quota, s.claim) == (0, 2)  # claimed, not taken yet
    s = split(views, "g1", 6, 0, 2)
    assert (s.quota, s.claim) == (2, 2)
    views[1] = View("g2", {"r": 4}, {"interactive": {"b": 1.0}}, 4)
    s = split(views, "g2", 6, 4, 4)
    assert s.quota == 3  # its target now: shrinks at once (its requests finish, it sends no new ones)


def test_the_local_queue_weighs_a_tenant_waiting_in_two_processes_by_half_and_publishes_its_backlog():
    q = FairQueue()
    for _ in range(6):
        q.push(Waiter("x", "interactive", 100, spread=2))  # x waits in another process too
        q.push(Waiter("a", "interactive", 100))
    q.push(Waiter("c", "batch", 10, weight=3.0))
    assert q.backlog() == {"interactive": {"x": 1.0, "a": 1.0}, "batch": {"c": 3.0}}
    order = [q.pop().tenant for _ in range(6)]
    assert order.count("a") == 4 and order.count("x") == 2, order  # here a gets twice x's share
    while len(q):
        q.pop()
    assert q.backlog() == {}
