"""Forwarding. A `Flight` is one upstream generation that any number of clients read: its first client, clients
coalesced onto it, and retries with the same Idempotency-Key. It runs as its own task (queue → replica → response),
so it outlives any one client, and is cancelled when its last client has gone (which aborts the upstream request).

Failover: a connection error, a 5xx, or a 401/403 (the replica refused the gateway's own key: answered 502
`upstream_auth_failed`, never passed on as the tenant's 401) before the first streamed event is retried on another
replica (at most `max_retries` times, exponential backoff with full jitter), but a request that reached two replicas
and failed on both is not tried on a third, and only refused connections (and health checks) count against a
replica's breaker — so no one request can take the fleet down. Once an event went out the stream is never
replayed — the clients get an error event and `data: [DONE]`.

Cuts: an attempt is cut by the gateway, the same way (retried before the first event, else the error event), when
its replica is removed as dead (`Pool.remove(abort=True)`: a frozen node sends no RST, its requests would hang) and
when a stream's replica sent nothing for `stream_idle_timeout_s`. A cut for a dead replica does not count as a
failed delivery (the request was not at fault).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
import httpx
from opentelemetry.trace import Span

from conveyor.gateway.admission import ModelQueue, Rejected, Waiter
from conveyor.gateway.config import GatewayConfig
from conveyor.gateway.metrics import GatewayMetrics
from conveyor.gateway.picker import Replica
from conveyor.gateway.upstream import (ConnectError, PoolTimeout, RemoteProtocolError, Response, Upstream,
                                       UpstreamError)
from conveyor.tracing import Tracing, end_upstream_span, phase, start_upstream_span, traceparent_headers

log = logging.getLogger("conveyor.gateway")

DONE = "data: [DONE]\n\n"
_NULL_USAGE = b', "usage": null}'
# the end of a stream as an event's line: SSE's space after "data:" is optional; an event's data is one line of
# JSON, which escapes line breaks, so the marker inside a text never starts a line
_DONE_LINE = re.compile(rb"(?:^|\n)data: ?\[DONE\]\r?(?:\n|$)")
MAX_FAILED_DELIVERIES = 2  # replicas a request may reach and fail on before its error is returned
MAX_EVENT_BYTES = 16 << 20  # one SSE event of a replica (a token's chunk: a few KiB); past it, not SSE
MAX_RESPONSE_BYTES = 64 << 20  # a replica's whole body (non-stream answer, error); past it, 502 and the conn dropped


class ResponseTooLarge(RemoteProtocolError):
    """A replica's body past MAX_RESPONSE_BYTES (declared or as it arrived)."""


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> str:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error",
            503: "service_unavailable"}.get(status, "api_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


_NO_REPLICA_ANSWERED = error_body(502, "no replica answered")  # made once: every request starts with it


class Flight:
    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.status: int | None = None  # known once the response may start: first event, or the whole body
        # a stream: the replica's SSE bytes as they came, each piece one or more whole events (forwarded as they
        # are); else the one response body
        self.chunks: list = []
        # the gateway always asks for usage; a client that did not gets each event as the replica would have sent
        # it then: without `usage`, and without the usage-only event (made when such a client first reads a piece)
        self.plain: dict[int, bytes] = {}
        self.usage: dict | None = None
        self.headers: dict[str, str] = {}
        self.done = False
        self.saw_done = False
        self.cut = False  # an upstream failure after the first event: ended with an error event
        self.queue_ms: float | None = None
        self.dispatched = asyncio.Event()  # it left the dispatch queue (to a replica, or rejected)
        self.replica: str | None = None
        self.retries = 0
        self.subscribers = 0
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._tail: list[bytes] = []  # the start of an event whose end has not arrived yet, as it arrived
        self._tail_len = 0
        self._edge = b""  # the tail's last 3 bytes: where an event's end split across two pieces begins

    @property
    def complete(self) -> bool:
        """It ended with the whole response: 200, and a stream ended by the replica's own `data: [DONE]` (not cut,
        not cancelled half-way when its last client left)."""
        return self.done and self.status == 200 and not self.cut and (self.saw_done or not self.stream)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def push_raw(self, data: bytes) -> None:
        """Bytes of the replica's SSE stream as they arrived (any boundaries): the whole events in them go out at
        once, as they are; the start of an event waits for its end. Each byte is searched and joined once. Raises
        RemoteProtocolError when an event grows past MAX_EVENT_BYTES (the replica is not sending SSE)."""
        edge = self._edge
        scan = edge + data if edge else data
        lf, crlf = scan.rfind(b"\n\n"), scan.rfind(b"\r\n\r\n")
        if lf < 0 and crlf < 0:
            self._hold(data)
            return
        end = max(lf + 2, crlf + 4 if crlf >= 0 else 0) - len(edge)
        assert end > 0, end  # the tail holds no event's end (it was searched when it came)
        part = b"".join([*self._tail, data[:end]]) if self._tail else data[:end]
        self._tail, self._tail_len, self._edge = [], 0, b""
        self._append(part)
        if end < len(data):
            self._hold(data[end:])

    def _hold(self, data: bytes) -> None:
        self._tail.append(data)
        self._tail_len += len(data)
        self._edge = data[-3:] if len(data) >= 3 else (self._edge + data)[-3:]
        if self._tail_len > MAX_EVENT_BYTES:
            raise RemoteProtocolError(f"the replica sent an event longer than {MAX_EVENT_BYTES} bytes")

    def end_raw(self) -> None:
        """The replica's stream ended: a last event without its blank line still counts."""
        tail = b"".join(self._tail)
        self._tail, self._tail_len, self._edge = [], 0, b""
        if tail.strip():
            self._append(tail.rstrip(b"\r\n") + b"\n\n")

    def push_event(self, line: str) -> None:
        """One event of the gateway's own (an error, `data: [DONE]`): `line` without its blank line."""
        self._append(line.encode() + b"\n\n")

    def _append(self, part: bytes) -> None:
        if (i := part.find(b"[DONE]")) >= 0 and _DONE_LINE.search(part, max(0, i - 7)):  # from the first marker
            self.saw_done = True
        if b'"usage"' in part and part.count(b'"usage"') != part.count(b'"usage": null'):
            self._read_usage(part)
        if self.status is None:
            self.status = 200
        self.chunks.append(part)
        self._notify()

    def _read_usage(self, part: bytes) -> None:
        """Keep the last usage object in these events (not ours to judge when it is not JSON: passed on as is)."""
        for event in _usage_candidates(part):
            obj = _usage_event(event)
            if obj is not None and isinstance(obj["usage"], dict):
                self.usage = obj["usage"]

    def _plain(self, i: int) -> bytes:
        """Piece i for a client that did not ask for usage."""
        p = self.plain.get(i)
        if p is None:
            p = self.plain[i] = _without_usage(self.chunks[i])
        return p

    def finish(self, status: int | None = None, body: str | bytes | None = None, headers: dict | None = None) -> None:
        if self.status is None:
            self.status = status or 502
            self.chunks = [body if body is not None else error_body(502, "no response")]
            self.headers = headers or {}
            if self.status == 200 and not self.stream:
                try:
                    obj = json.loads(self.chunks[0])
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
        self.done = True
        self.dispatched.set()
        self._notify()

    async def head(self) -> int:
        while self.status is None:
            ev = self._changed
            if self.done:
                break
            await ev.wait()
        return self.status or 502

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        """Every event from the first; those that arrived together go out in one write."""
        i = 0
        while True:
            ev = self._changed
            n = len(self.chunks)
            if i < n:
                out = self.chunks[i:n] if include_usage else [self._plain(j) for j in range(i, n)]
                i = n
                out = out[0] if len(out) == 1 else b"".join(out)
                if out:
                    yield out
            if self.done and i >= len(self.chunks):
                return
            await ev.wait()

    async def wait_done(self) -> None:
        while not self.done:
            await self._changed.wait()

    def subscribe(self) -> None:
        self.subscribers += 1

    def unsubscribe(self) -> None:
        self.subscribers -= 1
        assert self.subscribers >= 0
        if self.subscribers == 0 and not self.done and self.task is not None:
            self.task.cancel()


def _events(part: bytes) -> list[bytes]:
    """The events of a piece of SSE (each without its blank line)."""
    return [e for e in part.replace(b"\r\n", b"\n").split(b"\n\n") if e]


def _usage_candidates(part: bytes) -> list[bytes]:
    """The events of `part` (as _events gives them) that hold `"usage"`, in order, found from each mention rather
    than by splitting every event: a piece of many token events has one usage event at most."""
    part = part.replace(b"\r\n", b"\n") if b"\r" in part else part
    found, pos = [], 0
    while (i := part.find(b'"usage"', pos)) >= 0:
        start, end = part.rfind(b"\n\n", 0, i), part.find(b"\n\n", i)
        start, end = 0 if start < 0 else start + 2, len(part) if end < 0 else end
        found.append(part[start:end])
        pos = end
    return found


def _usage_event(event: bytes) -> dict | None:
    """The JSON object of an event `data: {...}` (or `data:{...}`) that has a `usage` key, else None."""
    if not event.startswith(b"data:") or b'"usage"' not in event:
        return None
    try:
        obj = json.loads(event[5:])  # the optional space is JSON's whitespace
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "usage" in obj else None


def _without_usage(part: bytes) -> bytes:
    """The events of `part` as the replica would have sent them without include_usage: `usage` dropped, and the
    usage-only event (no choices) dropped. The common case needs no parsing: usage null, the last top-level key."""
    if b'"usage"' not in part:
        return part
    if part.count(b'"usage"') == part.count(_NULL_USAGE + b"\n\n"):
        return part.replace(_NULL_USAGE + b"\n\n", b"}\n\n")
    out = []
    for event in _events(part):
        if event.endswith(_NULL_USAGE):
            out.append(event[:-len(_NULL_USAGE)] + b"}")
        elif (obj := _usage_event(event)) is None:
            out.append(event)
        elif obj.get("choices") != []:
            out.append(b"data: " + json.dumps({k: v for k, v in obj.items() if k != "usage"}).encode())
    return b"".join(e + b"\n\n" for e in out)


@dataclass
class Call:
    """What a flight sends: the body is final (upstream model name, include_usage for streams)."""
    model: str
    tenant_class: str
    queue: ModelQueue
    path: str
    body: bytes
    waiter: Waiter
    request_id: str
    stream: bool
    headers: dict[str, str]  # the replicas' credentials, if they require them
    span: Span | None = None  # the gateway span of the client that started it (tracing); None: tracing off


class Attempt:
    """One try at a replica, which the gateway may cut: `cut(reason)` cancels its task (once, and only until
    stop()). With `idle_s`, a
    timer cuts it when nothing arrived for that long (`last`: when something last did; one timer, re-armed for what
    is left, so nothing per piece but the store of `last`)."""

    def __init__(self, idle_s: float | None) -> None:
        self.idle_s = idle_s
        self.task: asyncio.Task | None = None
        self.reason: str | None = None
        self.last = time.monotonic()
        self.stopped = False  # over: a cut now would cancel whatever its task does next
        self._timer: asyncio.TimerHandle | None = None

    def cut(self, reason: str) -> None:
        if self.reason is None and self.task is not None and not self.task.done() and not self.stopped:
            self.reason = reason
            self.task.cancel()

    def arm(self) -> None:
        if self.idle_s is not None:
            left = self.last + self.idle_s - time.monotonic()  # loop.time() may not be time.monotonic() (uvloop)
            self._timer = asyncio.get_running_loop().call_later(max(0.0, left), self._check)

    def _check(self) -> None:
        self._timer = None
        if time.monotonic() - self.last >= self.idle_s:
            self.cut("idle_timeout")
        else:
            self.arm()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Forwarder:
    def __init__(self, cfg: GatewayConfig, metrics: GatewayMetrics, tracing: Tracing | None = None) -> None:
        self.cfg, self.metrics, self.tracing = cfg, metrics, tracing
        # sized at start: a reload keeps it
        self.upstream = Upstream(cfg.upstream_max_connections, cfg.connect_timeout_s, cfg.read_timeout_s,
                                 cfg.upstream_pool_timeout_s)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    async def run(self, flight: Flight, call: Call) -> None:
        m = self.metrics
        try:
            try:
                replica = await call.queue.admit(call.waiter)
            except Rejected as e:
                m.rejections.labels(call.model, call.tenant_class, e.reason).inc()
                headers = {"retry-after": str(int(e.retry_after_s))} if e.retry_after_s else {}
                flight.finish(e.status, error_body(e.status, e.message, e.reason), headers)
                return
            flight.queue_ms = (time.monotonic() - call.waiter.enqueued) * 1000
            flight.dispatched.set()
            m.queue_time.labels(call.model, call.tenant_class).observe(flight.queue_ms / 1000)
            if call.span is not None:
                phase(self.tracing.tracer, call.span, "queue", call.waiter.enqueued, time.monotonic(),
                      {"conveyor.tenant.class": call.tenant_class})
            t0 = time.monotonic()
            try:
                await self._forward(flight, call, replica)
            finally:
                m.upstream_latency.labels(call.model, call.tenant_class).observe(time.monotonic() - t0)
                if flight.usage:  # the fair queue charges what was actually served
                    call.queue.queue.charge(call.waiter, total_tokens(flight.usage) - call.waiter.cost)
        except Exception:  # a bug, not an upstream failure: the clients still get an answer
            log.exception('{"event": "flight_error", "request_id": "%s"}', call.request_id)
            if flight.chunks and flight.status == 200:
                flight.cut = True
                flight.push_event("data: " + error_body(500, "internal error in the gateway", "internal_error"))
                flight.push_event(DONE.strip())
            flight.finish(500, error_body(500, "internal error in the gateway", "internal_error"))
        finally:
            if not flight.done:
                flight.finish(499, error_body(499, "all clients went away"))

    async def _forward(self, flight: Flight, call: Call, replica: Replica) -> None:
        """Attempts until one answers. A request that reached two replicas and failed on both (5xx, or the
        connection broke) is not tried on a third: it is most likely the request's own fault."""
        pool, w = call.queue.pool, call.waiter
        tried: list[Replica] = []
        failed_after_send = 0
        last = (502, _NO_REPLICA_ANSWERED, {})
        while True:
            tried.append(replica)
            flight.replica = replica.url
            ok = outcome = span = None
            if call.span is not None:
                span = start_upstream_span(self.tracing.tracer, call.span, replica.url, call.path, len(tried))
            try:
                ok, outcome, last = await self._attempt(flight, call, replica, last, span)
            finally:
                pool.release(replica, w.cost, ok)
                if span is not None:
                    end_upstream_span(span, flight.status if outcome == "done" else last[0], outcome)
            if outcome == "done":
                return
            failed_after_send += outcome == "failed"  # "unsent" and "aborted" (its replica died) are not the request's
            if failed_after_send >= MAX_FAILED_DELIVERIES or len(tried) > self.cfg.max_retries:
                flight.finish(*last)
                return
            self.metrics.retries.labels(call.model).inc()
            flight.retries += 1
            await asyncio.sleep(random.uniform(0, self.cfg.retry_backoff_s * 2 ** (len(tried) - 1)))
            nxt = (pool.acquire(w.affinity, w.cost, exclude=tuple(tried), ignore_cap=True)
                   or pool.acquire(w.affinity, w.cost, ignore_cap=True))
            if nxt is None:
                flight.finish(503, error_body(503, f"no healthy replica of {call.model!r}", "no_replica"),
                              {"retry-after": "1"})
                return
            replica = nxt

    async def _attempt(self, flight: Flight, call: Call, replica: Replica, last: tuple, span: Span | None = None
                       ) -> tuple[bool | None, str, tuple]:
        """_exchange, which a cut cancels (see the module doc); same result, outcome "aborted" for a cut before
        the first event because its replica died. It runs in the flight's own task (a task per attempt showed in
        profiles): a cut cancels that task, and is told from the flight's own cancellation by its reason."""
        attempt = Attempt(self.cfg.stream_idle_timeout_s if call.stream else None)
        attempt.task = me = asyncio.current_task()
        assert me is not None
        replica.attempts.add(attempt)
        attempt.arm()
        try:
            return await self._exchange(flight, call, replica, last, span, attempt)
        except asyncio.CancelledError:
            if attempt.reason is None or me.uncancel() > 0:
                raise  # this flight itself is cancelled (its last client left)
            return self._cut(flight, call, attempt.reason, last)
        finally:
            attempt.stop()
            replica.attempts.discard(attempt)

    def _cut(self, flight: Flight, call: Call, reason: str, last: tuple) -> tuple[bool | None, str, tuple]:
        """The result of an attempt cut for `reason` (idle_timeout, replica_dead)."""
        self.metrics.upstream_cuts.labels(call.model, reason).inc()
        why = (f"nothing arrived from the replica for {self.cfg.stream_idle_timeout_s:g} s" if reason == "idle_timeout"
               else "the replica was removed as dead")
        if not flight.chunks:
            return None, "failed" if reason == "idle_timeout" else "aborted", (
                502, error_body(502, f"replica failed ({why})", "upstream_failed"), {})
        return self._cut_stream(flight, call, why, last)

    def _cut_stream(self, flight: Flight, call: Call, why: str, last: tuple) -> tuple[None, str, tuple]:
        """End a stream that already sent events with an error event and [DONE] (never replayed elsewhere); one
        that already had the replica's own [DONE] is whole (only the end of its HTTP body never came): it ends as
        it is, complete."""
        if flight.saw_done:
            flight.finish()
            return None, "done", last
        self.metrics.stream_errors.labels(call.model).inc()
        flight.cut = True
        flight.push_event("data: " + error_body(502, f"the replica failed mid-stream ({why}); the response is "
                                                "incomplete", "upstream_failed"))
        flight.push_event(DONE.strip())
        flight.finish()
        return None, "done", last

    async def _exchange(self, flight: Flight, call: Call, replica: Replica, last: tuple, span: Span | None,
                        attempt: Attempt) -> tuple[bool | None, str, tuple]:
        """One try at one replica → (verdict for its breaker, outcome, the error to return if retries run out).

        Verdict: True it answered, False it refused the connection (a broken replica, whatever the request), None
        no evidence either way: a 5xx or a connection broken after the request was sent may be the request's own
        doing, so only health checks judge the replica then. Outcome: "done" (the flight is finished), "unsent"
        (the request never reached the replica) or "failed" (it did, and failed before the first event). `span`:
        this attempt's tracing span, sent as the request's traceparent (None: tracing off)."""
        self.metrics.upstream_requests.labels(call.model).inc()
        headers = {"content-type": "application/json", "x-request-id": call.request_id, **call.headers}
        if span is not None:
            headers.update(traceparent_headers(span))
        try:
            resp = await self.upstream.post(replica.url, call.path, call.body, headers)
        except ConnectError as e:
            return False, "unsent", (502, error_body(502, f"replica unreachable ({type(e).__name__})",
                                                     "upstream_unreachable"), {})
        except PoolTimeout:  # our own connection pool is exhausted: not the replica's fault
            return None, "unsent", (503, error_body(503, "the gateway has no free upstream connection",
                                                    "upstream_busy"), {"retry-after": "1"})
        except UpstreamError as e:
            return None, "failed", (502, error_body(502, f"replica failed ({type(e).__name__})",
                                                    "upstream_failed"), {})
        try:
            if resp.status_code >= 500:
                body = _openai_error(resp.status_code, (await read_body(resp)).decode(errors="replace"))
                headers = {"retry-after": resp.headers["retry-after"]} if "retry-after" in resp.headers else {}
                return None, "failed", (resp.status_code, body, headers)
            if resp.status_code in (401, 403):
                await read_body(resp)
                return None, "failed", self._auth_failed(call, replica, resp.status_code)
            if resp.status_code != 200 or not call.stream:
                body = await read_body(resp)
                flight.finish(resp.status_code, body if resp.status_code == 200 else
                              _openai_error(resp.status_code, body.decode(errors="replace")))
                return True, "done", last  # a 4xx is the request's fault, never the replica's
            async for piece in resp:
                attempt.last = time.monotonic()
                flight.push_raw(piece)
            flight.end_raw()
            if not flight.saw_done:
                raise RemoteProtocolError("stream ended without [DONE]")
            flight.finish()
            return True, "done", last
        except UpstreamError as e:
            if not flight.chunks:
                why = str(e) if isinstance(e, ResponseTooLarge) else type(e).__name__
                return None, "failed", (502, error_body(502, f"replica failed ({why})", "upstream_failed"), {})
            return self._cut_stream(flight, call, type(e).__name__, last)
        finally:
            resp.close()

    def _auth_failed(self, call: Call, replica: Replica, status: int) -> tuple[int, str, dict]:
        """The replica refused the gateway's own key (its 401/403): a misconfiguration (the model's
        upstream_api_key_env), never the tenant's auth failure. Logged (no key) and counted; the client gets 502."""
        self.metrics.upstream_auth_failures.labels(call.model).inc()
        log.error(json.dumps({"event": "upstream_auth_failed", "model": call.model, "replica": replica.url,
                              "status": status, "request_id": call.request_id,
                              "key_sent": "authorization" in call.headers}))
        return 502, error_body(502, "the replica refused the gateway's credentials", "upstream_auth_failed"), {}


def upstream_client(cfg: GatewayConfig) -> httpx.AsyncClient:
    """The client of the pools' health checks and /metrics scrapes (requests go through Forwarder.upstream)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
                             limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024),
                             trust_env=False)


async def read_body(resp: Response) -> bytes:
    """A replica's whole body. Raises ResponseTooLarge as soon as it declares or sends more than MAX_RESPONSE_BYTES
    (the caller's resp.close() then drops the connection), UpstreamError as resp does."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise ResponseTooLarge(f"its response is larger than {MAX_RESPONSE_BYTES} bytes")
    pieces, size = [], 0
    async for piece in resp:
        size += len(piece)
        if size > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge(f"its response is larger than {MAX_RESPONSE_BYTES} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def total_tokens(usage: dict) -> int:
    """A replica's usage.total_tokens, or 0 when it is not a sane count."""
    n = usage.get("total_tokens")
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 else 0


def _openai_error(status: int, body: str) -> str:
    """A replica's error body when it is OpenAI's error JSON, else one that is (with the replica's text)."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return body
    except ValueError:
        pass
    return error_body(status, f"the replica answered {status}: {body[:200]}", "upstream_error")
