"""Requests to the replicas: an HTTP/1.1 client for the gateway's one kind of call (POST a JSON body, read the
response as it arrives) over one pool of kept-alive connections.

Why not httpx here: its pool (httpcore) walks every pooled connection, polling each idle socket, whenever a request
starts or ends, so with thousands of streams open each request pays thousands of checks. Here a connection learns
that it was closed from its transport (connection_lost), each origin keeps its idle connections in a LIFO deque, and
taking or returning one is O(1). Responses are parsed by httptools (C); a body is read as the raw pieces that
arrived (chunked encoding removed), which the proxy forwards without re-framing.

Errors, all `UpstreamError`: `ConnectError` (refused, unreachable; `ConnectTimeout` past connect_timeout_s): the
request never left; `PoolTimeout`: no connection could be had within pool_timeout_s (every one of
max_connections busy); `RemoteProtocolError` (the replica closed the connection or sent malformed HTTP) and
`ReadTimeout` (nothing arrived for read_timeout_s) once the request may have been sent.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 4.0  # an idle connection is reused within this; replicas' uvicorn closes them after 5 s


class UpstreamError(Exception):
    pass


class ConnectError(UpstreamError):
    pass


class ConnectTimeout(ConnectError):
    pass


class PoolTimeout(UpstreamError):
    pass


class RemoteProtocolError(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class _Conn(asyncio.Protocol):
    """One connection; one request at a time. Parser callbacks fill `pieces`; the reader waits on `_waiter`."""

    def __init__(self, pool: Upstream, origin: tuple) -> None:
        self.pool, self.origin = pool, origin
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = self.dropped = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = self.complete = self.keep_alive = False
        self.pieces: list[bytes] = []
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(RemoteProtocolError(f"the replica sent malformed HTTP: {e}"))
            self.transport.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop()
        if not self.complete and self.error is None:
            self.error = RemoteProtocolError("the replica closed the connection")
        self._wake()

    # ---- httptools callbacks ----
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status, self.head_done = self.parser.get_status_code(), True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete, self.keep_alive = True, self.parser.should_keep_alive()
        self._stop_timer()

    # ---- the request ----
    def send(self, data: bytes, read_timeout_s: float) -> None:
        self._reset()
        self._last_read = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(read_timeout_s, self._check_read, read_timeout_s)
        self.transport.write(data)

    async def wait(self) -> None:
        """Until something new arrived (a piece, the head, the end, an error)."""
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error

    def _check_read(self, timeout: float) -> None:
        """One timer per request, re-armed for what is left: no timer work per piece that arrives."""
        self._timer = None
        if self.complete or self.closed:
            return
        left = self._last_read + timeout - time.monotonic()
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._check_read, timeout)
            return
        self._fail(ReadTimeout(f"nothing arrived from the replica for {timeout:g} s"))
        self.transport.abort()
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> None:
        """Give back this connection's place in the pool, once."""
        if not self.dropped:
            self.dropped = True
            self.pool._dropped()

    def abort(self) -> None:
        self._stop_timer()
        self._drop()
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Response:
    """A replica's response: status_code and headers (lower-case names) once the head is in; the body through
    read() or `async for piece in response`; close() hands the connection back (or closes it) — always call it."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status_code, self.headers = conn.status, conn.headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        c = self._conn
        while True:
            if c.pieces:
                out = c.pieces[0] if len(c.pieces) == 1 else b"".join(c.pieces)
                c.pieces.clear()
                yield out
            elif c.complete:
                return
            elif c.error is not None:
                raise c.error
            else:
                await c.wait()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    def close(self) -> None:
        c = self._conn
        if c.complete and c.keep_alive and not c.closed and not c.pieces:
            c.pool._release(c)
        else:
            c.abort()


class Upstream:
    """The pool: at most max_connections open at once over all replicas, idle ones kept alive for KEEPALIVE_S."""

    def __init__(self, max_connections: int, connect_timeout_s: float, read_timeout_s: float,
                 pool_timeout_s: float) -> None:
        assert max_connections >= 1 and connect_timeout_s > 0 and read_timeout_s > 0 and pool_timeout_s > 0
        self.max_connections, self.connect_timeout_s = max_connections, connect_timeout_s
        self.read_timeout_s, self.pool_timeout_s = read_timeout_s, pool_timeout_s
        self.open = 0  # connections open or opening
        self._idle: dict[tuple, deque[_Conn]] = {}
        self._waiters: deque[asyncio.Future] = deque()
        self._origins: dict[str, tuple] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST body to base_url + path; returns once the response head is in. `headers` must not hold host or
        content-length. Raises UpstreamError (see the module doc); ValueError for a header value with CR or LF."""
        origin = self._origin(base_url)
        lines = [f"POST {path} HTTP/1.1\r\nhost: {origin[3]}\r\ncontent-length: {len(body)}\r\n"]
        for k, v in headers.items():
            if "\r" in v or "\n" in v:
                raise ValueError(f"the header {k!r} holds a line break")
            lines.append(f"{k}: {v}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("latin-1") + body
        conn = await self._acquire(origin)
        try:
            conn.send(data, self.read_timeout_s)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.abort()
            raise
        return Response(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().abort()

    # ---- the pool ----
    def _origin(self, base_url: str) -> tuple:
        """(scheme, host, port, host header) of a replica's base URL, parsed once."""
        o = self._origins.get(base_url)
        if o is None:
            u = urlsplit(base_url)
            o = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80), u.netloc)
            if len(self._origins) > 10_000:  # replicas come and go: never an unbounded cache
                self._origins.clear()
            self._origins[base_url] = o
        return o

    async def _acquire(self, origin: tuple) -> _Conn:
        deadline = None
        while True:
            conn = self._reuse(origin)
            if conn is not None:
                return conn
            if self.open < self.max_connections or self._evict():
                return await self._connect(origin)
            if deadline is None:
                deadline = time.monotonic() + self.pool_timeout_s
            await self._wait_for_room(deadline)

    def _reuse(self, origin: tuple) -> _Conn | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the replica
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.abort()
            while idle:  # the rest are older still
                idle.pop().abort()
        return None

    def _evict(self) -> bool:
        """Close the oldest idle connection (any origin) to make room; False when none is idle."""
        for idle in self._idle.values():
            while idle:
                conn = idle.popleft()
                if not conn.dropped:
                    conn.abort()
                    return True
        return False

    async def _wait_for_room(self, deadline: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self._wake_one()  # woken as its deadline or a cancel came: the room goes to the next waiter
            else:
                fut.cancel()
            if isinstance(e, TimeoutError):
                raise PoolTimeout(f"all {self.max_connections} upstream connections are busy") from None
            raise

    async def _connect(self, origin: tuple) -> _Conn:
        scheme, host, port, _ = origin
        conn = _Conn(self, origin)
        self.open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(lambda: conn, host, port, ssl=self._context() if scheme == "https"
                                             else None)
        except TimeoutError:
            conn.abort()
            raise ConnectTimeout(f"no connection within {self.connect_timeout_s:g} s") from None
        except OSError as e:
            conn.abort()
            raise ConnectError(str(e) or type(e).__name__) from None
        except BaseException:
            conn.abort()
            raise
        return conn

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _release(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.origin, deque())
        while idle and (idle[0].closed or conn.idle_since - idle[0].idle_since >= KEEPALIVE_S):
            idle.popleft().abort()
        idle.append(conn)
        self._wake_one()

    def _dropped(self) -> None:
        self.open -= 1
        assert self.open >= 0
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
