"""The gateway's own limit: past it, a new request is refused at once with a 503, `Retry-After` and OpenAI's error
JSON (code `gateway_overloaded`), before any of its body is read, parsed or sent to Redis.

Three signals of this process, checked per request:
- open requests: HTTP requests inside the app now (a stream counts until its last byte). Each stream holds two file
  descriptors (the client's socket and its upstream connection), so the default limit is derived from
  RLIMIT_NOFILE, whose soft limit is raised to the hard one at start (`raise_nofile_limit`).
- event-loop lag: how late a periodic timer fires (`LagMonitor`). A loop that runs late delays every chunk of every
  open stream; new requests are refused while it stays above the threshold (SUSTAINED_TICKS timers in a row: one
  stall, a GC pause or the process descheduled on a busy machine, refuses nothing), so the streams already
  admitted keep their pace instead of every request timing out together.
- the accept queue: connections the kernel holds for this process's listening sockets, not accepted yet
  (`AcceptQueue`). A process short of CPU falls behind there first, where its event loop cannot see them: with
  5,000 streams arriving they waited several seconds in a queue of up to 2,048 (the listen backlog), far longer than
  the loop's own lag (at most ~1.4 s). Refusing while the queue is long drains it at the cost of a refusal.

`/health`, `/metrics` and the admin API (`/admin/...`, admin key only) are never refused nor counted: operators
must see an overloaded gateway, and be able to add capacity to it.
"""
from __future__ import annotations

import asyncio
import collections
import os
import resource
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from conveyor.gateway.config import OverloadConfig
from conveyor.gateway.proxy import error_body

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

EXEMPT_PATHS = frozenset({"/health", "/metrics"})
EXEMPT_PREFIX = "/admin/"  # the admin API (admin key only): adding capacity to an overloaded gateway must work
# rejection reasons
OPEN_REQUESTS, EVENT_LOOP_LAG, ACCEPT_QUEUE = ("overloaded_open_requests", "overloaded_event_loop_lag",
                                              "overloaded_accept_queue")
_MESSAGES = {OPEN_REQUESTS: "the gateway holds as many open requests as it can carry; retry shortly",
             EVENT_LOOP_LAG: "the gateway is running behind (event-loop lag); retry shortly",
             ACCEPT_QUEUE: "the gateway is running behind (connections waiting to be accepted); retry shortly"}
SUSTAINED_TICKS = 3  # the lag counts for refusing once this many timers in a row fired late
ACCEPT_QUEUE_READ_S = 0.002  # the accept queue is read (a syscall per socket) at most this often
_TCPI_UNACKED = 24  # offset of tcp_info.tcpi_unacked: for a listening socket, its accept queue's length (Linux)


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (to fs.nr_open when the hard one is unlimited);
    returns the soft limit in force afterwards (unchanged when the raise is not allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or want <= soft:
        return soft if soft != resource.RLIM_INFINITY else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def default_max_open(nofile: int) -> int:
    """Requests one process can hold open within `nofile` descriptors: two each (client socket, upstream
    connection), after keeping a quarter of them, at most 1024, for everything else (the listening socket, idle
    pooled connections, health checks and scrapes, Redis, the batch store, logs)."""
    assert nofile >= 1
    return max(1, (nofile - min(1024, nofile // 4)) // 2)


class LagMonitor:
    """How late this process's event loop runs, in seconds. A timer is set every `interval_s`; `lag` is how late
    the last one fired, or how overdue the pending one is now when that is more (a loop behind a long backlog of
    callbacks shows it before the timer gets its turn); `sustained` is the least lateness of the last
    SUSTAINED_TICKS timers (0 until that many fired): high only while the loop stays behind."""

    def __init__(self, interval_s: float) -> None:
        assert interval_s > 0
        self.interval_s = interval_s
        self.last = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=SUSTAINED_TICKS)
        self.sustained = 0.0  # kept as each timer fires: it is read for every request
        self._due: float | None = None  # time.monotonic() at which the pending timer should fire
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start measuring on the running loop (call from a coroutine or callback)."""
        assert self._timer is None, "already started"
        self._arm(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._due, self.last, self.sustained = None, None, 0.0, 0.0
        self.recent.clear()

    @property
    def lag(self) -> float:
        if self._due is None:
            return 0.0
        return max(self.last, time.monotonic() - self._due)


    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = time.monotonic() + self.interval_s
        self._timer = loop.call_later(self.interval_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last = max(0.0, time.monotonic() - self._due)
        self.recent.append(self.last)
        self.sustained = min(self.recent) if len(self.recent) == SUSTAINED_TICKS else 0.0
        self._arm(loop)


class AcceptQueue:
    """The connections waiting to be accepted on this process's listening TCP sockets. The sockets are found on
    first use (the server listens only after the app's startup) among the process's descriptors, and kept as
    duplicates; on a system without TCP_INFO (not Linux) the length is always 0."""

    def __init__(self) -> None:
        self._socks: list[socket.socket] | None = None

    def length(self) -> int:
        """Connections queued now, summed over the listening sockets."""
        if self._socks is None:
            self._socks = _listening_sockets()
        total = 0
        for s in self._socks:
            try:
                total += struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104),
                                            _TCPI_UNACKED)[0]
            except OSError:
                pass
        return total

    def close(self) -> None:
        for s in self._socks or ():
            s.close()
        self._socks = None


def _listening_sockets() -> list[socket.socket]:
    """Duplicates of this process's listening TCP sockets (none where /proc or TCP_INFO is missing)."""
    if not hasattr(socket, "TCP_INFO"):
        return []
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    found: list[socket.socket] = []
    for fd in fds:
        if any(fd == s.fileno() for s in found):  # a duplicate made here took a number still to be looked at
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # not a socket, or closed meanwhile
            continue
        try:
            if (s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                # not s.dup(): it copies s's timeout (None: blocking) onto the shared file description, which
                # turned the server's own listening socket blocking (the event loop then hung in accept())
                found.append(socket.socket(fileno=os.dup(fd)))
        except OSError:
            pass
        finally:
            s.detach()  # the descriptor stays its owner's
    return found


class Overload:
    """This process's load and the rule for refusing: `open` requests at most `max_open`, sustained event-loop lag
    at most `max_lag_s` seconds, at most `max_accept_queue` connections waiting to be accepted (None: not checked).
    `nofile`: the descriptor limit the default max_open is derived from."""

    def __init__(self, cfg: OverloadConfig, nofile: int) -> None:
        self.nofile, self.open, self.lag, self.accept_queue = nofile, 0, LagMonitor(cfg.lag_interval_s), AcceptQueue()
        self._queued, self._queued_at = 0, -ACCEPT_QUEUE_READ_S  # the last accept queue read, and when
        self.apply(cfg)

    def start(self) -> None:
        """Start measuring the event loop's lag (on the running loop)."""
        self.lag.start()

    def stop(self) -> None:
        self.lag.stop()
        self.accept_queue.close()

    def apply(self, cfg: OverloadConfig) -> None:
        """Take new limits (config reload); the requests open stay counted."""
        self.max_open = cfg.max_open_requests or default_max_open(self.nofile)
        self.max_lag_s, self.retry_after_s, self.lag.interval_s = (cfg.max_event_loop_lag_s, cfg.retry_after_s,
                                                                   cfg.lag_interval_s)
        self.max_accept_queue = cfg.max_accept_queue

    def refusal(self) -> str | None:
        """The reason to refuse a new request now (OPEN_REQUESTS, EVENT_LOOP_LAG, ACCEPT_QUEUE), or None to admit
        it."""
        if self.open >= self.max_open:
            return OPEN_REQUESTS
        if self.lag.sustained > self.max_lag_s:
            return EVENT_LOOP_LAG
        if self.max_accept_queue is not None:
            now = time.monotonic()
            if now - self._queued_at >= ACCEPT_QUEUE_READ_S:
                self._queued, self._queued_at = self.accept_queue.length(), now
            if self._queued > self.max_accept_queue:
                return ACCEPT_QUEUE
        return None


class OverloadGuard:
    """Pure ASGI middleware in front of the gateway's app: counts the HTTP requests inside it and refuses a new one
    when `overload.refusal()` names a reason; `on_refuse(reason, request_id)` counts and logs each refusal."""

    def __init__(self, app: ASGIApp, overload: Overload, on_refuse: Callable[[str, str], None]) -> None:
        self.app, self.overload, self.on_refuse = app, overload, on_refuse
        self._bodies = {r: error_body(503, m, "gateway_overloaded").encode() for r, m in _MESSAGES.items()}

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS or scope["path"].startswith(EXEMPT_PREFIX):
            await self.app(scope, receive, send)
            return
        o = self.overload
        reason = o.refusal()
        if reason is not None:
            await self._refuse(send, reason)
            return
        o.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            o.open -= 1
            assert o.open >= 0

    async def _refuse(self, send, reason: str) -> None:
        """503 without reading the body; `connection: close` frees the client's socket too."""
        rid = uuid.uuid4().hex
        self.on_refuse(reason, rid)
        body = self._bodies[reason]
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"retry-after", b"%d" % self.overload.retry_after_s), (b"connection", b"close"),
            (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})
