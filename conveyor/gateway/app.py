"""The gateway's HTTP app: OpenAI endpoints in front of replica pools, /health, /metrics, the admin API.

One request: auth → concurrency slot → read the body (bounded in size and time) → parse and check it (off the
event loop) → route → idempotency → count tokens (off the event loop) → rate limits → coalesce or start a Flight
(dispatch queue → replica → response) → answer the client (JSON, or SSE as events arrive) → settle: the slot is
freed and the token reservation settled by the actual usage, exactly once whichever way the request ends.

Every error is OpenAI's error JSON with an access-log line and a metric, including unknown routes and methods, and
an unexpected exception (logged with its traceback, answered 500).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from opentelemetry.trace import Span
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp

from conveyor.gateway import batch_api
from conveyor.gateway.admission import ModelQueue, Waiter
from conveyor.gateway.auth import bearer_key, find_tenant, key_matches, replica_label, tenant_cache_salt
from conveyor.gateway.body import BodyError, Parsed, parse_body, parse_object
from conveyor.gateway.batch_store import BatchStore, default_path
from conveyor.gateway.batch_worker import BatchWorker
from conveyor.gateway.budget import budget, check_fits, least_limit
from conveyor.gateway.config import (CLASSES, ConfigError, GatewayConfig, ModelConfig, TenantConfig, load_config,
                                     replica_url)
from conveyor.gateway.idempotency import IdempotencyCache, KeyReused
from conveyor.gateway.shared_idempotency import RETRY_AFTER_S, Claim, SharedIdempotency
from conveyor.gateway.metrics import REFRESH_S, GatewayMetrics, multiprocess_dir
from conveyor.gateway.hot_routes import FrontedFastAPI, HotRoutes
from conveyor.gateway.overload import Overload, OverloadGuard, raise_nofile_limit
from conveyor.gateway.picker import Pool, Replica, affinity_key
from conveyor.gateway.proxy import Call, Flight, Forwarder, error_body, total_tokens, upstream_client
from conveyor.gateway.ratelimit import Decision, MemoryLimiter, RedisLimiter
from conveyor.gateway.router import auto_route
from conveyor.gateway.shared import SharedState, detach
from conveyor.gateway.sse import EventStream
from conveyor.gateway.tokens import count_prompt_tokens, load_tokenizer, prompt_floor
from conveyor.http_limits import BodyTimeout, BodyTooLarge, read_body, valid_request_id
from conveyor.tracing import Tracing, end_gateway_span, start_gateway_span

log = logging.getLogger("conveyor.gateway")
access_log = logging.getLogger("conveyor.gateway.access")
INLINE_BODY_BYTES = 16 << 10  # smaller bodies are parsed on the event loop: sub-millisecond
INLINE_TEXT_CHARS = 2048  # shorter prompts are counted on the event loop: a few milliseconds at most


@dataclass
class Ctx:
    """One client request, for the response headers, settlement and the access log."""
    rid: str
    started: float
    tenant: TenantConfig | None = None
    model: str = "unknown"
    cost: int = 0
    slot: bool = False  # holds one of its tenant's max_concurrent slots
    reserved: bool = False  # holds a reservation of `cost` tokens in the rate limiter
    logged: bool = False  # its access-log line is written
    joined: str | None = None  # "coalesced" | "idempotent"
    deadline: float | None = None  # monotonic; this client's own, while its flight is queued
    headers: dict[str, str] = field(default_factory=dict)
    span: Span | None = None  # its tracing span; None: tracing off
    batch_line: bool = False  # a Batch API line: outside the tenant's per-minute limits (see _reserve)
    shared: SharedState | None = None  # the store that also counts its slot, across gateway processes

    @property
    def tenant_class(self) -> str:
        return self.tenant.cls if self.tenant else "none"


class Gateway:
    def __init__(self, cfg: GatewayConfig, config_path: str | None = None, tracing: Tracing | None = None,
                 runs_batches: bool = True) -> None:
        """runs_batches=False: the Batch API is served but this process runs no batch worker (with --workers N,
        one worker process runs it: its exactly-once rules assume one dispatcher)."""
        self.cfg, self.config_path, self.tracing, self.runs_batches = cfg, config_path, tracing, runs_batches
        self.metrics = GatewayMetrics()
        self.client = upstream_client(cfg)
        self.forwarder = Forwarder(cfg, self.metrics, tracing)
        self.limiter = self._limiter(cfg)
        self.shared_idempotency = self._shared_idempotency(cfg)  # with redis_url: Idempotency-Keys across processes
        self.shared: SharedState | None = None  # with redis_url: slots and the replicas' split across processes
        self.pools: dict[str, Pool] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.concurrent: dict[str, int] = {}  # tenant → slots held
        self.coalescing: dict[str, Flight] = {}
        self.idempotency = IdempotencyCache(cfg.idempotency_window_s, cfg.idempotency_max_entries,
                                            cfg.idempotency_max_bytes)
        self.cpu = ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="gateway-cpu")  # parse, tokenize
        self.background: set[asyncio.Task] = set()
        self.batch_store: BatchStore | None = None  # opened at start (_lifespan)
        self.batch_worker: BatchWorker | None = None  # started with the store
        self.overload = Overload(cfg.overload, raise_nofile_limit())  # the gateway's own limit (overload.py)
        self.app = self._build_app()

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        # FastAPI's own OpenTelemetry off: the gateway traces itself (tracing.py); otherwise each request looks up
        # the global providers just to find them unset
        hot = {"/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions}

        def front(stack: ASGIApp) -> ASGIApp:  # the guard first, then the hot routes, then FastAPI's stack
            return OverloadGuard(HotRoutes(stack, hot, self._on_unexpected), self.overload, self._overloaded)
        app = FrontedFastAPI(front, lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                             telemetry={"tracing": False, "metrics": False, "logs": False})
        app.add_exception_handler(StarletteHTTPException, self._on_http_error)
        app.add_exception_handler(Exception, self._on_unexpected)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model_card, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"])
        app.add_api_route("/admin/replicas", self.admin_list, methods=["GET"])
        app.add_api_route("/admin/replicas", self.admin_add, methods=["POST"])
        app.add_api_route("/admin/replicas/drain", self.admin_drain, methods=["POST"])
        app.add_api_route("/admin/replicas", self.admin_remove, methods=["DELETE"])
        batch_api.install(app, self)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        self.apply(self.cfg)
        for m in self.cfg.models:  # load tokenizers now, not on the first request
            await asyncio.to_thread(load_tokenizer, m.tokenizer)
        self.batch_store = await asyncio.to_thread(BatchStore, self.cfg.batch.db_path or default_path())
        self.batch_worker = BatchWorker(self, self.batch_store)
        if self.runs_batches:
            self.batch_worker.start()
        refresher = asyncio.create_task(self._refresh_loop()) if multiprocess_dir() else None
        self.overload.start()
        self._share(self.cfg)
        loop = asyncio.get_running_loop()
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        yield
        if self.config_path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        self.overload.stop()
        if refresher is not None:
            refresher.cancel()
        await self.batch_worker.stop()  # its lines in flight stay queued in the store
        for pool in self.pools.values():
            await pool.close()
        await self.limiter.close()
        if self.shared_idempotency is not None:
            await self.shared_idempotency.close()
        if self.shared is not None:
            await self.shared.close()
        await self.client.aclose()
        await self.forwarder.aclose()
        self.cpu.shutdown(wait=False, cancel_futures=True)
        self.batch_store.close()

    def _limiter(self, cfg: GatewayConfig):
        if not cfg.redis_url:
            return MemoryLimiter()
        return RedisLimiter(cfg.redis_url, on_error=cfg.ratelimit_on_redis_error,
                            on_fallback=lambda op: self.metrics.ratelimit_fallbacks.labels(op).inc())

    def _shared_idempotency(self, cfg: GatewayConfig) -> SharedIdempotency | None:
        if not cfg.redis_url:
            return None
        return SharedIdempotency(cfg.redis_url, cfg.idempotency_window_s,
                                 lambda op: self.metrics.shared_fallbacks.labels(f"idempotency_{op}").inc())

    def _share(self, cfg: GatewayConfig) -> None:
        """Start sharing slots and capacity through cfg.redis_url (none: stop, every limit back to this process)."""
        if self.shared is not None:
            self._spawn(self.shared.close())
            detach(self.pools.values(), self.queues.values())
        self.shared = None
        if cfg.redis_url:
            self.shared = SharedState(cfg.redis_url, cfg.redis_heartbeat_ttl_s, cfg.redis_sync_interval_s,
                                      lambda: {n: (self.pools[n], self.queues[n]) for n in self.pools},
                                      lambda op: self.metrics.shared_fallbacks.labels(op).inc())
            self.shared.start()

    def reload(self) -> None:
        """SIGHUP: re-read the config file. In-flight and queued requests are untouched; a bad file is ignored."""
        try:
            cfg = load_config(self.config_path)
        except (OSError, ConfigError) as e:
            log.error(json.dumps({"event": "config_reload_failed", "error": str(e)}))
            return
        if (cfg.redis_url, cfg.ratelimit_on_redis_error) != (self.cfg.redis_url, self.cfg.ratelimit_on_redis_error):
            old, self.limiter = self.limiter, self._limiter(cfg)
            self._spawn(old.close())
        if cfg.redis_url != self.cfg.redis_url:  # claims held meanwhile expire in the old Redis
            old_idem, self.shared_idempotency = self.shared_idempotency, self._shared_idempotency(cfg)
            if old_idem is not None:
                self._spawn(old_idem.close())
        shared = ("redis_url", "ratelimit_on_redis_error", "redis_heartbeat_ttl_s", "redis_sync_interval_s")
        reshare = any(getattr(cfg, k) != getattr(self.cfg, k) for k in shared)
        self.apply(cfg)
        if reshare:  # slots taken before are released through the SharedState that took them (Ctx.shared)
            self._share(cfg)
        loop = asyncio.get_running_loop()
        for m in cfg.models:  # a new tokenizer loads in the pool, not on the first request's event loop turn
            self._spawn(loop.run_in_executor(self.cpu, load_tokenizer, m.tokenizer))
        log.info(json.dumps({"event": "config_reloaded", "models": [m.name for m in cfg.models],
                             "tenants": len(cfg.tenants)}))

    def apply(self, cfg: GatewayConfig) -> None:
        """Make pools and queues match cfg. Replicas added through the admin API are kept."""
        self.cfg = self.forwarder.cfg = cfg
        self.overload.apply(cfg.overload)
        ic = self.idempotency
        ic.window_s, ic.max_entries, ic.max_bytes = (cfg.idempotency_window_s, cfg.idempotency_max_entries,
                                                     cfg.idempotency_max_bytes)
        if self.shared_idempotency is not None:
            self.shared_idempotency.window_s = cfg.idempotency_window_s
        for m in cfg.models:
            pool = self.pools.get(m.name)
            if pool is None:
                pool = self.pools[m.name] = Pool(
                    m.name, m.max_in_flight_per_replica, self.client, breaker_failures=cfg.breaker_failures,
                    breaker_open_s=cfg.breaker_open_s, health_interval_s=cfg.health_interval_s,
                    scrape_interval_s=cfg.scrape_interval_s, affinity_max_load_ratio=cfg.affinity_max_load_ratio)
                self.queues[m.name] = ModelQueue(m.name, pool, m.max_queue, cfg.shed_batch_queue_ratio,
                                                 cfg.cold_start_timeout_s)
            pool.max_in_flight, pool.upstream_model = m.max_in_flight_per_replica, m.upstream_model
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

    async def metrics_endpoint(self, request: Request) -> Response:
        """Prometheus text; the per-tenant series only for `Authorization: Bearer <admin key>`."""
        await self._refresh_metrics()
        admin = key_matches(bearer_key(request.headers.get("authorization")), self.cfg.admin_api_key_sha256)
        return Response(self.metrics.render(admin), media_type=CONTENT_TYPE_LATEST)

    async def _refresh_metrics(self) -> None:
        """Set the gauges read from this process's state (and the batch store's counts)."""
        m = self.metrics
        for name, pool in self.pools.items():
            m.queued.labels(name).set(len(self.queues[name]))
            m.in_flight.labels(name).set(sum(r.in_flight for r in pool.replicas.values()))
            for state, n in pool.states().items():
                m.replicas.labels(name, state).set(n)
        m.open_requests.set(self.overload.open)
        m.max_open_requests.set(self.overload.max_open)
        m.event_loop_lag.set(self.overload.lag.lag)
        m.accept_queue.set(self.overload.accept_queue.length())
        if self.batch_worker is not None:
            await self.batch_worker.refresh_metrics()

    async def _refresh_loop(self) -> None:
        """With --workers N: a scrape reads every worker's gauges, so each worker keeps its own fresh."""
        while True:
            try:
                await self._refresh_metrics()
            except Exception as e:  # e.g. the batch store busy: the next turn tries again
                log.warning(json.dumps({"event": "metrics_refresh_failed", "error": f"{type(e).__name__}: {e}"}))
            await asyncio.sleep(REFRESH_S)

    async def models(self, request: Request) -> Response:
        """The models this tenant may use, aliases and `auto` included."""
        tenant = find_tenant(request.headers.get("authorization"), self.cfg.tenants)
        if tenant is None:
            return self._reject(Ctx(rid=uuid.uuid4().hex, started=time.monotonic()),
                                _Reject(401, "auth", "invalid or missing API key", "invalid_api_key"))
        names = [n for m in self.cfg.models for n in (m.name, *m.aliases)] + ["auto"]
        return JSONResponse({"object": "list", "data": [self._card(n) for n in names
                                                        if self.cfg.may_use(tenant, n)]})

    async def model_card(self, request: Request, model_id: str) -> Response:
        """GET /v1/models/{id}: one model (a name, an alias or `auto`), or OpenAI's 404."""
        ctx = Ctx(rid=uuid.uuid4().hex, started=time.monotonic())
        tenant = find_tenant(request.headers.get("authorization"), self.cfg.tenants)
        if tenant is None:
            return self._reject(ctx, _Reject(401, "auth", "invalid or missing API key", "invalid_api_key"))
        if not self.cfg.may_use(tenant, model_id):
            return self._reject(ctx, _no_model(model_id))
        return JSONResponse(self._card(model_id))

    def _card(self, name: str) -> dict:
        """OpenAI's model object with vLLM's max_model_len: the context its replicas reported (for `auto`, the
        smaller of its two models'), null while none has."""
        if name == "auto":
            lens = [self._max_model_len(m) for m in (self.cfg.auto_route.small, self.cfg.auto_route.large)]
            mml = None if None in lens else min(lens)
        else:
            mml = self._max_model_len(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "conveyor", "max_model_len": mml}

    def _max_model_len(self, name: str) -> int | None:
        pool = self.pools.get(self.cfg.model(name).name)
        return pool.max_model_len() if pool is not None else None

    # ---- the proxy path ------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self.proxy(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self.proxy(request, "/v1/chat/completions")

    async def tokenize(self, request: Request) -> Response:
        return await self.proxy(request, "/tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self.proxy(request, "/detokenize")

    async def proxy(self, request: Request, path: str) -> Response:
        ctx = Ctx(rid=uuid.uuid4().hex, started=time.monotonic())
        if self.tracing is not None:
            ctx.span = start_gateway_span(self.tracing.tracer, request.headers, path)
        handler = self._proxy if path.startswith("/v1/") else self._utility
        return await self._guarded(ctx, handler(request, path, ctx))

    async def _guarded(self, ctx: Ctx, work) -> Response:
        """The response of the coroutine `work`; a refusal or a bug answered with OpenAI's error JSON. Whatever
        happens, what ctx holds (slot, reservation) is freed exactly once."""
        try:
            return await work
        except _Reject as e:
            self._release(ctx, 0)
            return self._reject(ctx, e)
        except Exception as e:  # a bug: never a leaked slot, never a plain-text 500
            self._release(ctx, 0)
            return self._internal_error(ctx, e)
        except BaseException:  # cancelled: nothing to answer, but the slot and the reservation go back
            self._release(ctx, 0)
            raise

    async def _proxy(self, request: Request, path: str, ctx: Ctx) -> Response:
        """Raises _Reject for every refusal; whatever it raises, proxy() frees what ctx holds."""
        tenant = await self._admit_client(request, ctx)
        idem = request.headers.get("idempotency-key")
        parsed = await self._parse(request, parse_body, path.endswith("/chat/completions"), idem is not None)
        model = await self._route(parsed, tenant, request.headers.get("x-conveyor-route"))
        ctx.model = model.name
        ctx.deadline = self._deadline(request, tenant)

        if idem is not None and not 1 <= len(idem) <= 255:
            raise _Reject(400, "bad_request", "Idempotency-Key must be 1-255 characters", "invalid_idempotency_key")
        # the same request (every field that can change the response, stream included) for Idempotency-Key
        request_hash = _hash({"path": path, "model": model.name, "body": parsed.digest, "stream": parsed.stream}) \
            if idem else ""
        if idem and (flight := self._idempotent(tenant, idem, request_hash)) is not None:
            self.metrics.idempotent_replays.labels(model.name).inc()
            ctx.joined = "idempotent"
            ctx.headers = (await self.limiter.acquire(tenant, 0, take=False)).headers()
            return await self._respond(request, ctx, flight, parsed.stream, parsed.include_usage, path)
        shared, claim = self.shared_idempotency, None
        if idem and shared is not None:
            claim = await shared.claim(tenant.name, idem, request_hash)
            if claim.state != "run":
                return await self._claimed_elsewhere(ctx, tenant, claim)
        try:
            flight = await self._launch(ctx, tenant, model, parsed, path)
        except BaseException:
            if claim is not None:
                self._spawn(shared.settle(tenant.name, idem, claim, None))
            raise
        if idem:
            self.idempotency.put(tenant.name, idem, request_hash, flight)
        if claim is not None:
            self._spawn(shared.follow(tenant.name, idem, claim, flight))
        return await self._respond(request, ctx, flight, parsed.stream, parsed.include_usage, path)

    async def _claimed_elsewhere(self, ctx: Ctx, tenant: TenantConfig, claim: Claim) -> Response:
        """An Idempotency-Key another gateway process has: its stored answer replayed, or a 409 while it runs (or
        a 422 when it was used with another request); raises _Reject for the refusals."""
        if claim.state == "mismatch":
            raise _Reject(422, "idempotency_mismatch", "this Idempotency-Key was used with a different request",
                          "idempotency_key_reused")
        if claim.state == "running":
            raise _Reject(409, "idempotency_in_progress", "a request with this Idempotency-Key is still running; "
                          f"retry in {RETRY_AFTER_S}s", "idempotency_key_in_use", {"retry-after": str(RETRY_AFTER_S)})
        assert claim.state == "done", claim.state
        self.metrics.idempotent_replays.labels(ctx.model).inc()
        ctx.joined = "idempotent"
        headers = (await self.limiter.acquire(tenant, 0, take=False)).headers()
        self._release(ctx, 0)
        self._access_log(ctx, claim.status, None)
        return Response(claim.body, status_code=claim.status, media_type="application/json",
                        headers={**headers, **claim.headers, "x-request-id": ctx.rid, "x-conveyor-model": ctx.model,
                                 "x-conveyor-joined": "idempotent"})

    async def _launch(self, ctx: Ctx, tenant: TenantConfig, model: ModelConfig, parsed: Parsed, path: str) -> Flight:
        """Count the prompt, refuse what the replica surely would, reserve the tokens, then join an identical
        generation in flight or start one (queue → replica → response). Shared by HTTP requests and batch lines
        (dispatch_line); raises _Reject, and ctx holds the reservation for the caller to settle."""
        cfg, body = self.cfg, parsed.body
        salt = tenant_cache_salt(tenant.name, parsed.cache_salt)  # prefix-cache hits only within this tenant
        # the replica's priority is the tenant's class rank (interactive first), never the client's: no tenant can
        # reorder another's work queued at a replica
        upstream = dict(body, model=model.upstream_model, cache_salt=salt, priority=CLASSES.index(tenant.cls))
        if parsed.stream:  # usage settles the tokens; the client's other stream options go as sent
            so = body.get("stream_options")
            upstream["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
        # identical deterministic requests share one generation; the key holds every field that can change the
        # response, stream included, so each client gets the replica's response exactly as it would alone
        coalesce_key = _hash({"tenant": tenant.name, "path": path, "model": model.name, "body": parsed.digest,
                              "stream": parsed.stream}) if parsed.coalescable else ""

        known = self.pools[model.name].max_model_len()
        prompt_tokens = await self._count(parsed, model.tokenizer)
        if known is not None:
            await self._check_fits(parsed, model, prompt_tokens, known)
        b = budget(parsed, prompt_tokens, known or model.fallback_max_model_len, model.default_max_tokens)
        if b.max_tokens is not None:  # the operator's cap: the replica must not generate past the reservation
            upstream["max_completion_tokens" if parsed.chat else "max_tokens"] = b.max_tokens
        await self._reserve(ctx, tenant, b.reserve)

        flight = self.coalescing.get(coalesce_key) if parsed.coalescable else None
        if flight is not None and not flight.done:
            self.metrics.coalesced.labels(model.name).inc()
            ctx.joined = "coalesced"
            return flight
        # a shared flight has no one client's deadline: each client keeps its own (see _respond)
        flight = self._start(model, tenant, path, upstream, parsed.stream, ctx,
                             None if parsed.coalescable else ctx.deadline,
                             affinity_key(parsed.text, cfg.affinity_prefix_chars, salt))
        if parsed.coalescable:
            self.coalescing[coalesce_key] = flight
            flight.task.add_done_callback(lambda _t, k=coalesce_key, f=flight: self.coalescing.pop(k, None)
                                          if self.coalescing.get(k) is f else None)
        return flight

    async def _utility(self, request: Request, path: str, ctx: Ctx) -> Response:
        """/tokenize and /detokenize: the body goes as sent (but for the model's upstream name) to a replica of its
        `model`, through the model's dispatch queue; it counts as a request for the rate limits, with no tokens."""
        tenant = await self._admit_client(request, ctx)
        body = await self._parse(request, parse_object)
        if body["model"] == "auto":
            raise _Reject(400, "bad_request", "'auto' picks a model per generation; name the model whose "
                          "tokenizer to use", "invalid_model", param="model")
        model = self._named_model(body["model"], tenant)
        ctx.model, ctx.deadline = model.name, self._deadline(request, tenant)
        await self._reserve(ctx, tenant, 0)
        flight = self._start(model, tenant, path, dict(body, model=model.upstream_model), False, ctx, ctx.deadline,
                             None)
        return await self._respond(request, ctx, flight, False, False, path)

    # ---- batch lines (see batch_worker.py) ---------------------------------------------------------------------
    async def dispatch_line(self, tenant: TenantConfig, path: str, body: dict, request_id: str,
                            deadline: float | None) -> tuple[int, dict]:
        """Send one batch line the way an HTTP request goes (routing, budget, dispatch queue, replica pick,
        failover, settlement, access log, metrics) but at class `batch` whatever the tenant's class, never
        streamed, outside the tenant's per-minute rate limits and without a concurrency slot (the batch tier is
        bounded by batch_queued_tokens and the worker's window). `path` is
        the line's url, `deadline` monotonic seconds (None: none). Returns (HTTP status, JSON body: the replica's
        answer or OpenAI's error object); raises only when cancelled."""
        ctx = Ctx(rid=request_id, started=time.monotonic(), tenant=tenant.model_copy(update={"cls": "batch"}),
                  batch_line=True)
        # a trace of its own per line (class batch, queue wait, replica, engine phases); the span is named by the
        # path, so only a path the batch API serves (anything else is refused at once, untraced)
        if self.tracing is not None and path in ("/v1/completions", "/v1/chat/completions"):
            ctx.span = start_gateway_span(self.tracing.tracer, {}, path)
        resp = await self._guarded(ctx, self._line(ctx, path, body, deadline))
        try:
            out = json.loads(resp.body)
        except ValueError:
            out = None
        if not isinstance(out, dict):  # a replica's 200 that is not a JSON object: a fault, retried later
            return 502, json.loads(error_body(502, "the replica's answer is not a JSON object", "upstream_error"))
        return resp.status_code, out

    async def _line(self, ctx: Ctx, path: str, body: dict, deadline: float | None) -> Response:
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise _Reject(400, "bad_request", f"the url {path[:100]!r} is not one the batch API serves "
                          "(/v1/completions, /v1/chat/completions)", "invalid_url", param="url")
        raw = json.dumps(body).encode()
        try:
            parsed = await self._cpu(len(raw) > INLINE_BODY_BYTES, parse_body, raw, path.endswith("/chat/completions"))
        except BodyError as e:
            raise _Reject(400, "bad_request", e.message, e.code, param=e.param) from None
        if parsed.stream:
            raise _Reject(400, "bad_request", "a batch request cannot stream", "invalid_request", param="stream")
        tenant = ctx.tenant
        model = await self._route(parsed, tenant, None)
        ctx.model, ctx.deadline = model.name, deadline
        flight = await self._launch(ctx, tenant, model, parsed, path)
        return await self._respond(None, ctx, flight, False, False, path)

    async def _admit_client(self, request: Request, ctx: Ctx) -> TenantConfig:
        """The request id, the tenant (401) and one of its concurrency slots (429), before any CPU is spent on the
        body: that bounds each tenant's share."""
        rid = request.headers.get("x-request-id")
        if rid is not None and not valid_request_id(rid):
            raise _Reject(400, "bad_request", "X-Request-Id must be 1-128 visible ASCII characters",
                          "invalid_request_id")
        ctx.rid = rid or ctx.rid
        ctx.tenant = tenant = find_tenant(request.headers.get("authorization"), self.cfg.tenants)
        if tenant is None:
            raise _Reject(401, "auth", "invalid or missing API key", "invalid_api_key")
        await self._take_slot(ctx, tenant)
        return tenant

    async def _take_slot(self, ctx: Ctx, tenant: TenantConfig) -> None:
        """One of the tenant's max_concurrent slots: in this process, then (with redis_url) across all of them."""
        if self.concurrent.get(tenant.name, 0) >= tenant.max_concurrent:
            raise await self._concurrency_limited(tenant)
        self.concurrent[tenant.name] = self.concurrent.get(tenant.name, 0) + 1  # no await since the check
        self.metrics.slots.labels(tenant.cls).inc()
        ctx.slot = True  # held here from now on: a refusal below gives it back in _guarded
        if (shared := self.shared) is None:
            return
        # None: Redis unreachable, this process's own count decided (the slot is written to Redis once it is back;
        # with ratelimit_on_redis_error "closed" the rate limits refuse the request next, 503 ratelimit_unavailable)
        if await shared.take_slot(tenant.name, tenant.max_concurrent) is False:
            raise await self._concurrency_limited(tenant)
        ctx.shared = shared

    async def _concurrency_limited(self, tenant: TenantConfig) -> _Reject:
        decision = await self.limiter.acquire(tenant, 0, take=False)
        return _Reject(429, "concurrency", f"too many concurrent requests (max {tenant.max_concurrent})",
                       "concurrency_limit_exceeded", {**decision.headers(), "retry-after": "1"})

    async def _reserve(self, ctx: Ctx, tenant: TenantConfig, cost: int) -> None:
        if ctx.batch_line:  # as OpenAI's batch tier: bounded by batch_queued_tokens and the worker's window instead,
            return  # so a tenant's own batch never uses up the per-minute budget of its interactive requests
        decision = await self.limiter.acquire(tenant, cost)
        ctx.headers = decision.headers()
        if decision.reason == "unavailable":
            raise _Reject(503, "ratelimit_unavailable", "the rate-limit store is unavailable; retry shortly",
                          "ratelimit_unavailable", decision.headers())
        if not decision.allowed:
            raise self._rate_limited(decision, cost)
        ctx.cost, ctx.reserved = cost, True
        self.metrics.reserved_tokens.labels(tenant.cls).inc(cost)

    def _release(self, ctx: Ctx, used: int) -> None:
        """Free ctx's slot and settle its reservation (`used` tokens kept), each exactly once."""
        tenant = ctx.tenant
        if ctx.slot:
            ctx.slot = False
            self.concurrent[tenant.name] -= 1
            assert self.concurrent[tenant.name] >= 0
            if not self.concurrent[tenant.name]:
                del self.concurrent[tenant.name]
            self.metrics.slots.labels(tenant.cls).dec()
            if ctx.shared is not None:
                ctx.shared.release_slot(tenant.name)
                ctx.shared = None
        if ctx.reserved:
            ctx.reserved = False
            self.metrics.reserved_tokens.labels(tenant.cls).dec(ctx.cost)
            if used != ctx.cost:
                self._spawn(self.limiter.refund(tenant, ctx.cost - used))

    async def _parse(self, request: Request, parse, *args):
        """parse(raw body, *args) (parse_body or parse_object); a BodyError is a 400 naming its param."""
        cfg = self.cfg
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            raise _Reject(413, "too_large", f"the request body exceeds {cfg.max_body_bytes} bytes", "body_too_large",
                          {"connection": "close"})
        try:
            raw = await read_body(request.stream(), cfg.max_body_bytes, cfg.client_read_timeout_s)
        except BodyTooLarge as e:
            raise _Reject(413, "too_large", str(e), "body_too_large", {"connection": "close"}) from None
        except BodyTimeout as e:
            raise _Reject(408, "client_timeout", str(e), "request_timeout", {"connection": "close"}) from None
        except ClientDisconnect:
            raise _Reject(499, "client_gone", "the client went away while sending the body") from None
        try:
            return await self._cpu(len(raw) > INLINE_BODY_BYTES, parse, raw, *args)
        except BodyError as e:
            raise _Reject(400, "bad_request", e.message, e.code, param=e.param) from None

    async def _cpu(self, big: bool, fn, *args):
        """fn(*args): in the CPU pool when the input is big, so that parsing and tokenizing never stall the event
        loop; inline when it is small (a few milliseconds at most), so small requests never queue behind big ones."""
        if not big:
            return fn(*args)
        self.metrics.cpu_jobs.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)
        finally:
            self.metrics.cpu_jobs.dec()

    async def _count(self, parsed: Parsed, tokenizer: str | None) -> int:
        if tokenizer not in parsed.counts:
            big = sum(map(len, parsed.texts)) > INLINE_TEXT_CHARS
            parsed.counts[tokenizer] = await self._cpu(
                big, count_prompt_tokens, parsed, load_tokenizer(tokenizer), self.cfg.tokenize_max_chars)
        return parsed.counts[tokenizer]

    async def _check_fits(self, parsed: Parsed, model: ModelConfig, prompt_tokens: int, max_model_len: int) -> None:
        """A 400 (the replica's) when the prompt and its limit surely exceed the replica's context. The prompt's
        floor is counted only when the estimate says it may not fit: the estimate is at least the floor (but for
        merges across the joined prompts of a batch)."""
        cap = model.default_max_tokens
        try:
            check_fits(parsed, 0, max_model_len, cap)
            if least_limit(parsed, cap) + prompt_tokens > max_model_len:
                big = sum(map(len, parsed.texts)) > INLINE_TEXT_CHARS
                floor = await self._cpu(big, prompt_floor, parsed, load_tokenizer(model.tokenizer),
                                        self.cfg.tokenize_max_chars, prompt_tokens)
                check_fits(parsed, floor, max_model_len, cap)
        except BodyError as e:
            raise _Reject(400, "bad_request", e.message, e.code, param=e.param) from None

    async def _route(self, parsed: Parsed, tenant: TenantConfig, hint: str | None) -> ModelConfig:
        """The model the request goes to; `hint` is the X-Conveyor-Route header (auto routing only)."""
        cfg, name = self.cfg, parsed.model
        if name == "auto" and cfg.auto_route is not None:
            if not cfg.may_use(tenant, name):
                raise _no_model(name)
            tokens = await self._count(parsed, cfg.model(cfg.auto_route.small).tokenizer)

            def overloaded(model: str) -> bool:
                q = self.queues[model]
                return q.overloaded(cfg.auto_route.degrade_queue_ratio) or not q.pool.usable()

            limit = parsed.max_tokens if parsed.max_tokens is not None else parsed.replica_max_tokens
            model, _why = auto_route(cfg, tokens, limit, hint, tenant, overloaded)
            return model
        return self._named_model(name, tenant)

    def _named_model(self, name: str, tenant: TenantConfig) -> ModelConfig:
        """The model called `name`; 404 when there is none, or this tenant may not use it (the same answer)."""
        if not self.cfg.may_use(tenant, name):
            raise _no_model(name)
        return self.cfg.model(name)

    def _deadline(self, request: Request, tenant: TenantConfig) -> float | None:
        raw = request.headers.get("x-request-timeout")
        if raw is None:
            timeout = tenant.default_timeout_s
        else:
            try:
                timeout = float(raw)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and 0 < timeout <= 86_400 * 365):
                raise _Reject(400, "bad_request", "X-Request-Timeout must be a number of seconds > 0",
                              "invalid_request_timeout")
        return None if timeout is None else time.monotonic() + timeout

    def _idempotent(self, tenant: TenantConfig, key: str, request_hash: str) -> Flight | None:
        try:
            return self.idempotency.get(tenant.name, key, request_hash)
        except KeyReused:
            raise _Reject(422, "idempotency_mismatch", "this Idempotency-Key was used with a different request",
                          "idempotency_key_reused") from None

    def _start(self, model: ModelConfig, tenant: TenantConfig, path: str, upstream: dict, stream: bool, ctx: Ctx,
               deadline: float | None, affinity: str | None) -> Flight:
        flight = Flight(stream)
        waiter = Waiter(tenant.name, tenant.cls, ctx.cost, tenant.weight, affinity, deadline)
        call = Call(model.name, tenant.cls, self.queues[model.name], path, json.dumps(upstream).encode(), waiter,
                    ctx.rid, stream, _upstream_headers(model), ctx.span)
        flight.task = asyncio.create_task(self.forwarder.run(flight, call))
        return flight

    def _rate_limited(self, d: Decision, cost: int) -> _Reject:
        if d.reason == "too_large":  # waiting never helps: no Retry-After, and the openai SDKs' "do not retry"
            return _Reject(429, "rate_limit_tokens", f"the request needs {cost} tokens, more than "
                           f"the limit of {d.limit_tokens} per minute: it can never be served; ask for fewer "
                           f"tokens (max_tokens, n)", "request_too_large", {**d.headers(), "x-should-retry": "false"})
        what = "requests" if d.reason == "requests" else "tokens"
        return _Reject(429, f"rate_limit_{what}", f"Rate limit reached for {what} per minute; retry in "
                       f"{d.retry_after_s:.1f}s", "rate_limit_exceeded", d.headers())

    async def _respond(self, request: Request | None, ctx: Ctx, flight: Flight, stream: bool, include_usage: bool,
                       path: str) -> Response:
        """Wait for the flight and answer this client (request None: a batch line, which has no connection)."""
        assert flight.stream or not stream
        flight.subscribe()
        try:
            reached = await _until_disconnect(request, _client_wait(ctx, flight, stream))
        except Exception:
            flight.unsubscribe()
            raise  # proxy() answers 500 and frees what ctx holds
        except BaseException:
            flight.unsubscribe()
            self._settle(ctx, flight, 499)
            raise
        if reached is not True:  # this client leaves; the flight goes on while it has other clients
            flight.unsubscribe()
            if reached is None:
                self._settle(ctx, flight, 499)
                return Response(status_code=499)
            if not (flight.done and flight.status == 408):  # else its admission counted this deadline already
                self.metrics.rejections.labels(ctx.model, ctx.tenant_class, "deadline").inc()
            self._settle(ctx, flight, 408)
            return JSONResponse(json.loads(error_body(408, "the request's deadline passed while it was queued",
                                                      "deadline")), status_code=408,
                                headers={**ctx.headers, "x-request-id": ctx.rid, "x-conveyor-model": ctx.model})
        status = flight.status or 502
        headers = {**ctx.headers, **flight.headers, **self._info_headers(ctx, flight)}
        if stream and status == 200:
            left = False

            def leave(final: int) -> None:  # exactly once: when the stream ends, or if it never starts
                nonlocal left
                if not left:
                    left = True
                    flight.unsubscribe()
                    self._settle(ctx, flight, final)

            async def events():
                final = 499
                try:
                    async for chunk in flight.events(include_usage):
                        yield chunk
                    final = 502 if flight.cut else 200
                finally:
                    leave(final)
            return EventStream(events(), lambda: leave(499), headers)
        flight.unsubscribe()
        content = flight.chunks[0]
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
        if flight.usage:
            used = total_tokens(flight.usage)
            if ctx.tenant and ctx.joined is None:
                self.metrics.count_usage(ctx.tenant.name, flight.usage)
        else:  # failed before generating: nothing used; cut off mid-way: keep the reservation
            used = ctx.cost if flight.chunks and status in (200, 499) and flight.status == 200 else 0
        self._release(ctx, used)
        self._access_log(ctx, status, flight)

    def _reject(self, ctx: Ctx, e: _Reject) -> Response:
        self.metrics.rejections.labels(ctx.model, ctx.tenant_class, e.reason).inc()
        self._access_log(ctx, e.status, None, e.reason)
        return Response(error_body(e.status, e.message, e.code, e.param), status_code=e.status,
                        media_type="application/json", headers={**e.headers, "x-request-id": ctx.rid})

    def _internal_error(self, ctx: Ctx, e: BaseException) -> Response:
        log.error(json.dumps({"event": "internal_error", "request_id": ctx.rid, "path": None,
                              "error": f"{type(e).__name__}: {e}"[:300]}), exc_info=e)
        return self._reject(ctx, _Reject(500, "internal", "internal error in the gateway", "internal_error"))

    async def _on_http_error(self, request: Request, e: StarletteHTTPException) -> Response:
        """Unknown routes and wrong methods: OpenAI's error JSON, counted and logged like any refusal."""
        reason = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return self._reject(Ctx(rid=uuid.uuid4().hex, started=time.monotonic()),
                            _Reject(e.status_code, reason, msg, reason, dict(e.headers or {})))

    async def _on_unexpected(self, request: Request, e: Exception) -> Response:
        return self._internal_error(Ctx(rid=uuid.uuid4().hex, started=time.monotonic()), e)

    def client_timed_out(self) -> None:
        """A connection closed because its request headers did not arrive in time (see http_limits)."""
        self.metrics.rejections.labels("unknown", "none", "client_timeout").inc()
        self.metrics.requests.labels("unknown", "none", "408").inc()
        access_log.info(json.dumps({"event": "access", "request_id": None, "tenant": None, "tenant_class": "none",
                                    "model": "unknown", "status": 408, "reason": "client_timeout"}))

    def _overloaded(self, reason: str, rid: str) -> None:
        """A request refused by the gateway's own limit (overload.py), before it was read: counted and logged."""
        self.metrics.rejections.labels("unknown", "none", reason).inc()
        self._access_log(Ctx(rid=rid, started=time.monotonic()), 503, None, reason)

    def _access_log(self, ctx: Ctx, status: int, flight: Flight | None, reason: str | None = None) -> None:
        """One access-log line and one count in requests_total per request, whichever paths it went through."""
        if ctx.logged:
            return
        ctx.logged = True
        if ctx.span is not None:
            end_gateway_span(ctx.span, status, ctx.rid, ctx.model, ctx.tenant.name if ctx.tenant else None,
                             ctx.tenant_class, flight, ctx.joined, reason)
        self.metrics.requests.labels(ctx.model, ctx.tenant_class, str(status)).inc()
        if not access_log.isEnabledFor(logging.INFO):
            return
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

    async def _admin_target(self, request: Request) -> tuple[Pool, str, dict]:
        self._admin_check(request)
        try:
            body = json.loads(await read_body(request.stream(), 64 << 10, self.cfg.client_read_timeout_s))
            name, url = body["model"], replica_url(body["url"])
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError, BodyTooLarge, BodyTimeout, ClientDisconnect) as e:
            why = f" ({e})" if isinstance(e, ValueError) and "URL" in str(e) else ""
            raise _Reject(400, "bad_request", 'the body must be {"model": NAME, "url": "http://HOST:PORT"}' + why,
                          param="url" if why else None) from None
        model = self.cfg.model(name)
        if model is None or model.name not in self.pools:
            raise _Reject(404, "model_not_found", f"the model {name!r} does not exist", "model_not_found")
        return self.pools[model.name], url, body

    async def admin_list(self, request: Request) -> Response:
        """Every replica; in_flight: the requests there from all gateway processes (the others' as of the last
        sync, with redis_url)."""
        try:
            self._admin_check(request)
        except _Reject as e:
            return self._reject(Ctx(rid=uuid.uuid4().hex, started=time.monotonic()), e)
        now = time.monotonic()
        return JSONResponse({"models": {name: [{"url": r.url, "label": replica_label(r.url), "state": r.state(now),
                                                "in_flight": r.in_flight + r.others}
                                               for r in pool.replicas.values()]
                                        for name, pool in self.pools.items()}})

    async def _admin(self, request: Request, action) -> Response:
        ctx = Ctx(rid=uuid.uuid4().hex, started=time.monotonic())
        try:
            pool, url, body = await self._admin_target(request)
            return await action(pool, url, body)
        except _Reject as e:
            return self._reject(ctx, e)

    async def admin_add(self, request: Request) -> Response:
        async def add(pool: Pool, url: str, body: dict) -> Response:
            r = await self._change(pool, url, "active")
            log.info(json.dumps({"event": "replica_added", "model": pool.model, "replica": url}))
            # None: another process removed it again in the meantime (a newer change, applied here first)
            return JSONResponse({"model": pool.model, "url": url,
                                 "state": r.state(time.monotonic()) if r else "removed"})
        return await self._admin(request, add)

    async def admin_drain(self, request: Request) -> Response:
        return await self._admin(request, lambda pool, url, body: self._retire(pool, url, "draining", False))

    async def admin_remove(self, request: Request) -> Response:
        """Body: {"model", "url", "abort_in_flight": false}; true (the replica is dead, e.g. its node froze): its
        in-flight requests are cut at once — retried on another replica before their first event, else ended with
        an error event — instead of finishing."""
        async def remove(pool: Pool, url: str, body: dict) -> Response:
            abort = body.get("abort_in_flight", False)
            if not isinstance(abort, bool):
                raise _Reject(400, "bad_request", "abort_in_flight must be true or false", param="abort_in_flight")
            return await self._retire(pool, url, "removed", abort)
        return await self._admin(request, remove)

    async def _retire(self, pool: Pool, url: str, state: str, abort: bool) -> Response:
        """Drain or remove a replica."""
        r = await self._change(pool, url, state, abort)
        log.info(json.dumps({"event": f"replica_{state}", "model": pool.model, "replica": url,
                             "abort_in_flight": abort}))
        return JSONResponse({"model": pool.model, "url": url, "in_flight": r.in_flight + r.others if r else 0})

    async def _change(self, pool: Pool, url: str, state: str, abort: bool = False) -> Replica | None:
        """Apply an admin change (state: active, draining, removed) here and, with redis_url, in every gateway
        process (written to Redis first: shared_replicas.py). Returns the replica (for a removal: as it was here,
        None when only other processes had it). Raises _Reject: 404 a drain or removal of a replica no process
        has, 503 Redis unreachable (nothing changed)."""
        r = pool.replicas.get(url)
        missing = _Reject(404, "not_found", f"{url} is not a replica of {pool.model!r}", "replica_not_found")
        if self.shared is None:
            if state == "active":
                return pool.add(url, "admin")
            if r is None:
                raise missing
            if state == "draining":
                pool.drain(url)
            else:
                pool.remove(url, abort=abort)
            return r
        done = await self.shared.replicas.write(pool, url, state, abort)
        if done is None:
            raise _Reject(503, "shared_state_unavailable", "the gateway cannot reach the state its processes share "
                          "(redis_url); nothing changed, retry", "shared_state_unavailable", {"retry-after": "1"})
        if not done:
            raise missing
        return r if state == "removed" else pool.replicas.get(url)


class _Reject(Exception):
    def __init__(self, status: int, reason: str, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.code = status, reason, message, code or reason
        self.headers, self.param = headers or {}, param


GC_THRESHOLDS = (10_000, 50, 100)  # CPython's default is (700, 10, 10)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process holding thousands of open streams: what startup made is
    frozen (never scanned again) and collections run less often. With CPython's defaults, full collections while
    2,000 streams opened over 10 s paused the event loop up to ~180 ms (each scans every live object: ~100 per
    open stream) and added +151 ms to the TTFT p99; with these, +12 ms (bench/gateway_streams.py). Objects are
    still freed by reference counting as soon as they are unused; only garbage in reference cycles waits longer.
    For the serving process only (`conveyor gateway` calls it once started), not for a process embedding the app."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _no_model(name: str) -> _Reject:
    return _Reject(404, "model_not_found", f"the model {name[:100]!r} does not exist", "model_not_found",
                   param="model")


def _upstream_headers(model: ModelConfig) -> dict[str, str]:
    key = model.upstream_api_key
    return {"authorization": f"Bearer {key}"} if key else {}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _client_wait(ctx: Ctx, flight: Flight, stream: bool) -> bool:
    """Wait until the flight has what this client needs (its first event, or the whole response); False when this
    client's own deadline passed while the flight was still queued. Coalesced clients each keep their own deadline."""
    if ctx.deadline is not None and not flight.dispatched.is_set():
        try:  # not wait_for: on 3.11 it swallows a cancel (the client leaving) that comes as its wait ends
            async with asyncio.timeout(max(0.0, ctx.deadline - time.monotonic())):
                await flight.dispatched.wait()
        except TimeoutError:
            return False
    await (flight.head() if stream else flight.wait_done())
    return True


async def _until_disconnect(request: Request | None, aw):
    """aw's result, unless the client disconnects first (then aw is cancelled and None returned)."""
    if request is None:
        return await aw
    # aw runs in this task; one watcher task cancels it if the client goes first (cheaper than a task for aw and
    # asyncio.wait over both: this runs once per request)
    me = asyncio.current_task()
    assert me is not None
    waiting, fired = True, False

    def on_gone(g: asyncio.Task) -> None:
        nonlocal fired
        if waiting and not g.cancelled():
            fired = True
            me.cancel()
    gone = asyncio.create_task(_wait_disconnect(request))
    gone.add_done_callback(on_gone)
    try:
        result = await aw
    except asyncio.CancelledError:
        if fired and me.uncancel() == 0:
            return None  # the client went away (a cancel from outside as well is not ours to swallow)
        raise
    finally:
        waiting = False
        gone.cancel()
    if fired:  # aw swallowed our cancel (something it awaited ended as it came): the client is gone all the same,
        me.uncancel()  # and the task must not keep a cancel request nobody will deliver
        return None
    return result


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_gateway(config_path: str, tracing: Tracing | None = None,
                  runs_batches: bool = True) -> Gateway:
    """The gateway of a config file. Raises ConfigError, or OSError when the file or the batch store cannot be
    opened (the store is opened here once, so that a bad batch.db_path is an error at start, not in the app)."""
    cfg = load_config(config_path)
    BatchStore(cfg.batch.db_path or default_path()).close()
    return Gateway(cfg, config_path, tracing, runs_batches)
