"""The gateway's per-request and per-chunk path (issue 17): SSE passed through as the replica's bytes (Flight), the
upstream HTTP/1.1 client and its keep-alive pool (upstream.py), the read deadlines of the httptools protocol (the
same answers as the h11 one), the tenant lookup by key hash, and the new config fields.

Servers run in this process: a raw asyncio fake replica whose bytes and connections the tests control, and uvicorn
for the protocols and the gateway."""
from __future__ import annotations

import asyncio
import hashlib
import json
import random

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from server_process import free_port

from conveyor.gateway import upstream
from conveyor.gateway.app import Gateway
from conveyor.gateway.auth import find_tenant
from conveyor.gateway.config import ConfigError, parse_config
from conveyor.gateway.proxy import Flight
from conveyor.http_limits import event_loop, timed_h11, timed_http, timed_httptools

KEY = "passthrough-key"


def run(coro):
    return asyncio.run(coro)


# ---- SSE pass-through (Flight) -----------------------------------------------------------------------------------
def sse_stream(n: int, usage: bool = True) -> bytes:
    """A replica's stream as vLLM writes it with include_usage: `"usage": null` last in each event."""
    base = '"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"'
    events = [f'data: {{{base}, "choices": [{{"index": 0, "text": "t{i}"}}], "usage": null}}' for i in range(n)]
    events.append('data: {"id": "cmpl-1", "text": "data: [DONE] is not the end", "usage": null}')
    if usage:
        events.append(f'data: {{{base}, "choices": [], "usage": {{"prompt_tokens": 2, "completion_tokens": {n}, '
                      f'"total_tokens": {n + 2}}}}}')
    events.append("data: [DONE]")
    return "".join(e + "\n\n" for e in events).encode()


def without_usage(stream: bytes) -> bytes:
    """What a client that did not ask for usage must get: each event without `usage`, no usage-only event."""
    out = []
    for event in stream.decode().split("\n\n")[:-1]:
        if event.startswith("data: {"):
            obj = json.loads(event[6:])
            if obj.get("choices") == [] and obj.get("usage"):
                continue
            event = event.replace(', "usage": null}', "}")
        out.append(event + "\n\n")
    return "".join(out).encode()


async def _read(flight: Flight, include_usage: bool) -> bytes:
    return b"".join([c async for c in flight.events(include_usage)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=30), st.booleans())
def test_events_pass_through_whole_whatever_the_piece_boundaries(cuts, crlf):
    stream = sse_stream(5)
    if crlf:
        stream = stream.replace(b"\n\n", b"\r\n\r\n")
    flight = Flight(stream=True)
    at = 0
    for c in sorted(set(cuts)):
        if at < c < len(stream):
            flight.push_raw(stream[at:c])
            at = c
    for piece in flight.chunks:  # only whole events are ever forwarded
        assert piece.endswith(b"\r\n\r\n" if crlf else b"\n\n")
    flight.push_raw(stream[at:])
    flight.end_raw()
    assert flight.saw_done and flight.usage == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    flight.finish()
    assert run(_read(flight, True)) == stream  # the replica's bytes, unchanged
    expected = without_usage(stream.replace(b"\r\n\r\n", b"\n\n"))
    assert run(_read(flight, False)).replace(b"\r\n\r\n", b"\n\n") == expected


def test_done_only_counts_as_an_event_and_a_last_event_needs_no_blank_line():
    flight = Flight(stream=True)
    flight.push_raw(b'data: {"text": "data: [DONE]"}\n\n')  # inside the JSON: not the end
    assert not flight.saw_done and len(flight.chunks) == 1 and flight.status == 200
    flight.push_raw(b"data: [DO")
    assert len(flight.chunks) == 1  # half an event waits
    flight.push_raw(b"NE]")
    flight.end_raw()  # the stream ended without the blank line
    assert flight.saw_done and flight.chunks[-1] == b"data: [DONE]\n\n"


def test_usage_in_an_odd_shape_is_read_and_stripped_by_parsing():
    flight = Flight(stream=True)
    flight.push_raw(b'data: {"choices": [{"text": "a"}], "usage":null}\n\n'  # compact JSON: the slow path
                    b'data: {"choices": [{"text": "b"}], "usage": {"total_tokens": 3}}\n\n'  # continuous usage
                    b"data: not json\n\n")
    assert flight.usage == {"total_tokens": 3}
    flight.finish()
    assert run(_read(flight, False)) == (b'data: {"choices": [{"text": "a"}]}\n\n'
                                         b'data: {"choices": [{"text": "b"}]}\n\ndata: not json\n\n')


# ---- the upstream client -------------------------------------------------------------------------------------------
class Replica:
    """A raw fake replica: each POST gets `answer(request_number)` (bytes, or a list of pieces with pauses); GETs an
    empty 200. Counts connections."""

    def __init__(self, answer) -> None:
        self.answer, self.requests = answer, 0
        self.posters: set[int] = set()  # connections that carried a POST (health checks come on others)

    @property
    def connections(self) -> int:
        return len(self.posters)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if not head.startswith(b"POST"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                self.requests += 1
                self.posters.add(id(writer))
                answer = self.answer(self.requests)
                for piece in answer if isinstance(answer, list) else [answer]:
                    if isinstance(piece, float):
                        await writer.drain()
                        await asyncio.sleep(piece)
                    elif piece is None:
                        writer.close()
                        return
                    else:
                        writer.write(piece)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        self.server.close()


def chunked(body: bytes, pieces: int = 3, by_event: bool = False) -> bytes:
    """A 200 with `body` in `pieces` HTTP chunks of about the same size, or (by_event) one per SSE event."""
    step = max(1, len(body) // pieces)
    parts = [e + b"\n\n" for e in body.split(b"\n\n")[:-1]] if by_event else \
        [body[i:i + step] for i in range(0, len(body), step)]
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")


def head_and_rest(response: bytes, events: int = 0) -> tuple[bytes, bytes]:
    """A chunked response cut after its head and its first `events` HTTP chunks."""
    at = response.index(b"\r\n\r\n") + 4
    for _ in range(events):
        at = response.index(b"\r\n", response.index(b"\r\n", at) + 2) + 2
    return response[:at], response[at:]


def plain(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


def client(**kw) -> upstream.Upstream:
    return upstream.Upstream(**{"max_connections": 8, "connect_timeout_s": 2, "read_timeout_s": 5,
                                "pool_timeout_s": 0.3, **kw})


def test_keep_alive_reuses_one_connection_and_bodies_arrive_whole():
    async def main():
        body = sse_stream(3)
        rep = Replica(lambda n: chunked(body) if n % 2 else plain(400, b'{"error": "bad"}'))
        url = await rep.start()
        up = client()
        for i in range(6):
            r = await up.post(url, "/v1/completions", b"{}", {"x-request-id": f"r{i}"})
            got = b"".join([p async for p in r]) if i % 2 == 0 else await r.read()
            r.close()
            assert (r.status_code, got) == ((200, body) if i % 2 == 0 else (400, b'{"error": "bad"}'))
        assert rep.connections == 1 and up.open == 1
        await up.aclose()
        await rep.stop()
    run(main())


def test_a_connection_the_replica_closes_is_never_reused():
    async def main():
        rep = Replica(lambda n: [plain(200, b"ok", b"connection: close\r\n"), None] if n == 1 else plain(200, b"ok"))
        url = await rep.start()
        up = client()
        for _ in range(3):
            r = await up.post(url, "/p", b"", {})
            assert await r.read() == b"ok"
            r.close()
            await asyncio.sleep(0.05)
        assert rep.connections == 2 and up.open == 1
        await up.aclose()
        await rep.stop()
    run(main())


def test_upstream_errors_by_kind():
    async def main():
        up = client(read_timeout_s=0.3)
        with pytest.raises(upstream.ConnectError):
            await up.post(f"http://127.0.0.1:{free_port()}", "/p", b"", {})
        cut = head_and_rest(chunked(b"x" * 30), 1)[0]
        rep = Replica(lambda n: {1: [cut, None], 2: b"NOT HTTP\r\n\r\n", 3: [b"HTTP/1.1 200 OK\r\n", 1.0]}[n])
        url = await rep.start()
        r = await up.post(url, "/p", b"", {})  # closed mid-body
        with pytest.raises(upstream.RemoteProtocolError):
            await r.read()
        r.close()
        with pytest.raises(upstream.RemoteProtocolError):  # malformed
            await up.post(url, "/p", b"", {})
        with pytest.raises(upstream.ReadTimeout):  # the head never ends
            await up.post(url, "/p", b"", {})
        with pytest.raises(ValueError):
            await up.post(url, "/p", b"", {"authorization": "Bearer x\r\nevil: 1"})
        assert up.open == 0  # every broken connection gave its place back
        await rep.stop()
    run(main())


def test_a_full_pool_waits_then_times_out_and_a_freed_place_is_taken():
    async def main():
        head, rest = head_and_rest(chunked(b"x"))
        rep = Replica(lambda n: [head, 0.6, rest])
        url = await rep.start()
        up = client(max_connections=1, pool_timeout_s=0.2)
        first = await up.post(url, "/p", b"", {})
        with pytest.raises(upstream.PoolTimeout):
            await up.post(url, "/p", b"", {})
        waiter = asyncio.create_task(up.post(url, "/p", b"", {}))
        await asyncio.sleep(0.05)
        first.close()  # cut before its end: closed, and its place goes to the waiter
        second = await waiter
        assert await second.read() == b"x"
        second.close()
        assert up.open == 1
        await up.aclose()
        await rep.stop()
    run(main())


# ---- read deadlines: the same answers from h11 and httptools -------------------------------------------------------
async def _echo(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _exchange(port: int, parts: list, read_for: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for p in parts:
        if isinstance(p, float):
            await asyncio.sleep(p)
        else:
            writer.write(p)
    got = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                got += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return got


@pytest.mark.parametrize("make", [timed_h11, timed_httptools], ids=["h11", "httptools"])
def test_slow_and_malformed_requests_get_openai_errors(make):
    timed_out = []

    async def main():
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(_echo, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                                               http=make(0.4, on_timeout=lambda: timed_out.append(1))))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        head = b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n"
        slow_head = await _exchange(port, [b"POST /x HTTP/1.1\r\nhost"])
        slow_body = await _exchange(port, [head + b"12"])
        bad = await _exchange(port, [b"GARBAGE\r\n\r\n"])
        idle = await _exchange(port, [])
        # three requests on one connection, 0.3 s apart (0.6 s in all): each response re-arms the head deadline
        req = head + b"0123456789"
        kept = await _exchange(port, [req, 0.3, req, 0.3, req], read_for=0.2)
        server.should_exit = True
        await task
        return slow_head, slow_body, bad, idle, kept

    slow_head, slow_body, bad, idle, kept = run(main())
    for got, status, code in ((slow_head, 408, "request_timeout"), (slow_body, 408, "request_timeout"),
                              (bad, 400, "invalid_http")):
        assert got.startswith(b"HTTP/1.1 %d" % status), got[:100]
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == code
    assert idle == b""  # an idle connection is closed quietly
    assert kept.count(b"HTTP/1.1 200") == 3
    assert timed_out == [1]  # only the cut-off head (the app never saw it)


def test_loop_and_parser_choice():
    assert event_loop("auto") == "uvloop" and event_loop("asyncio") == "asyncio"
    assert timed_http("auto", 1.0).__mro__[1].__name__ == "TimedHttpToolsProtocol"
    assert timed_http("h11", 1.0).__mro__[1].__name__ == "TimedH11Protocol"
    with pytest.raises(ValueError):
        timed_http("h2", 1.0)


# ---- config, auth ----------------------------------------------------------------------------------------------------
def config(url: str, **kw) -> dict:
    return {"models": [{"name": "m", "replicas": [url]}],
            "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                         "requests_per_minute": 100_000, "max_concurrent": 100}],
            "health_interval_s": 0.2, **kw}


@pytest.mark.parametrize("field, value", [("upstream_max_connections", 0), ("upstream_pool_timeout_s", 0),
                                          ("loop", "trio"), ("http", "h2")])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        parse_config(config("http://127.0.0.1:1", **{field: value}))


def test_each_of_many_tenants_is_found_by_its_key_alone():
    keys = [f"key-{i}" for i in range(2000)]
    cfg = parse_config({"models": [{"name": "m"}], "tenants": [
        {"name": f"t{i}", "api_key_sha256": hashlib.sha256(k.encode()).hexdigest()} for i, k in enumerate(keys)]})
    for i in random.Random(0).sample(range(2000), 50):
        assert find_tenant(f"Bearer {keys[i]}", cfg.tenants).name == f"t{i}"
    assert find_tenant("Bearer key-x", cfg.tenants) is None and find_tenant("Bearer ", cfg.tenants) is None


# ---- through the gateway ---------------------------------------------------------------------------------------------
async def _through_gateway(rep: Replica, scenario, **cfg) -> Gateway:
    url = await rep.start()
    gw = Gateway(parse_config(config(url, **cfg)))
    server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=free_port(), log_config=None,
                                          lifespan="on", http=timed_httptools(10)))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started and gw.pools["m"].usable():
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30,
                                     headers={"authorization": f"Bearer {KEY}"}) as c:
            await scenario(c)
    finally:
        server.should_exit = True
        await task
        await rep.stop()
    return gw


def test_a_stream_through_the_gateway_is_the_replicas_bytes_on_one_kept_connection():
    stream = sse_stream(4)
    rep = Replica(lambda n: chunked(stream, pieces=7))
    body = {"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}

    async def scenario(c: httpx.AsyncClient) -> None:
        for ask_usage in (True, False, True):
            extra = {"stream_options": {"include_usage": True}} if ask_usage else {}
            async with c.stream("POST", "/v1/completions", json={**body, **extra}) as r:
                got = await r.aread()
            assert r.status_code == 200
            assert got == (stream if ask_usage else without_usage(stream))

    run(_through_gateway(rep, scenario))
    assert rep.requests == 3 and rep.connections <= 2  # the health checks have their own client


def test_an_exhausted_upstream_pool_is_a_quick_503_upstream_busy():
    first, rest = head_and_rest(chunked(sse_stream(1), by_event=True), 1)  # the head and the first event, a pause
    rep = Replica(lambda n: [first, 1.0, rest])

    async def scenario(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "hi", "max_tokens": 1, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as held:
            assert held.status_code == 200
            busy = await c.post("/v1/completions", json={**body, "prompt": "another"})  # not coalesced
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "upstream_busy"
            await held.aread()

    gw = run(_through_gateway(rep, scenario, upstream_max_connections=1, upstream_pool_timeout_s=0.2,
                              max_retries=0))
    assert gw.concurrent == {} and gw.forwarder.upstream.open <= 1


# ---- the hot routes past FastAPI -----------------------------------------------------------------------------------
def test_hot_routes_take_only_an_exact_post_and_pass_the_rest_on():
    from starlette.responses import PlainTextResponse

    from conveyor.gateway.hot_routes import HotRoutes

    async def handler(request) -> PlainTextResponse:
        if request.url.path == "/bug":
            raise RuntimeError("a bug past the handler's guard")
        return PlainTextResponse(f"hot {request.url.path} " + (await request.body()).decode())

    async def on_error(request, e: Exception) -> PlainTextResponse:
        return PlainTextResponse(f"error {request.url.path} {e}", status_code=500)

    async def rest(scope, receive, send) -> None:  # what FastAPI would do with it
        await PlainTextResponse(f"rest {scope['method']} {scope['path']}")(scope, receive, send)

    async def call(method: str, path: str, root_path: str = "") -> bytes:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"body", "more_body": False}

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": [],
                 "query_string": b"", "scheme": "http", "server": ("t", 80)}
        await HotRoutes(rest, {"/v1/completions": handler, "/bug": handler}, on_error)(scope, receive, send)
        return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    assert run(call("POST", "/v1/completions")) == b"hot /v1/completions body"
    assert run(call("GET", "/v1/completions")) == b"rest GET /v1/completions"  # FastAPI's 405
    assert run(call("POST", "/v1/completions/")) == b"rest POST /v1/completions/"  # its redirect
    assert run(call("POST", "/v1/models")) == b"rest POST /v1/models"
    assert run(call("POST", "/v1/completions", root_path="/gw")) == b"rest POST /v1/completions"
    assert run(call("POST", "/bug")) == b"error /bug a bug past the handler's guard"


def test_the_guard_and_the_hot_routes_wrap_fastapis_whole_stack():
    """FrontedFastAPI: the front sees every request before FastAPI's server-error middleware, lifespan included."""
    from conveyor.gateway.hot_routes import FrontedFastAPI

    seen = []

    def front(stack):
        async def app(scope, receive, send):
            seen.append(scope["type"])
            await stack(scope, receive, send)
        return app
    app = FrontedFastAPI(front)
    app.add_api_route("/ok", lambda: {"ok": True}, methods=["GET"])
    stack = app.build_middleware_stack()
    assert type(stack).__name__ == "function" and seen == []

    async def get() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return (await c.get("/ok")).status_code
    assert run(get()) == 200 and seen == ["http"]


def test_event_stream_stops_when_the_client_goes_and_closes_once_however_it_ends():
    from conveyor.gateway.sse import EventStream

    async def scenario(disconnect_after: int | None, pieces: int, outside_cancel: bool = False):
        log: list[str] = []
        gone = asyncio.Event()

        async def events():
            try:
                for i in range(pieces):
                    await asyncio.sleep(0.01)
                    yield b"data: %d\n\n" % i
            finally:
                log.append("finally")

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            log.append(message.get("body", b"start").decode() or "end")
            if disconnect_after is not None and len(log) > disconnect_after:
                gone.set()

        stream = EventStream(events(), lambda: log.append("closed"), {"x-request-id": "r"})
        task = asyncio.create_task(stream({"type": "http"}, receive, send))
        if outside_cancel:
            await asyncio.sleep(0.015)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            log.append("cancelled")
        return log

    whole = run(scenario(None, 2))
    assert whole == ["start", "data: 0\n\n", "data: 1\n\n", "finally", "end", "closed"]
    cut = run(scenario(1, 100))  # gone after the first piece: the iterator is stopped, nothing more is sent
    assert cut == ["start", "data: 0\n\n", "finally", "closed"]
    early = run(scenario(0, 100))  # gone with the head: the iterator may never start, on_close still runs
    assert early[-1] == "closed" and early.count("closed") == 1 and "data: 1\n\n" not in early
    outside = run(scenario(None, 100, outside_cancel=True))  # a cancel from outside is not swallowed
    assert outside[-2:] == ["closed", "cancelled"] and "finally" in outside
