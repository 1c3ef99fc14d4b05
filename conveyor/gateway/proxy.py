"""Forwarding. A `Flight` is one upstream generation that any number of clients read: its first client, clients
coalesced onto it, and retries with the same Idempotency-Key. It runs as its own task (queue → replica → response),
so it outlives any one client, and is cancelled when its last client has gone (which aborts the upstream request).

Failover: a connection error, a 5xx, or a 401/403 (the replica refused the gateway's own key: answered 502
`upstream_auth_failed`, never passed on as the tenant's 401) before the first streamed event is retried on another
replica (at most `max_retries` times, exponential backoff with full jitter), but a request that reached two replicas
and failed on both is not tried on a third, and only refused connections (and health checks) count against a
replica's breaker — so no one request can take the fleet down. Once an event went out the stream is never
replayed — the clients get an error event and `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
import httpx
from opentelemetry.trace import Span

from conveyor.gateway.admission import ModelQueue, Rejected, Waiter
from conveyor.gateway.config import GatewayConfig
from conveyor.gateway.metrics import GatewayMetrics
from conveyor.gateway.picker import Replica
from conveyor.tracing import Tracing, end_upstream_span, phase, start_upstream_span, traceparent_headers

log = logging.getLogger("conveyor.gateway")

DONE = "data: [DONE]\n\n"
_NULL_USAGE = ', "usage": null}'
MAX_FAILED_DELIVERIES = 2  # replicas a request may reach and fail on before its error is returned


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> str:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error",
            503: "service_unavailable"}.get(status, "api_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


class Flight:
    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.status: int | None = None  # known once the response may start: first event, or the whole body
        self.chunks: list[str] = []  # SSE events, or the one response body
        # the gateway always asks for usage; a client that did not gets each event as the replica would have sent
        # it then: without `usage`, and without the usage-only chunk (None)
        self.plain: dict[int, str | None] = {}
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

    @property
    def complete(self) -> bool:
        """It ended with the whole response: 200, and a stream ended by the replica's own `data: [DONE]` (not cut,
        not cancelled half-way when its last client left)."""
        return self.done and self.status == 200 and not self.cut and (self.saw_done or not self.stream)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def push_event(self, line: str) -> None:
        if line == "data: [DONE]":
            self.saw_done = True
        elif '"usage"' in line and line.startswith("data: {"):
            self._read_usage(line)
        if self.status is None:
            self.status = 200
        self.chunks.append(line + "\n\n")
        self._notify()

    def _read_usage(self, line: str) -> None:
        """Keep the event's usage, and the event without it for clients that did not ask for usage."""
        i = len(self.chunks)
        if line.endswith(_NULL_USAGE):  # the common case, without parsing: the last top-level key, null
            self.plain[i] = line[:-len(_NULL_USAGE)] + "}\n\n"
            return
        try:
            obj = json.loads(line[6:])
        except ValueError:  # not ours to judge: pass it through
            return
        if not isinstance(obj, dict) or "usage" not in obj:
            return
        if isinstance(obj["usage"], dict):
            self.usage = obj["usage"]
        if obj.get("choices") == []:
            self.plain[i] = None
        else:
            self.plain[i] = "data: " + json.dumps({k: v for k, v in obj.items() if k != "usage"}) + "\n\n"

    def finish(self, status: int | None = None, body: str | None = None, headers: dict | None = None) -> None:
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

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Every event from the first; those that arrived together go out in one write."""
        i = 0
        while True:
            ev = self._changed
            n = len(self.chunks)
            if i < n:
                out = self.chunks[i:n] if include_usage else \
                    [c for j in range(i, n) if (c := self.plain.get(j, self.chunks[j])) is not None]
                i = n
                if out:
                    yield "".join(out)
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


class Forwarder:
    def __init__(self, cfg: GatewayConfig, client: httpx.AsyncClient, metrics: GatewayMetrics,
                 tracing: Tracing | None = None) -> None:
        self.cfg, self.client, self.metrics, self.tracing = cfg, client, metrics, tracing

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
        last = (502, error_body(502, "no replica answered"), {})
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
            failed_after_send += outcome == "failed"
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
        """One try at one replica → (verdict for its breaker, outcome, the error to return if retries run out).

        Verdict: True it answered, False it refused the connection (a broken replica, whatever the request), None
        no evidence either way: a 5xx or a connection broken after the request was sent may be the request's own
        doing, so only health checks judge the replica then. Outcome: "done" (the flight is finished), "unsent"
        (the request never reached the replica) or "failed" (it did, and failed before the first event). `span`:
        this attempt's tracing span, sent as the request's traceparent (None: tracing off)."""
        self.metrics.upstream_requests.labels(call.model).inc()
        req = self.client.build_request("POST", replica.url + call.path, content=call.body,
                                        headers={"content-type": "application/json",
                                                 "x-request-id": call.request_id, **call.headers,
                                                 **(traceparent_headers(span) if span is not None else {})})
        try:
            resp = await self.client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            return False, "unsent", (502, error_body(502, f"replica unreachable ({type(e).__name__})",
                                                     "upstream_unreachable"), {})
        except httpx.PoolTimeout:  # our own connection pool is exhausted: not the replica's fault
            return None, "unsent", (503, error_body(503, "the gateway has no free upstream connection",
                                                    "upstream_busy"), {"retry-after": "1"})
        except httpx.HTTPError as e:
            return None, "failed", (502, error_body(502, f"replica failed ({type(e).__name__})",
                                                    "upstream_failed"), {})
        try:
            if resp.status_code >= 500:
                body = _openai_error(resp.status_code, (await resp.aread()).decode(errors="replace"))
                headers = {"retry-after": resp.headers["retry-after"]} if "retry-after" in resp.headers else {}
                return None, "failed", (resp.status_code, body, headers)
            if resp.status_code in (401, 403):
                await resp.aread()
                return None, "failed", self._auth_failed(call, replica, resp.status_code)
            if resp.status_code != 200 or not call.stream:
                body = (await resp.aread()).decode(errors="replace")
                flight.finish(resp.status_code, body if resp.status_code == 200 else
                              _openai_error(resp.status_code, body))
                return True, "done", last  # a 4xx is the request's fault, never the replica's
            async for line in resp.aiter_lines():
                if line:
                    flight.push_event(line)
            if not flight.saw_done:
                raise httpx.RemoteProtocolError("stream ended without [DONE]")
            flight.finish()
            return True, "done", last
        except httpx.HTTPError as e:
            if not flight.chunks:
                return None, "failed", (502, error_body(502, f"replica failed ({type(e).__name__})",
                                                        "upstream_failed"), {})
            self.metrics.stream_errors.labels(call.model).inc()
            flight.cut = True
            flight.push_event("data: " + error_body(502, f"the replica failed mid-stream ({type(e).__name__}); "
                                                    "the response is incomplete", "upstream_failed"))
            flight.push_event(DONE.strip())
            flight.finish()
            return None, "done", last
        finally:
            await resp.aclose()

    def _auth_failed(self, call: Call, replica: Replica, status: int) -> tuple[int, str, dict]:
        """The replica refused the gateway's own key (its 401/403): a misconfiguration (the model's
        upstream_api_key_env), never the tenant's auth failure. Logged (no key) and counted; the client gets 502."""
        self.metrics.upstream_auth_failures.labels(call.model).inc()
        log.error(json.dumps({"event": "upstream_auth_failed", "model": call.model, "replica": replica.url,
                              "status": status, "request_id": call.request_id,
                              "key_sent": "authorization" in call.headers}))
        return 502, error_body(502, "the replica refused the gateway's credentials", "upstream_auth_failed"), {}


def upstream_client(cfg: GatewayConfig) -> httpx.AsyncClient:
    """The client every request to a replica goes through: one pool of up to cfg.upstream_max_connections, all of
    them kept alive (every open stream holds one, so a smaller keep-alive bound would reconnect under load)."""
    n = cfg.upstream_max_connections
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s, pool=cfg.upstream_pool_timeout_s),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n), trust_env=False)


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
