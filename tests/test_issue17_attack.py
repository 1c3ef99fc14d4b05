"""Faults found attacking issue 17's work as a new user would (helper A): each test failed before its fix."""
from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn
from server_process import free_port

from conveyor.http_limits import timed_h11, timed_httptools


def run(coro):
    return asyncio.run(coro)


async def _ok(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


# ---- huge request heads: httptools (the default parser) buffered any size -------------------------------------------
@pytest.mark.parametrize("make, status", [(timed_h11, 400), (timed_httptools, 431)], ids=["h11", "httptools"])
def test_a_huge_request_head_is_refused_and_not_buffered(make, status):
    """A client streaming header lines (or one endless header value) fast, within the head deadline: refused with
    OpenAI's error JSON and the connection closed once the head passes ~16 KiB, not held in memory."""
    async def send_head(port: int, head: bytes, then: bytes, n: int) -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        sent = 0
        try:
            for _ in range(n):
                writer.write(then)
                sent += len(then)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        got = b""
        try:
            async with asyncio.timeout(3):
                while chunk := await reader.read(65536):
                    got += chunk
        except (TimeoutError, ConnectionError):
            pass
        writer.close()
        return got, sent

    async def main():
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(_ok, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                                               http=make(10)))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        fine = await send_head(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-a: " + b"a" * 8000, b"",
                               0)
        lines = await send_head(port, b"GET / HTTP/1.1\r\nhost: x\r\n", b"x-a: " + b"a" * 4000 + b"\r\n", 5000)
        value = await send_head(port, b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ", b"a" * 4000, 5000)
        server.should_exit = True
        await task
        return fine, lines, value

    fine, lines, value = run(main())
    assert fine[0].startswith(b"HTTP/1.1 200"), fine[0][:100]
    for got, sent in (lines, value):
        assert sent < 4 << 20  # the connection was closed long before the 20 MB were sent
        if got:  # else the close reset the connection (unread bytes) before the client read the answer
            assert got.startswith(b"HTTP/1.1 %d" % status), got[:100]
            assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


# ---- a replica's stream whose event never ends: held whole, and re-scanned per piece (quadratic) -------------------
def test_an_event_without_end_from_the_replica_is_bounded():
    """Past MAX_EVENT_BYTES without an event's end the replica's stream is malformed: RemoteProtocolError (the proxy
    retries it elsewhere, or cuts the stream with an error event), not a buffer that grows for as long as the
    replica sends (it was also joined and searched again per piece: 31 MiB took 19 s of the event loop)."""
    from conveyor.gateway.proxy import MAX_EVENT_BYTES, Flight
    from conveyor.gateway.upstream import RemoteProtocolError

    flight = Flight(stream=True)
    flight.push_raw(b'data: {"a": 1}\n\ndata: {"b": ')
    piece = b"x" * 65536
    with pytest.raises(RemoteProtocolError, match="event"):
        for _ in range(MAX_EVENT_BYTES // len(piece) + 2):
            flight.push_raw(piece)
    assert flight.chunks == [b'data: {"a": 1}\n\n']

    big = Flight(stream=True)  # a large event in many pieces, its end split across two of them, comes out whole
    event = b'data: {"t": "' + b"y" * (MAX_EVENT_BYTES // 2) + b'"}'
    pieces = [event[i:i + 65536] for i in range(0, len(event), 65536)] + [b"\r\n", b"\r\ndata: [DONE]\n", b"\n"]
    for p in pieces:
        big.push_raw(p)
    assert big.chunks == [event + b"\r\n\r\n", b"data: [DONE]\n\n"] and big.saw_done


# ---- redis_url: checked when the config loads, never echoed ----------------------------------------------------------
@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:notaport/0", "redis://:hunter2@[bad/0",
                                 "redis://:hunter2@h:99999/0", "http://:hunter2@h/0", "redis://:hu/nter2@h/0"])
def test_a_bad_redis_url_is_a_config_error_that_does_not_show_its_password(url):
    """A redis_url the Redis client cannot parse crashed each gateway process with a traceback when it built its
    clients (with --workers N, a restart loop, a worker at a time); the pattern's error printed the URL, password
    and all."""
    from conveyor.gateway.config import ConfigError, parse_config

    base = {"models": [{"name": "m", "replicas": ["http://127.0.0.1:1"]}],
            "tenants": [{"name": "t", "api_key_sha256": "0" * 64}]}
    with pytest.raises(ConfigError, match="redis_url") as e:
        parse_config({**base, "redis_url": url})
    assert "hunter2" not in str(e.value) and "hu/" not in str(e.value)
    for good in ("redis://:hunter2@127.0.0.1:6379/0", "rediss://u:p@h", "unix:///tmp/redis.sock"):
        assert parse_config({**base, "redis_url": good}).redis_url == good


# ---- the upstream pool: a waiter woken as it is cancelled took the wake-up with it ----------------------------------
def test_room_handed_to_a_waiter_that_is_cancelled_goes_to_the_next_one():
    """Two requests wait for the one upstream connection; it is freed and the first waiter's client leaves in the
    same turn of the loop. The room must go to the second waiter, not be lost (it waited out its pool timeout and
    got 503 upstream_busy with the pool free)."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_gateway_passthrough import Replica, client, head_and_rest, chunked

    from conveyor.gateway import upstream

    async def main():
        head, rest = head_and_rest(chunked(b"x"))
        rep = Replica(lambda n: [head, 0.2, rest])
        url = await rep.start()
        up = client(max_connections=1, pool_timeout_s=1.5)
        first = await up.post(url, "/p", b"", {})
        a = asyncio.create_task(up.post(url, "/p", b"", {}))
        b = asyncio.create_task(up.post(url, "/p", b"", {}))
        await asyncio.sleep(0.05)  # both wait for room
        first.close()  # cut before its end: its place goes to the first waiter...
        a.cancel()  # ...whose client leaves before it runs
        try:
            second = await b
        except upstream.PoolTimeout:
            pytest.fail("the freed connection was lost with the cancelled waiter")
        assert await second.read() == b"x"
        second.close()
        with pytest.raises(asyncio.CancelledError):
            await a
        await up.aclose()
        await rep.stop()
    run(main())


# ---- shared state: a sync that fails every time froze the quotas (0 at start: the model locked out) -----------------
@pytest.mark.parametrize("fault", ["peer_view", "split_raises"])
def test_a_peer_view_that_does_not_parse_does_not_lock_the_model_out(fault, monkeypatch):
    """Another process (an older or newer gateway in a rolling deploy, or a stray writer) publishes a view of the
    model this process cannot read: every sync failed before applying any split, so the quota set at start (0)
    stayed, and every request to the model waited in the queue until it timed out. A failing sync now falls back
    as when Redis is unreachable (a share of the capacity, counted)."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import redis as redis_py
    from test_gateway_hardening import Redis
    from test_gateway_passthrough import Replica, _through_gateway, chunked, sse_stream

    server = Redis(free_port())
    try:
        r = redis_py.Redis(port=server.port)
        now = float(r.time()[0])
        r.zadd("conveyor:shared:live", {"stranger": now + 3600})
        r.hset("conveyor:shared:queue:m", "stranger", json.dumps({"format": 2}))
        if fault == "split_raises":  # whatever else makes every sync fail (a bug): the fallback, not a frozen 0
            from conveyor.gateway import shared

            def broken(*a, **kw):
                raise RuntimeError("a bug in the split")
            monkeypatch.setattr(shared, "split", broken)
        rep = Replica(lambda n: chunked(sse_stream(2)))

        async def scenario(c) -> None:
            resp = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                timeout=5)
            assert resp.status_code == 200, resp.text

        gw = run(_through_gateway(rep, scenario, redis_url=f"redis://127.0.0.1:{server.port}/0",
                                  cold_start_timeout_s=3.0))
        assert gw.pools["m"].quota  # a share of the capacity, not the 0 it started with
    finally:
        server.stop()


# ---- --log-level: a traceback for a level that does not exist ----------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_an_unknown_log_level_is_one_line_and_exit_2(command, capsys):
    from conveyor.cli import build_parser

    extra = ["--model", "demo"] if command == "serve" else ["--config", "gw.yaml"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, *extra, "--log-level", "bogus"])
    assert e.value.code == 2 and "--log-level" in capsys.readouterr().err
    assert build_parser().parse_args([command, *extra, "--log-level", "DEBUG"]).log_level == "debug"


# ---- the supervisor: a stop signal while it starts the workers ---------------------------------------------------------
def test_a_stop_signal_while_the_workers_start_starts_no_more(tmp_path, monkeypatch):
    """SIGTERM arriving between two workers' starts: the ones after it were still started, got no SIGTERM, and the
    supervisor waited STOP_TIMEOUT_S (20 s) before it SIGKILLed them."""
    import signal

    from conveyor.gateway import workers

    sup = _supervisor(tmp_path, "import time; time.sleep(60)", workers=3)
    real = workers.Supervisor._start

    def start(self, slot):
        real(self, slot)
        if slot.index == 0:  # as if SIGTERM came right after the first worker started
            self._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(workers.Supervisor, "_start", start)
    assert _run_supervisor(sup, give_up_after_s=30) == 0
    assert [slot.proc is not None for slot in sup.slots] == [True, False, False]


# ---- shared slots: a release racing the rewrite of a dirty tenant's field left a slot counted for good ---------------
def test_a_release_during_the_rewrite_of_a_dirty_field_is_not_lost():
    """A tenant's field is dirty (an acquire whose client left mid-call, a Redis hiccup); the next sync rewrites it
    to what the process holds. A release whose decrement reached Redis before that rewrite (the rewrite's
    connection slower) was overwritten by the older count, and the tenant's field was marked clean: one slot counted
    for ever, and with max_concurrent 1 the tenant refused in every process until this one restarted."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import redis as redis_py
    from test_gateway_hardening import Redis

    from conveyor.gateway.shared import SharedState

    server = Redis(free_port())

    async def main():
        st = SharedState(f"redis://127.0.0.1:{server.port}/0", 3.0, 0.1, lambda: {}, lambda op: None)
        assert await st.take_slot("t", 1) is True
        st.dirty.add("t")  # as after an acquire cancelled mid-call
        call = st._call

        async def slow(script, keys, args, op):  # the rewrite's round trip is the slow one
            if op == "sync":
                await asyncio.sleep(0.1)
            return await call(script, keys, args, op)
        st._call = slow
        rewrite = asyncio.create_task(st._resync())
        await asyncio.sleep(0.02)  # it read the count (1) and is on its way
        st.release_slot("t")  # the request ends: its decrement arrives first
        await rewrite
        st._call = call
        await st._resync()  # a later sync: rewrites the field again if it may still be wrong
        field = redis_py.Redis(port=server.port).hget("conveyor:shared:slots:t", st.gid)
        assert field in (None, b"0"), field
        assert await st.take_slot("t", 1) is True  # not locked out
        st.release_slot("t")
        await st.close()

    try:
        run(main())
    finally:
        server.stop()


# ---- the supervisor: a worker that crashes before it serves was restarted for ever ------------------------------------
def _supervisor(tmp_path, code: str, workers: int = 2):
    """A Supervisor whose worker processes run `code` (python -c) instead of the gateway."""
    import sys

    import yaml

    from conveyor.cli import build_parser
    from conveyor.gateway import workers as w

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "replicas": ["http://127.0.0.1:1"]}],
                                   "tenants": [{"name": "t", "api_key_sha256": "0" * 64}],
                                   "redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                   "batch": {"db_path": str(tmp_path / "b.sqlite3")}}))
    a = build_parser().parse_args(["gateway", "--config", str(cfg), "--workers", str(workers), "--port", "0"])
    (tmp_path / "metrics").mkdir()
    sup = w.Supervisor(a, w.listen("127.0.0.1", 0), str(tmp_path / "metrics"))
    sup._command = lambda slot: [sys.executable, "-c", code]
    return sup


def _run_supervisor(sup, give_up_after_s: float) -> int:
    """sup.run() in this (the main) thread; SIGTERM'd as by a person after give_up_after_s."""
    import signal
    import threading

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    timer = threading.Timer(give_up_after_s, sup._on_signal, (signal.SIGTERM, None))
    timer.start()
    try:
        return sup.run()
    finally:
        timer.cancel()
        for s, h in saved.items():
            signal.signal(s, h)
        for slot in sup.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
        sup.sock.close()


def test_a_worker_that_crashes_before_serving_ends_the_gateway(tmp_path, monkeypatch):
    """A worker whose every start dies with a traceback (exit 1, not the 2/3 of a refused config) was restarted for
    ever while the supervisor's socket kept accepting connections no worker served: clients hung. Now START_ATTEMPTS
    such exits in a row end the gateway with exit 1 and one line saying why."""
    from conveyor.gateway import workers as w

    monkeypatch.setattr(w, "RESTART_BASE_S", 0.01)
    monkeypatch.setattr(w, "RESTART_MAX_S", 0.05)
    sup = _supervisor(tmp_path, "raise RuntimeError('broken at start')")
    assert _run_supervisor(sup, give_up_after_s=20) == 1
    assert sup.error is not None and "\n" not in sup.error
    assert "exited before serving 5 times in a row (last exit status 1)" in sup.error
    assert max(s.restarts for s in sup.slots) == w.START_ATTEMPTS - 1


def test_a_worker_that_served_and_crashes_is_restarted(tmp_path, monkeypatch):
    """A worker that said it serves (its readiness byte) and then exits is restarted, however often."""
    from conveyor.gateway import workers as w

    monkeypatch.setattr(w, "RESTART_BASE_S", 0.01)
    monkeypatch.setattr(w, "RESTART_MAX_S", 0.05)
    code = ("import json, os; spec = json.loads(os.environ['CONVEYOR_GATEWAY_WORKER']); "
            "os.write(spec['ready_fd'], b'1'); raise SystemExit(1)")
    sup = _supervisor(tmp_path, code, workers=2)
    real = w.Supervisor._start

    def start(self, slot):
        real(self, slot)
        if slot.restarts == 2 * w.START_ATTEMPTS:  # restarted well past the limit for ones that never served
            self._on_signal(__import__("signal").SIGTERM, None)
    monkeypatch.setattr(w.Supervisor, "_start", start)
    assert _run_supervisor(sup, give_up_after_s=20) == 0
    assert sup.error is None and max(s.restarts for s in sup.slots) == 2 * w.START_ATTEMPTS
    assert all(s.ready_fd is None for s in sup.slots)


# ---- a replica's whole (non-stream) body was read with no bound ------------------------------------------------------
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_replica_body_past_the_limit_is_a_502_and_its_connection_dropped(declared, monkeypatch):
    """A replica answering a non-stream request with an endless body (or declaring a huge one): the gateway held all
    of it in memory. Past MAX_RESPONSE_BYTES: 502 in OpenAI's JSON, the connection dropped, nothing held; retried
    on another replica as any failure after the request was sent (here the one replica: 2 deliveries, then 502)."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_gateway_passthrough import Replica, _through_gateway

    from conveyor.gateway import proxy

    limit = 1 << 20
    monkeypatch.setattr(proxy, "MAX_RESPONSE_BYTES", limit)
    piece = b"x" * 65536
    if declared:  # says 1 GiB, then sends slowly: refused on its head, not after reading
        answer = [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (1 << 30), piece, 30.0]
    else:  # chunked with no end
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        answer = [head] + [b"%x\r\n%s\r\n" % (len(piece), piece), 0.001] * (4 * limit // len(piece)) + [30.0]
    rep = Replica(lambda n: answer)

    async def scenario(c) -> None:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "upstream_failed" and f"larger than {limit} bytes" in err["message"]
        ok = await c.get("/metrics")  # the gateway is still fine
        assert ok.status_code in (200, 401)

    gw = run(_through_gateway(rep, scenario, max_retries=3))
    assert rep.requests == proxy.MAX_FAILED_DELIVERIES
    assert gw.forwarder.upstream.open == 0  # each connection dropped, none kept


# ---- SSE without the optional space after "data:" ----------------------------------------------------------------------
def _compact_stream() -> bytes:
    """A replica's stream with no space after "data:" (valid SSE), usage as compact JSON, CRLF in one place."""
    return (b'data:{"id":"c","choices":[{"index":0,"text":"a"}],"usage":null}\n\n'
            b'data:{"id":"c","choices":[{"index":0,"text":"data:[DONE]"}],"usage":null}\r\n\r\n'
            b'data:{"id":"c","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}\n\n'
            b"data:[DONE]\n\n")


def test_events_without_the_space_after_data_are_understood():
    """`data:[DONE]` did not end the stream (the gateway cut it: "stream ended without [DONE]"), and `data:{...}`
    usage events were neither read (the fair queue's charge, the usage metrics) nor dropped for a client that did not
    ask for usage."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_gateway_passthrough import _read

    from conveyor.gateway.proxy import Flight

    flight = Flight(stream=True)
    stream = _compact_stream()
    flight.push_raw(stream[:90])
    flight.push_raw(stream[90:])
    assert flight.saw_done and flight.usage == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    flight.finish()
    assert run(_read(flight, True)) == stream  # passed on as it came
    plain = run(_read(flight, False))
    assert b'"usage"' not in plain and plain.endswith(b"data:[DONE]\n\n")
    events = [e for e in plain.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    assert [json.loads(e[5:])["choices"][0]["text"] for e in events[:-1]] == ["a", "data:[DONE]"]

    inside = Flight(stream=True)  # the marker inside a text, or with a second space, is not the end
    inside.push_raw(b'data:{"text":"x\\ndata:[DONE]"}\n\ndata:  [DONE]\n\n')
    assert not inside.saw_done


def test_a_stream_ended_by_data_colon_done_passes_the_gateway_whole():
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_gateway_passthrough import Replica, _through_gateway, chunked

    stream = _compact_stream()
    rep = Replica(lambda n: chunked(stream, pieces=4))

    async def scenario(c) -> None:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True}
        for extra, expect_usage in (({"stream_options": {"include_usage": True}}, True), ({}, False)):
            async with c.stream("POST", "/v1/completions", json={**body, **extra}) as r:
                got = await r.aread()
            assert r.status_code == 200
            assert got.endswith(b"data:[DONE]\n\n") and b"error" not in got, got
            assert (b'"total_tokens":4' in got) is expect_usage

    run(_through_gateway(rep, scenario))
    assert rep.requests == 2  # not retried, not cut


# ---- a client leaving as its flight leaves the queue was kept waiting (helper B) ---------------------------------------
def test_a_client_leaving_as_its_flight_is_dispatched_is_let_go():
    """The handler waits for its flight in its own task, which the disconnect watcher cancels. asyncio.wait_for
    (Python 3.11) swallowed that cancel when the client left in the same loop turn as its flight left the queue:
    the departed client then held its slot and kept the flight alive until the first event (a whole generation
    for a non-stream request), and the task kept a cancel request that nothing delivered. Any other awaitable that
    swallows a cancel is caught too: the client is let go, the task's cancel count balanced."""
    import time

    from starlette.requests import Request

    from conveyor.gateway.app import Ctx, _client_wait, _until_disconnect
    from conveyor.gateway.proxy import Flight

    async def leave_as(start, wake) -> tuple[object, int]:
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        task = asyncio.create_task(_until_disconnect(request, start()))
        for _ in range(3):
            await asyncio.sleep(0)
        wake()
        gone.set()  # the same loop turn
        got = await asyncio.wait_for(asyncio.shield(task), 2)
        return got, task.cancelling()

    async def scenario() -> None:
        flight = Flight(stream=True)  # no event ever comes
        ctx = Ctx(rid="r", started=time.monotonic(), deadline=time.monotonic() + 30)  # queued with a deadline
        assert await leave_as(lambda: _client_wait(ctx, flight, True), flight.dispatched.set) == (None, 0)

        fut = asyncio.get_running_loop().create_future()

        async def stubborn() -> str:  # ends normally however it is cancelled
            try:
                await fut
            except asyncio.CancelledError:
                pass
            return "late"
        assert await leave_as(stubborn, lambda: None) == (None, 0)

    run(scenario())


# ---- a stream whose replica sent [DONE], then stalled or dropped the connection, got an error after its end -------
@pytest.mark.parametrize("then", ["stall", "close"])
def test_a_stream_that_had_the_replicas_done_is_not_cut_after_it(then):
    """The replica sends every event and `data: [DONE]`, then stalls past stream_idle_timeout_s (or drops the
    connection) before the end of its chunked body: the client got an error event and a second `data: [DONE]` after
    the end, the request counted as a 502 stream error, and the flight as incomplete (an Idempotency-Key retry ran
    the generation again). The response was whole: it ends as it is."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_gateway_passthrough import Replica, _through_gateway, sse_stream

    stream = sse_stream(2)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    events = b"%x\r\n%s\r\n" % (len(stream), stream)
    rep = Replica(lambda n: [head, events] + ([1.0, b"0\r\n\r\n"] if then == "stall" else [0.05, None]))
    body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}

    async def scenario(c) -> None:
        for _ in range(2):  # the second: replayed by its Idempotency-Key, not generated again
            async with c.stream("POST", "/v1/completions", json=body, headers={"idempotency-key": "k"}) as r:
                assert r.status_code == 200 and await r.aread() == stream

    gw = run(_through_gateway(rep, scenario, stream_idle_timeout_s=0.3))
    assert rep.requests == 1 and gw.concurrent == {}
