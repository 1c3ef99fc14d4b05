"""Requests to the replicas: the gateway's one kind of call (POST a JSON body, read the response as it arrives) on
aiohttp's client, a well-kept library (C parser, a per-host keep-alive pool), behind this module's small interface.

Why not httpx here: its pool (httpcore) walks every pooled connection, polling each idle socket, whenever a request
starts or ends, so with thousands of streams open each request pays thousands of checks. aiohttp's connector takes
and returns a kept-alive connection in O(1) (a per-host deque and a set of connections in use).

How many requests hold a connection at once (max_connections) is bounded here, not by aiohttp's `limit`: aiohttp
times the wait for a free connection and the TCP connect under one deadline and one exception, and the gateway must
tell its own full pool (a 503 upstream_busy) from an unreachable replica. aiohttp's pool is unlimited and keeps the
connections that requests release, idle ones for KEEPALIVE_S.

Errors, all `UpstreamError`: `ConnectError` (refused, unreachable; `ConnectTimeout` past connect_timeout_s): the
request never left; `PoolTimeout`: no connection could be had within pool_timeout_s (max_connections requests hold
one each); `RemoteProtocolError` (the replica closed the connection or sent malformed HTTP) and `ReadTimeout`
(nothing arrived for read_timeout_s) once the request may have been sent.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

KEEPALIVE_S = 4.0  # an idle connection is reused within this; replicas' uvicorn closes them after 5 s
_NOT_OURS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")  # aiohttp's defaults the replicas never need


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


def _translate(e: Exception, read_timeout_s: float) -> UpstreamError:
    """aiohttp's exception → ours (see the module doc)."""
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(str(e))
    if isinstance(e, aiohttp.ClientConnectorError):
        return ConnectError(str(e.os_error) or type(e.os_error).__name__)
    if isinstance(e, aiohttp.SocketTimeoutError):
        return ReadTimeout(f"nothing arrived from the replica for {read_timeout_s:g} s")
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return RemoteProtocolError("the replica closed the connection")
    if isinstance(e, aiohttp.ClientResponseError):
        return RemoteProtocolError(f"the replica sent malformed HTTP: {e.message}")
    return RemoteProtocolError(f"{type(e).__name__}: {e}")


class Response:
    """A replica's response: status_code and headers (case-insensitive names) once the head is in; the body through
    read() or `async for piece in response` (the pieces as they arrived, chunked encoding removed); close() hands
    the connection back (or closes it, when the body was not read to its end) — always call it."""

    def __init__(self, pool: Upstream, resp: aiohttp.ClientResponse) -> None:
        self._pool, self._resp = pool, resp
        self.status_code, self.headers = resp.status, resp.headers
        self._held = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                piece = await content.readany()
                if not piece:
                    return
                yield piece
        except aiohttp.ClientError as e:
            raise _translate(e, self._pool.read_timeout_s) from None

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    def close(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._resp.content.is_eof() and self._resp.content.exception() is None:
            self._resp.release()
        else:
            self._resp.close()
        self._pool._give_back()


class Upstream:
    """At most max_connections requests hold a connection at once, over all replicas; idle connections are kept
    alive for KEEPALIVE_S. `in_use`: how many do now."""

    def __init__(self, max_connections: int, connect_timeout_s: float, read_timeout_s: float,
                 pool_timeout_s: float) -> None:
        assert max_connections >= 1 and connect_timeout_s > 0 and read_timeout_s > 0 and pool_timeout_s > 0
        self.max_connections, self.connect_timeout_s = max_connections, connect_timeout_s
        self.read_timeout_s, self.pool_timeout_s = read_timeout_s, pool_timeout_s
        self.in_use = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._urls: dict[tuple[str, str], URL] = {}
        self._session: aiohttp.ClientSession | None = None

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST body to base_url + path; returns once the response head is in. `headers` must not hold host or
        content-length. Raises UpstreamError (see the module doc); ValueError for a header value with CR or LF."""
        for k, v in headers.items():
            if "\r" in v or "\n" in v:
                raise ValueError(f"the header {k!r} holds a line break")
        url = self._url(base_url, path)
        await self._take()
        try:
            resp = await self._client().post(url, data=body, headers=headers, allow_redirects=False)
        except aiohttp.ClientError as e:
            self._give_back()
            raise _translate(e, self.read_timeout_s) from None
        except BaseException:
            self._give_back()
            raise
        return Response(self, resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use (it belongs to the running loop)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s,
                                            sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
            # No cookie jar: a replica's Set-Cookie must never ride on another tenant's request.
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_NOT_OURS)
        return self._session

    def _url(self, base_url: str, path: str) -> URL:
        """base_url + path, parsed once per pair."""
        u = self._urls.get((base_url, path))
        if u is None:
            u = URL(base_url.rstrip("/") + path, encoded=True)
            if len(self._urls) > 10_000:  # replicas come and go: never an unbounded cache
                self._urls.clear()
            self._urls[(base_url, path)] = u
        return u

    # ---- the bound on connections in use ----
    async def _take(self) -> None:
        if self.in_use < self.max_connections and not self._waiters:
            self.in_use += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                await fut  # _give_back passed its place on to us: in_use already counts it
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self._give_back()  # handed a place as the deadline or a cancel came: pass it on
            if isinstance(e, TimeoutError):
                raise PoolTimeout(f"all {self.max_connections} upstream connections are busy") from None
            raise
        finally:
            if not fut.done():
                fut.cancel()

    def _give_back(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_use -= 1
        assert self.in_use >= 0
