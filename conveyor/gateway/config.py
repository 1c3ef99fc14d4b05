"""Gateway configuration: YAML → validated dataclasses. Errors name the offending field (`tenants[1].class`)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

CLASSES = ("interactive", "batch")  # rank order: interactive is dispatched first


class ConfigError(ValueError):
    pass


def _require(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


@dataclass
class ModelConfig:
    name: str
    replicas: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    upstream_model: str | None = None  # the model name the replicas serve (default: name)
    tokenizer: str | None = None  # "demo" | a tokenizer directory | None: estimate chars / 4
    max_in_flight_per_replica: int = 64  # dispatch concurrency per replica; beyond it requests queue here
    max_queue: int = 256  # bound of this model's dispatch queue
    default_max_tokens: int = 256  # reserved when a request sets no max_tokens
    # the environment variable holding the key the replicas require (`conveyor serve` reads CONVEYOR_API_KEY);
    # the key itself never goes in the YAML
    upstream_api_key_env: str | None = None
    where: str = "models[?]"

    def __post_init__(self) -> None:
        w = self.where
        _require(isinstance(self.name, str) and bool(self.name) and self.name != "auto", f"{w}.name",
                 "must be a non-empty string other than 'auto'")
        _require(isinstance(self.replicas, list) and all(isinstance(u, str) and re.match(r"https?://", u)
                                                         for u in self.replicas),
                 f"{w}.replicas", "must be a list of http(s):// URLs (may be empty)")
        self.replicas = [u.rstrip("/") for u in self.replicas]
        _require(len(set(self.replicas)) == len(self.replicas), f"{w}.replicas", "has duplicates")
        _require(isinstance(self.aliases, list) and all(isinstance(a, str) and a for a in self.aliases),
                 f"{w}.aliases", "must be a list of names")
        self.upstream_model = self.upstream_model or self.name
        _require(self.upstream_api_key_env is None or (isinstance(self.upstream_api_key_env, str)
                                                       and bool(os.environ.get(self.upstream_api_key_env))),
                 f"{w}.upstream_api_key_env", "must name an environment variable that holds the replicas' API key")
        for name in ("max_in_flight_per_replica", "max_queue", "default_max_tokens"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"{w}.{name}", "must be an integer >= 1")

    @property
    def upstream_api_key(self) -> str | None:
        """The key sent to this model's replicas as `Authorization: Bearer`, read from the environment."""
        return os.environ.get(self.upstream_api_key_env) if self.upstream_api_key_env else None


@dataclass
class TenantConfig:
    name: str
    api_key_sha256: str
    cls: str = "interactive"  # `class` in YAML
    requests_per_minute: float = 600
    tokens_per_minute: float = 1_000_000
    max_concurrent: int = 64
    burst: float | None = None  # request bucket capacity (default: one minute of requests)
    weight: float = 1.0  # share within its class
    default_timeout_s: float | None = None  # deadline when the request has no X-Request-Timeout
    allow_degrade: bool = False  # `model: auto` may fall back to the small model under overload
    where: str = "tenants[?]"

    def __post_init__(self) -> None:
        w = self.where
        _require(isinstance(self.name, str) and bool(self.name), f"{w}.name", "must be a non-empty string")
        _require(isinstance(self.api_key_sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", self.api_key_sha256)
                 is not None, f"{w}.api_key_sha256", "must be 64 hex digits (sha256 of the key)")
        self.api_key_sha256 = self.api_key_sha256.lower()
        _require(self.cls in CLASSES, f"{w}.class", f"must be one of {', '.join(CLASSES)}")
        for name in ("requests_per_minute", "tokens_per_minute", "weight"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v > 0, f"{w}.{name}", "must be a number > 0")
        _require(isinstance(self.max_concurrent, int) and self.max_concurrent >= 1, f"{w}.max_concurrent",
                 "must be an integer >= 1")
        if self.burst is None:
            self.burst = float(self.requests_per_minute)
        _require(isinstance(self.burst, (int, float)) and self.burst >= 1, f"{w}.burst", "must be a number >= 1")
        _require(self.default_timeout_s is None or (isinstance(self.default_timeout_s, (int, float))
                                                    and self.default_timeout_s > 0),
                 f"{w}.default_timeout_s", "must be a number > 0")
        _require(isinstance(self.allow_degrade, bool), f"{w}.allow_degrade", "must be true or false")


@dataclass
class AutoRoute:
    small: str
    large: str
    max_prompt_tokens_small: int = 256
    max_tokens_small: int | None = None  # also require max_tokens <= this for the small model
    degrade_queue_ratio: float = 0.5  # large model "overloaded": its queue at least this full

    def __post_init__(self) -> None:
        _require(isinstance(self.max_prompt_tokens_small, int) and self.max_prompt_tokens_small >= 0,
                 "auto_route.max_prompt_tokens_small", "must be an integer >= 0")
        _require(self.max_tokens_small is None or (isinstance(self.max_tokens_small, int)
                                                   and self.max_tokens_small >= 1),
                 "auto_route.max_tokens_small", "must be an integer >= 1")
        _require(isinstance(self.degrade_queue_ratio, (int, float)) and 0 <= self.degrade_queue_ratio <= 1,
                 "auto_route.degrade_queue_ratio", "must be in [0, 1]")


@dataclass
class GatewayConfig:
    models: list[ModelConfig]
    tenants: list[TenantConfig]
    auto_route: AutoRoute | None = None
    redis_url: str | None = None
    admin_api_key_sha256: str | None = None
    cold_start_timeout_s: float = 60.0  # how long a request waits for a model with no usable replica
    shed_batch_queue_ratio: float = 0.5  # batch requests are shed once a model's queue is this full
    max_retries: int = 2  # extra attempts on other replicas before the first streamed byte
    retry_backoff_s: float = 0.05  # base of the exponential backoff (with full jitter)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    health_interval_s: float = 1.0
    scrape_interval_s: float = 0.5  # replica /metrics; older than 1 s is ignored by the picker
    breaker_failures: int = 3  # consecutive failures that open a replica's circuit
    breaker_open_s: float = 5.0  # open this long before a half-open trial
    affinity_prefix_chars: int = 256  # prompts at least this long are routed by the hash of this prefix
    affinity_max_load_ratio: float = 2.0  # ... unless that replica's load exceeds this × the least loaded
    idempotency_window_s: float = 600.0
    max_body_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        _require(isinstance(self.models, list) and len(self.models) > 0, "models", "must be a non-empty list")
        _require(isinstance(self.tenants, list) and len(self.tenants) > 0, "tenants", "must be a non-empty list")
        names: dict[str, str] = {}
        for m in self.models:
            for n in (m.name, *m.aliases):
                _require(n not in names, f"{m.where}", f"model name or alias {n!r} is already used by {names.get(n)}")
                names[n] = m.where
        seen_t, seen_k = set(), set()
        for t in self.tenants:
            _require(t.name not in seen_t, f"{t.where}.name", f"duplicate tenant {t.name!r}")
            _require(t.api_key_sha256 not in seen_k, f"{t.where}.api_key_sha256", "the same key hash as another tenant")
            seen_t.add(t.name)
            seen_k.add(t.api_key_sha256)
        if self.auto_route is not None:
            model_names = {m.name for m in self.models}
            for side in ("small", "large"):
                _require(getattr(self.auto_route, side) in model_names, f"auto_route.{side}",
                         f"must name a model in models ({', '.join(sorted(model_names))})")
        if self.admin_api_key_sha256 is not None:
            _require(re.fullmatch(r"[0-9a-fA-F]{64}", str(self.admin_api_key_sha256)) is not None,
                     "admin_api_key_sha256", "must be 64 hex digits")
            self.admin_api_key_sha256 = self.admin_api_key_sha256.lower()
        _require(self.redis_url is None or str(self.redis_url).startswith(("redis://", "rediss://", "unix://")),
                 "redis_url", "must be a redis:// URL")
        for name in ("cold_start_timeout_s", "connect_timeout_s", "read_timeout_s", "health_interval_s",
                     "scrape_interval_s", "breaker_open_s", "idempotency_window_s", "affinity_max_load_ratio"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v > 0, name, "must be a number > 0")
        _require(isinstance(self.retry_backoff_s, (int, float)) and self.retry_backoff_s >= 0, "retry_backoff_s",
                 "must be a number >= 0")
        _require(0 <= self.shed_batch_queue_ratio <= 1, "shed_batch_queue_ratio", "must be in [0, 1]")
        for name in ("max_retries", "affinity_prefix_chars"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        for name in ("breaker_failures", "max_body_bytes"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name or name in m.aliases:
                return m
        return None


def _build(cls, raw: Any, at: str, renames: dict[str, str] | None = None, **extra):
    _require(isinstance(raw, dict), at, "must be a mapping")
    renames = renames or {}
    known = {f.name for f in fields(cls)} - {"where"}
    kwargs = {}
    for key, value in raw.items():
        name = renames.get(key, key)
        _require(name in known and key not in renames.values(), f"{at}.{key}", "unknown field")
        kwargs[name] = value
    try:
        return cls(**kwargs, **extra)
    except TypeError as e:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(e))
        raise ConfigError(f"{at}.{missing[0] if missing else '?'}: required field is missing") from None


def parse_config(raw: Any) -> GatewayConfig:
    _require(isinstance(raw, dict), "config", "must be a mapping")
    raw = dict(raw)
    models = raw.pop("models", None)
    tenants = raw.pop("tenants", None)
    _require(isinstance(models, list), "models", "must be a list")
    _require(isinstance(tenants, list), "tenants", "must be a list")
    ms = [_build(ModelConfig, m, f"models[{i}]", where=f"models[{i}]") for i, m in enumerate(models)]
    ts = [_build(TenantConfig, t, f"tenants[{i}]", {"class": "cls"}, where=f"tenants[{i}]")
          for i, t in enumerate(tenants)]
    auto = raw.pop("auto_route", None)
    auto_route = _build(AutoRoute, auto, "auto_route") if auto is not None else None
    return _build(GatewayConfig, raw, "config", models=ms, tenants=ts, auto_route=auto_route)


def load_config(path: str) -> GatewayConfig:
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw)
