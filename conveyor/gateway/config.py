"""Gateway configuration: YAML → pydantic models (unknown fields forbidden, no type coercion). Errors name the
offending field and the problem (`tenants[1].class: Input should be 'interactive' or 'batch'`)."""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CLASSES = ("interactive", "batch")  # rank order: interactive is dispatched first

Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


def replica_url(url: str) -> str:
    """A replica's base URL, checked and normalized (no trailing slash): http(s)://HOST[:PORT] with a plain ASCII
    host, a port in 1-65535 and nothing else. Raises ValueError saying what is wrong."""
    if not isinstance(url, str) or not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+/?", url):
        raise ValueError(f"{url!r} is not an http(s)://HOST[:PORT] URL")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ValueError(f"{url!r} is not a valid URL ({e})") from None
    if not parsed.host or not (parsed.port is None or 1 <= parsed.port <= 65535):
        raise ValueError(f"{url!r} needs a host and a port in 1-65535")
    return url.rstrip("/")


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, validate_assignment=False)


class ModelConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    replicas: list[str] = []  # http(s):// URLs; may be empty (scale to zero)
    aliases: list[Annotated[str, Field(min_length=1)]] = []
    upstream_model: str | None = None  # the model name the replicas serve (default: name)
    tokenizer: str | None = None  # "demo" | a tokenizer directory | None: estimate chars / 4
    max_in_flight_per_replica: Count = 64  # dispatch concurrency per replica; beyond it requests queue here
    max_queue: Count = 256  # bound of this model's dispatch queue
    # a cap for requests that set no max_tokens, forwarded as their limit; None: the replica's own limit applies
    # and is reserved (16 for a completion, up to max_model_len for chat; see budget.py)
    default_max_tokens: Count | None = None
    # reservations use the replicas' max_model_len from their GET /v1/models; this until one has reported it
    fallback_max_model_len: Count = 4096
    # the environment variable holding the key the replicas require (`conveyor serve` reads CONVEYOR_API_KEY);
    # the key itself never goes in the YAML
    upstream_api_key_env: str | None = None

    @field_validator("name")
    @classmethod
    def _not_auto(cls, v: str) -> str:
        if v == "auto":
            raise ValueError("'auto' is reserved for automatic routing")
        return v

    @field_validator("replicas")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        v = [replica_url(u) for u in v]
        if len(set(v)) != len(v):
            raise ValueError("has duplicates")
        return v

    @field_validator("upstream_api_key_env")
    @classmethod
    def _env_set(cls, v: str | None) -> str | None:
        if v is not None and not os.environ.get(v):
            raise ValueError("must name an environment variable that holds the replicas' API key")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> ModelConfig:
        self.upstream_model = self.upstream_model or self.name
        return self

    @property
    def upstream_api_key(self) -> str | None:
        """The key sent to this model's replicas as `Authorization: Bearer`, read from the environment."""
        return os.environ.get(self.upstream_api_key_env) if self.upstream_api_key_env else None


class TenantConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    api_key_sha256: Hex64  # sha256 of the key, hex
    cls: Literal["interactive", "batch"] = Field("interactive", alias="class")
    requests_per_minute: Positive = 600
    tokens_per_minute: Positive = 1_000_000
    max_concurrent: Count = 64  # per gateway process; with redis_url, across all of them
    burst: Annotated[float, Field(ge=1)] | None = None  # request bucket capacity (default: requests_per_minute)
    weight: Positive = 1.0  # share within its class
    default_timeout_s: Positive | None = None  # deadline when the request has no X-Request-Timeout
    allow_degrade: bool = False  # `model: auto` may fall back to the small model under overload
    # the models (names or aliases) this tenant may use; None: all. Any other is, to it, a model that does not exist
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    # estimated tokens (see batch_store.estimate_tokens) of this tenant's batch lines not yet answered, across its
    # in-progress batches; a batch that would exceed it is refused with a 429. None: unlimited
    batch_queued_tokens: Count | None = None

    @model_validator(mode="after")
    def _defaults(self) -> TenantConfig:
        self.api_key_sha256 = self.api_key_sha256.lower()
        if self.burst is None:
            self.burst = float(self.requests_per_minute)
        return self


class AutoRoute(_Strict):
    small: str
    large: str
    max_prompt_tokens_small: Annotated[int, Field(ge=0)] = 256
    max_tokens_small: Count | None = None  # also require max_tokens <= this for the small model
    degrade_queue_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5  # large model "overloaded": queue this full


class BatchConfig(_Strict):
    """The Batch API (`/v1/files`, `/v1/batches`) and its worker. Read at start; a reload does not move the store."""
    db_path: str | None = None  # the SQLite file; default <cache dir>/gateway-batches.sqlite3
    max_file_bytes: Count = 200_000_000  # per uploaded file, as OpenAI's
    max_lines: Count = 50_000  # requests per batch, as OpenAI's
    max_tenant_bytes: Count = 10_000_000_000  # stored files per tenant (uploads and batch outputs): a full disk stops
    # every tenant's batches
    max_in_flight: Count = 16  # per model: batch lines at replicas at once (the worker's cap)
    # ... and while interactive requests are in flight at the model's replicas: on a CPU every running sequence
    # slows every step, so a batch that keeps 16 lines running doubles interactive TTFT p95 (bench/README.md)
    max_in_flight_shared: Count = 4


class OverloadConfig(_Strict):
    """The gateway's own limit (overload.py): past it, new requests get a 503 with Retry-After at once, before their
    body is read. /health and /metrics are never refused."""
    # HTTP requests inside one gateway process at once, streams included. None: derived from RLIMIT_NOFILE (raised
    # to its hard limit at start): two descriptors per stream, a quarter (at most 1024) kept for everything else
    max_open_requests: Count | None = None
    max_event_loop_lag_s: Positive = 0.5  # refuse while the event loop runs this late (seconds; 3 timers in a row)
    lag_interval_s: Positive = 0.05  # how often the lag is measured
    # refuse while more connections than this wait in the kernel to be accepted (a process short of CPU falls
    # behind there first, unseen by its event loop); None: not checked. Each waiting connection costs the next one a
    # few ms, so this bounds how long a refusal takes (64: ~0.3 s at the median vs ~0.9 s at 256; bench/README.md)
    max_accept_queue: Count | None = 64
    retry_after_s: Count = 1  # the Retry-After header of a refusal


class GatewayConfig(_Strict):
    models: Annotated[list[ModelConfig], Field(min_length=1)]
    tenants: Annotated[list[TenantConfig], Field(min_length=1)]
    auto_route: AutoRoute | None = None
    batch: BatchConfig = Field(default_factory=BatchConfig)
    overload: OverloadConfig = Field(default_factory=OverloadConfig)
    redis_url: str | None = None  # may hold a password: checked by _redis_url, never quoted in an error
    ratelimit_on_redis_error: Literal["open", "closed"] = "open"  # Redis down: admit unchecked, or 503
    # gateway processes sharing redis_url (shared.py): each publishes its state this often, and one not heard from
    # for redis_heartbeat_ttl_s is presumed dead (its concurrency slots and its share of the replicas are freed)
    redis_sync_interval_s: Annotated[float, Field(gt=0, le=5)] = 0.1
    redis_heartbeat_ttl_s: Positive = 3.0
    admin_api_key_sha256: Hex64 | None = None
    cold_start_timeout_s: Positive = 60.0  # how long a request waits for a model with no usable replica
    shed_batch_queue_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5  # batch is shed once a queue is this full
    max_retries: Annotated[int, Field(ge=0)] = 2  # extra attempts on other replicas before the first streamed byte
    retry_backoff_s: Annotated[float, Field(ge=0)] = 0.05  # base of the exponential backoff (with full jitter)
    connect_timeout_s: Positive = 2.0
    read_timeout_s: Positive = 600.0
    # a stream from whose replica nothing arrived for this long (response head, events) is cut: retried on another
    # replica before its first event, else ended with an error event and [DONE] (a silent replica: a frozen node)
    stream_idle_timeout_s: Positive = 60.0
    client_read_timeout_s: Positive = 30.0  # a client's request headers, then its body, must arrive within this
    health_interval_s: Positive = 1.0
    scrape_interval_s: Positive = 0.5  # replica /metrics; older than 1 s is ignored by the picker
    breaker_failures: Count = 3  # consecutive failures that open a replica's circuit
    breaker_open_s: Positive = 5.0  # open this long before a half-open trial
    affinity_prefix_chars: Annotated[int, Field(ge=0)] = 256  # prompts this long are routed by this prefix's hash
    affinity_max_load_ratio: Positive = 2.0  # ... unless that replica's load exceeds this × the least loaded
    idempotency_window_s: Positive = 600.0
    idempotency_max_entries: Count = 10_000
    idempotency_max_bytes: Count = 64 << 20  # kept for Idempotency-Key replays; the biggest holder's oldest go first
    max_body_bytes: Count = 4 << 20
    tokenize_max_chars: Count = 65_536  # prompt text tokenized exactly; the rest is estimated at the same ratio
    tokenizer_threads: Count = 2  # token counting runs in this many threads, off the event loop
    # read at start (a reload keeps the running ones): the event loop and HTTP parser (uvicorn's --loop, --http;
    # "auto": uvloop and httptools when installed), and the connection pool to the replicas
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    http: Literal["auto", "h11", "httptools"] = "auto"
    # connections to all replicas at once, each kept alive for the next request (every open stream holds one);
    # a request that finds none free within upstream_pool_timeout_s is answered 503 upstream_busy
    upstream_max_connections: Count = 10_000
    upstream_pool_timeout_s: Positive = 5.0

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        """Parsed as the Redis clients will parse it, so that a bad URL is refused at start (it crashed each
        process as it built its clients); the error names no part of it, which may hold a password."""
        if v is None:
            return v
        from redis.connection import parse_url

        try:
            ok = v.startswith(("redis://", "rediss://", "unix://")) and parse_url(v) is not None
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("not a Redis URL the client can use (not shown: it may hold a password); expected "
                             "redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        names: dict[str, str] = {}
        for i, m in enumerate(self.models):
            for n in (m.name, *m.aliases):
                if n in names:
                    raise ValueError(f"models[{i}]: model name or alias {n!r} is already used by {names[n]}")
                names[n] = f"models[{i}]"
        seen_t: set[str] = set()
        seen_k: set[str] = set()
        for i, t in enumerate(self.tenants):
            if t.name in seen_t:
                raise ValueError(f"tenants[{i}].name: duplicate tenant {t.name!r}")
            if t.api_key_sha256 in seen_k:
                raise ValueError(f"tenants[{i}].api_key_sha256: the same key hash as another tenant")
            seen_t.add(t.name)
            seen_k.add(t.api_key_sha256)
        for i, t in enumerate(self.tenants):
            for n in t.models or []:
                if n not in names:
                    raise ValueError(f"tenants[{i}].models: {n!r} is not a model name or alias")
        if self.auto_route is not None:
            model_names = {m.name for m in self.models}
            for side in ("small", "large"):
                if getattr(self.auto_route, side) not in model_names:
                    raise ValueError(f"auto_route.{side}: must name a model in models "
                                     f"({', '.join(sorted(model_names))})")
        if self.redis_heartbeat_ttl_s < 3 * self.redis_sync_interval_s:
            raise ValueError("redis_heartbeat_ttl_s: must be at least 3 × redis_sync_interval_s (a process "
                             "presumed dead while it is alive loses its slots)")
        if self.admin_api_key_sha256 is not None:
            self.admin_api_key_sha256 = self.admin_api_key_sha256.lower()
        return self

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name or name in m.aliases:
                return m
        return None

    def may_use(self, tenant: TenantConfig, name: str) -> bool:
        """Whether `tenant` may use the model called `name` (a name or an alias; `auto` when it may use both of
        auto_route's models). False for a name that is no model."""
        if name == "auto" and self.auto_route is not None:
            return self.may_use(tenant, self.auto_route.small) and self.may_use(tenant, self.auto_route.large)
        model = self.model(name)
        if model is None:
            return False
        return tenant.models is None or any(self.model(n) is model for n in tenant.models)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    got = repr(err.get("input"))
    return f"{err['msg']} (got {got[:60]})"


def parse_config(raw: Any) -> GatewayConfig:
    """Validate a parsed YAML document. Raises ConfigError naming each bad field: `tenants[0].class: ...`."""
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a mapping")
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where, problem = _where(err["loc"]), _problem(err)
            problems.append(f"{where}: {problem}" if where else problem)  # cross-field errors name their fields
        raise ConfigError("; ".join(problems)) from None


def load_config(path: str) -> GatewayConfig:
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw)
