"""The gateway's HTTP app: OpenAI endpoints in front of replica pools, /health, /metrics, the admin API.

One request: auth → parse → route → idempotency → concurrency cap → rate limits → coalesce or start a Flight
(dispatch queue → replica → response) → answer the client (JSON, or SSE as events arrive) → settle the token
reservation with the actual usage.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from conveyor.gateway.admission import ModelQueue, Waiter
from conveyor.gateway.auth import bearer_key, find_tenant, key_matches, replica_label, tenant_cache_salt
from conveyor.gateway.config import ConfigError, GatewayConfig, ModelConfig, TenantConfig, load_config
from conveyor.gateway.metrics import GatewayMetrics
from conveyor.gateway.picker import Pool, affinity_key
from conveyor.gateway.proxy import Call, Flight, Forwarder, assemble, error_body
from conveyor.gateway.ratelimit import Decision, MemoryLimiter, RedisLimiter
from conveyor.gateway.router import auto_route
from conveyor.gateway.tokens import count_prompt_tokens, load_tokenizer, num_prompts, prompt_text

log = logging.getLogger("conveyor.gateway")
MAX_IDEMPOTENCY_ENTRIES = 10_000  # each keeps its whole response until it expires
access_log = logging.getLogger("conveyor.gateway.access")


@dataclass
class Ctx:
    """One client request, for the response headers, settlement and the access log."""
    rid: str
    started: float
    tenant: TenantConfig | None = None
    model: str = "unknown"
    cost: int = 0
    charged: bool = False  # holds a token reservation and a concurrency slot
    joined: str | None = None  # "coalesced" | "idempotent"
    deadline: float | None = None  # monotonic; this client's own, while its flight is queued
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def tenant_class(self) -> str:
        return self.tenant.cls if self.tenant else "none"


@dataclass
class IdempotencyEntry:
    request_hash: str
    flight: Flight
    expires: float


class Gateway:
    def __init__(self, cfg: GatewayConfig, config_path: str | None = None) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.metrics = GatewayMetrics()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512), trust_env=False)
        self.forwarder = Forwarder(cfg, self.client, self.metrics)
        self.limiter = self._limiter(cfg)
        self.pools: dict[str, Pool] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.concurrent: dict[str, int] = {}
        self.coalescing: dict[str, Flight] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyEntry] = {}
        self.background: set[asyncio.Task] = set()
        self.app = self._build_app()

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"])
        app.add_api_route("/admin/replicas", self.admin_list, methods=["GET"])
        app.add_api_route("/admin/replicas", self.admin_add, methods=["POST"])
        app.add_api_route("/admin/replicas/drain", self.admin_drain, methods=["POST"])
        app.add_api_route("/admin/replicas", self.admin_remove, methods=["DELETE"])
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        self.apply(self.cfg)
        for m in self.cfg.models:  # load tokenizers now, not on the first request
            await asyncio.to_thread(load_tokenizer, m.tokenizer)
        loop = asyncio.get_running_loop()
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        yield
        if self.config_path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for pool in self.pools.values():
            await pool.close()
        await self.limiter.close()
        await self.client.aclose()

    @staticmethod
    def _limiter(cfg: GatewayConfig):
        return RedisLimiter(cfg.redis_url) if cfg.redis_url else MemoryLimiter()

    def reload(self) -> None:
        """SIGHUP: re-read the config file. In-flight and queued requests are untouched; a bad file is ignored."""
        try:
            cfg = load_config(self.config_path)
        except (OSError, ConfigError) as e:
            log.error(json.dumps({"event": "config_reload_failed", "error": str(e)}))
            return
        if cfg.redis_url != self.cfg.redis_url:
            old, self.limiter = self.limiter, self._limiter(cfg)
            self._spawn(old.close())
        self.apply(cfg)
        log.info(json.dumps({"event": "config_reloaded", "models": [m.name for m in cfg.models],
                             "tenants": len(cfg.tenants)}))

    def apply(self, cfg: GatewayConfig) -> None:
        """Make pools and queues match cfg. Replicas added through the admin API are kept."""
        self.cfg = self.forwarder.cfg = cfg
        for m in cfg.models:
            pool = self.pools.get(m.name)
            if pool is None:
                pool = self.pools[m.name] = Pool(
                    m.name, m.max_in_flight_per_replica, self.client, breaker_failures=cfg.breaker_failures,
                    breaker_open_s=cfg.breaker_open_s, health_interval_s=cfg.health_interval_s,
                    scrape_interval_s=cfg.scrape_interval_s, affinity_max_load_ratio=cfg.affinity_max_load_ratio)
                self.queues[m.name] = ModelQueue(m.name, pool, m.max_queue, cfg.shed_batch_queue_ratio,
                                                 cfg.cold_start_timeout_s)
            pool.max_in_flight = m.max_in_flight_per_replica
            pool.headers = _upstream_headers(m)
            pool.breaker_failures, pool.breaker_open_s = cfg.breaker_failures, cfg.breaker_open_s  # new replicas
            pool.health_interval_s, pool.scrape_interval_s = cfg.health_interval_s, cfg.scrape_interval_s
            pool.affinity_max_load_ratio = cfg.affinity_max_load_ratio
            q = self.queues[m.name]
            q.max_queue, q.shed_batch_ratio, q.cold_start_timeout_s = (m.max_queue, cfg.shed_batch_queue_ratio,
                                                                       cfg.cold_start_timeout_s)
            for url, r in list(pool.replicas.items()):
                if r.source == "config" and url not in m.replicas:
                    pool.remove(url)
            for url in m.replicas:
                pool.add(url, "config")
            q.pump()
        for name in [n for n in self.pools if cfg.model(n) is None or cfg.model(n).name != n]:
            self._spawn(self.pools.pop(name).close())
            self.queues.pop(name)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ---- plain endpoints -----------------------------------------------------------------------------------------
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "models": {n: p.states() for n, p in self.pools.items()}})

    async def metrics_endpoint(self) -> Response:
        m = self.metrics
        for name, pool in self.pools.items():
            m.queued.labels(name).set(len(self.queues[name]))
            m.in_flight.labels(name).set(sum(r.in_flight for r in pool.replicas.values()))
            for state, n in pool.states().items():
                m.replicas.labels(name, state).set(n)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        if find_tenant(request.headers.get("authorization"), self.cfg.tenants) is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        names = [n for m in self.cfg.models for n in (m.name, *m.aliases)]
        if self.cfg.auto_route is not None:
            names.append("auto")
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                                         "owned_by": "conveyor"} for n in names]})

    # ---- the proxy path ------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self.proxy(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self.proxy(request, "/v1/chat/completions")

    async def proxy(self, request: Request, path: str) -> Response:
        ctx = Ctx(rid=request.headers.get("x-request-id") or uuid.uuid4().hex, started=time.monotonic())
        try:
            return await self._proxy(request, path, ctx)
        except _Reject as e:
            return self._reject(ctx, e)

    async def _proxy(self, request: Request, path: str, ctx: Ctx) -> Response:
        cfg = self.cfg
        ctx.tenant = tenant = find_tenant(request.headers.get("authorization"), cfg.tenants)
        if tenant is None:
            raise _Reject(401, "auth", "invalid or missing API key", "invalid_api_key")
        body = await self._body(request)
        model = self._route(request, body, tenant, ctx)
        ctx.model = model.name
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        # identical deterministic requests share one generation, streamed upstream so that streaming and
        # non-streaming clients can share it (logprobs and echo are left out: they are not reassembled here)
        deterministic = body.get("temperature") == 0 or body.get("seed") is not None
        coalescable = deterministic and not any(body.get(k) for k in ("logprobs", "top_logprobs", "echo"))
        client_salt = body.get("cache_salt")
        if client_salt is not None and not isinstance(client_salt, str):
            raise _Reject(400, "bad_request", "cache_salt must be a string", param="cache_salt")
        salt = tenant_cache_salt(tenant.name, client_salt)  # prefix-cache hits only within this tenant
        upstream = dict(body, model=model.upstream_model, cache_salt=salt)
        if stream or coalescable:
            upstream.update(stream=True, stream_options={"include_usage": True})  # usage settles the tokens
        content = {k: v for k, v in body.items() if k not in ("user", "model", "stream", "stream_options")}
        request_hash = _hash({"path": path, "model": model.name, "body": content, "stream": stream})
        coalesce_key = _hash({"tenant": tenant.name, "path": path, "model": model.name, "body": content})
        ctx.deadline = self._deadline(request, tenant)

        idem = request.headers.get("idempotency-key")
        if idem and (flight := self._idempotent(tenant, idem, request_hash)) is not None:
            self.metrics.idempotent_replays.labels(model.name).inc()
            ctx.joined = "idempotent"
            ctx.headers = (await self.limiter.acquire(tenant, 0, take=False)).headers()
            return await self._respond(request, ctx, flight, stream, include_usage, path)

        if self.concurrent.get(tenant.name, 0) >= tenant.max_concurrent:
            decision = await self.limiter.acquire(tenant, 0, take=False)
            raise _Reject(429, "concurrency", f"too many concurrent requests (max {tenant.max_concurrent})",
                          "concurrency_limit_exceeded", {**decision.headers(), "retry-after": "1"})
        self.concurrent[tenant.name] = self.concurrent.get(tenant.name, 0) + 1  # before any await: no races
        ctx.cost = _prompt_tokens(body, model.tokenizer) + _max_tokens(body, model) * _n(body) * num_prompts(body)
        try:
            decision = await self.limiter.acquire(tenant, ctx.cost)
        except BaseException:
            self.concurrent[tenant.name] -= 1
            raise
        ctx.headers = decision.headers()
        if not decision.allowed:
            self.concurrent[tenant.name] -= 1
            raise self._rate_limited(decision)
        ctx.charged = True  # holds a reservation and the concurrency slot until _settle

        flight = self.coalescing.get(coalesce_key) if coalescable else None
        if flight is not None and not flight.done:
            self.metrics.coalesced.labels(model.name).inc()
            ctx.joined = "coalesced"
        else:
            # a shared flight has no one client's deadline: each client keeps its own (see _respond)
            flight = self._start(model, tenant, path, upstream, bool(upstream.get("stream")), ctx,
                                 None if coalescable else ctx.deadline,
                                 affinity_key(prompt_text(body), cfg.affinity_prefix_chars, salt))
            if coalescable:
                self.coalescing[coalesce_key] = flight
                flight.task.add_done_callback(lambda _t, k=coalesce_key, f=flight: self.coalescing.pop(k, None)
                                              if self.coalescing.get(k) is f else None)
        if idem:
            self.idempotency[(tenant.name, idem)] = IdempotencyEntry(request_hash, flight,
                                                                     time.monotonic() + cfg.idempotency_window_s)
        return await self._respond(request, ctx, flight, stream, include_usage, path)

    async def _body(self, request: Request) -> dict:
        if int(request.headers.get("content-length") or 0) > self.cfg.max_body_bytes:
            raise _Reject(413, "too_large", "request body too large")
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise _Reject(413, "too_large", "request body too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Reject(400, "bad_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Reject(400, "bad_request", "the body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise _Reject(400, "bad_request", "'model' is required", "missing_model", param="model")
        return body

    def _route(self, request: Request, body: dict, tenant: TenantConfig, ctx: Ctx) -> ModelConfig:
        cfg, name = self.cfg, body["model"]
        if name == "auto" and cfg.auto_route is not None:
            tokens = _prompt_tokens(body, cfg.model(cfg.auto_route.small).tokenizer)
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")

            def overloaded(model: str) -> bool:
                q = self.queues[model]
                return q.overloaded(cfg.auto_route.degrade_queue_ratio) or not q.pool.usable()

            model, _why = auto_route(cfg, tokens, max_tokens, request.headers.get("x-conveyor-route"), tenant,
                                     overloaded)
            return model
        model = cfg.model(name)
        if model is None:
            raise _Reject(404, "model_not_found", f"the model {name!r} does not exist", "model_not_found",
                          param="model")
        return model

    def _deadline(self, request: Request, tenant: TenantConfig) -> float | None:
        raw = request.headers.get("x-request-timeout")
        if raw is None:
            timeout = tenant.default_timeout_s
        else:
            try:
                timeout = float(raw)
                assert timeout > 0
            except (ValueError, AssertionError):
                raise _Reject(400, "bad_request", "X-Request-Timeout must be a number of seconds > 0") from None
        return None if timeout is None else time.monotonic() + timeout

    def _idempotent(self, tenant: TenantConfig, key: str, request_hash: str) -> Flight | None:
        now = time.monotonic()
        while self.idempotency:  # oldest first (insertion order); bounded in count as well as time
            first = next(iter(self.idempotency))
            if self.idempotency[first].expires >= now and len(self.idempotency) <= MAX_IDEMPOTENCY_ENTRIES:
                break
            del self.idempotency[first]
        entry = self.idempotency.get((tenant.name, key))
        if entry is None:
            return None
        if entry.request_hash != request_hash:
            raise _Reject(422, "idempotency_mismatch", "this Idempotency-Key was used with a different request",
                          "idempotency_key_reused")
        f = entry.flight
        if f.done and (f.status is None or f.status >= 500 or f.status in (408, 429, 499)):
            del self.idempotency[(tenant.name, key)]  # it failed: let this one try again
            return None
        return f

    def _start(self, model: ModelConfig, tenant: TenantConfig, path: str, upstream: dict, stream: bool, ctx: Ctx,
               deadline: float | None, affinity: str | None) -> Flight:
        flight = Flight(stream)
        waiter = Waiter(tenant.name, tenant.cls, ctx.cost, tenant.weight, affinity, deadline)
        call = Call(model.name, tenant.cls, self.queues[model.name], path, json.dumps(upstream).encode(), waiter,
                    ctx.rid, stream, _upstream_headers(model))
        flight.task = asyncio.create_task(self.forwarder.run(flight, call))
        return flight

    def _rate_limited(self, d: Decision) -> _Reject:
        if d.reason == "too_large":
            return _Reject(429, "rate_limit_tokens", f"the request needs more tokens than the limit of "
                           f"{d.limit_tokens} per minute", "request_too_large", d.headers())
        what = "requests" if d.reason == "requests" else "tokens"
        return _Reject(429, f"rate_limit_{what}", f"Rate limit reached for {what} per minute; retry in "
                       f"{d.retry_after_s:.1f}s", "rate_limit_exceeded", d.headers())

    async def _respond(self, request: Request, ctx: Ctx, flight: Flight, stream: bool, include_usage: bool,
                       path: str) -> Response:
        assert flight.stream or not stream
        flight.subscribe()
        try:
            reached = await _until_disconnect(request, _client_wait(ctx, flight, stream))
        except BaseException:
            flight.unsubscribe()
            self._settle(ctx, flight, 499)
            raise
        if reached is not True:  # this client leaves; the flight goes on while it has other clients
            flight.unsubscribe()
            if reached is None:
                self._settle(ctx, flight, 499)
                return Response(status_code=499)
            self.metrics.rejections.labels(ctx.model, ctx.tenant_class, "deadline").inc()
            self._settle(ctx, flight, 408)
            return JSONResponse(json.loads(error_body(408, "the request's deadline passed while it was queued",
                                                      "deadline")), status_code=408,
                                headers={**ctx.headers, "x-request-id": ctx.rid, "x-conveyor-model": ctx.model})
        status = flight.status or 502
        headers = {**ctx.headers, **flight.headers, **self._info_headers(ctx, flight)}
        if stream and status == 200:
            async def events():
                final = 499
                try:
                    async for chunk in flight.events(include_usage):
                        yield chunk
                    final = 502 if flight.cut else 200
                finally:
                    flight.unsubscribe()
                    self._settle(ctx, flight, final)
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        flight.unsubscribe()
        content = flight.chunks[0] if status != 200 or not flight.stream else \
            assemble(flight, path.endswith("/chat/completions"))
        if flight.stream and flight.cut:
            status, content = 502, error_body(502, "the replica failed while generating", "upstream_failed")
        self._settle(ctx, flight, status)
        return Response(content, status_code=status, media_type="application/json", headers=headers)

    def _info_headers(self, ctx: Ctx, flight: Flight) -> dict[str, str]:
        h = {"x-request-id": ctx.rid, "x-conveyor-model": ctx.model}
        if flight.queue_ms is not None:
            h["x-conveyor-queue-time-ms"] = f"{flight.queue_ms:.2f}" if ctx.joined is None else "0"
        if flight.replica:
            h["x-conveyor-replica"] = replica_label(flight.replica)
        if ctx.joined:
            h["x-conveyor-joined"] = ctx.joined
        return h

    def _settle(self, ctx: Ctx, flight: Flight, status: int) -> None:
        """The request is over for this client: return unused tokens, free its concurrency slot, log it."""
        tenant = ctx.tenant
        assert tenant is not None
        if ctx.charged:
            ctx.charged = False
            self.concurrent[tenant.name] -= 1
            if flight.usage:
                used = int(flight.usage.get("total_tokens", 0))
            else:  # failed before generating: nothing used; cut off mid-way: keep the reservation
                used = ctx.cost if flight.chunks and status in (200, 499) and flight.status == 200 else 0
            if used != ctx.cost:
                self._spawn(self.limiter.refund(tenant, ctx.cost - used))
        self.metrics.requests.labels(ctx.model, ctx.tenant_class, str(status)).inc()
        self._access_log(ctx, status, flight)

    def _reject(self, ctx: Ctx, e: _Reject) -> Response:
        self.metrics.rejections.labels(ctx.model, ctx.tenant_class, e.reason).inc()
        self.metrics.requests.labels(ctx.model, ctx.tenant_class, str(e.status)).inc()
        self._access_log(ctx, e.status, None, e.reason)
        return JSONResponse(json.loads(error_body(e.status, e.message, e.code, e.param)), status_code=e.status,
                            headers={**e.headers, "x-request-id": ctx.rid})

    def _access_log(self, ctx: Ctx, status: int, flight: Flight | None, reason: str | None = None) -> None:
        entry = {"event": "access", "request_id": ctx.rid, "tenant": ctx.tenant.name if ctx.tenant else None,
                 "tenant_class": ctx.tenant_class, "model": ctx.model, "status": status,
                 "total_ms": round((time.monotonic() - ctx.started) * 1000, 2)}
        if reason:
            entry["reason"] = reason
        if flight is not None:
            entry.update(replica=flight.replica, queue_ms=flight.queue_ms and round(flight.queue_ms, 2),
                         retries=flight.retries, joined=ctx.joined, reserved_tokens=ctx.cost,
                         usage=flight.usage)
        access_log.info(json.dumps(entry))

    # ---- admin API (for the autoscaler) --------------------------------------------------------------------------
    def _admin_check(self, request: Request) -> None:
        if not key_matches(bearer_key(request.headers.get("authorization")), self.cfg.admin_api_key_sha256):
            raise _Reject(401, "auth", "admin endpoints need the admin API key", "invalid_api_key")

    async def _admin_target(self, request: Request) -> tuple[Pool, str]:
        self._admin_check(request)
        try:
            body = json.loads(await request.body())
            name, url = body["model"], body["url"]
            assert isinstance(name, str) and isinstance(url, str) and url.startswith(("http://", "https://"))
        except (ValueError, KeyError, TypeError, AssertionError):
            raise _Reject(400, "bad_request", 'the body must be {"model": NAME, "url": "http://HOST:PORT"}') from None
        model = self.cfg.model(name)
        if model is None or model.name not in self.pools:
            raise _Reject(404, "model_not_found", f"the model {name!r} does not exist", "model_not_found")
        return self.pools[model.name], url.rstrip("/")

    async def admin_list(self, request: Request) -> Response:
        try:
            self._admin_check(request)
        except _Reject as e:
            return self._reject(Ctx(rid=uuid.uuid4().hex, started=time.monotonic()), e)
        now = time.monotonic()
        return JSONResponse({"models": {name: [{"url": r.url, "label": replica_label(r.url), "state": r.state(now),
                                                "in_flight": r.in_flight}
                                               for r in pool.replicas.values()]
                                        for name, pool in self.pools.items()}})

    async def _admin(self, request: Request, action) -> Response:
        ctx = Ctx(rid=uuid.uuid4().hex, started=time.monotonic())
        try:
            pool, url = await self._admin_target(request)
            return await action(pool, url)
        except _Reject as e:
            return self._reject(ctx, e)

    async def admin_add(self, request: Request) -> Response:
        async def add(pool: Pool, url: str) -> Response:
            r = pool.add(url, "admin")
            log.info(json.dumps({"event": "replica_added", "model": pool.model, "replica": url}))
            return JSONResponse({"model": pool.model, "url": url, "state": r.state(time.monotonic())})
        return await self._admin(request, add)

    async def admin_drain(self, request: Request) -> Response:
        return await self._admin(request, lambda pool, url: self._retire(pool, url, "draining", pool.drain))

    async def admin_remove(self, request: Request) -> Response:
        return await self._admin(request, lambda pool, url: self._retire(pool, url, "removed", pool.remove))

    async def _retire(self, pool: Pool, url: str, event: str, act) -> Response:
        """Drain or remove a replica; its in-flight requests finish either way."""
        r = act(url)
        if r is None:
            raise _Reject(404, "not_found", f"{url} is not a replica of {pool.model!r}", "replica_not_found")
        log.info(json.dumps({"event": f"replica_{event}", "model": pool.model, "replica": url}))
        return JSONResponse({"model": pool.model, "url": url, "in_flight": r.in_flight})


class _Reject(Exception):
    def __init__(self, status: int, reason: str, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.code = status, reason, message, code or reason
        self.headers, self.param = headers or {}, param


def _upstream_headers(model: ModelConfig) -> dict[str, str]:
    key = model.upstream_api_key
    return {"authorization": f"Bearer {key}"} if key else {}


def _prompt_tokens(body: dict, tokenizer: str | None) -> int:
    try:
        return count_prompt_tokens(body, load_tokenizer(tokenizer))
    except Exception:  # noqa: BLE001 - a malformed prompt: the replica answers 400; charge by size meanwhile
        return len(json.dumps(body)) // 4


def _max_tokens(body: dict, model: ModelConfig) -> int:
    v = body.get("max_tokens") or body.get("max_completion_tokens")
    return v if isinstance(v, int) and v > 0 else model.default_max_tokens


def _n(body: dict) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(json.loads(error_body(status, message, code)), status_code=status)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _client_wait(ctx: Ctx, flight: Flight, stream: bool) -> bool:
    """Wait until the flight has what this client needs (its first event, or the whole response); False when this
    client's own deadline passed while the flight was still queued. Coalesced clients each keep their own deadline."""
    if ctx.deadline is not None and not flight.dispatched.is_set():
        try:
            await asyncio.wait_for(flight.dispatched.wait(), max(0.0, ctx.deadline - time.monotonic()))
        except TimeoutError:
            return False
    await (flight.head() if stream else flight.wait_done())
    return True


async def _until_disconnect(request: Request, aw):
    """aw's result, unless the client disconnects first (then aw is cancelled and None returned)."""
    task = asyncio.ensure_future(aw)
    gone = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_gateway(config_path: str) -> Gateway:
    return Gateway(load_config(config_path), config_path)
