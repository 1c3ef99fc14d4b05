"""Token buckets per tenant, one for requests and one for tokens, checked and taken together (all or nothing).

A request takes 1 from the request bucket and its reservation (prompt tokens + max_tokens) from the token bucket;
when it ends, `refund` gives back what it did not use (or takes more, leaving the bucket in debt). State lives in
memory (`MemoryLimiter`) or in Redis (`RedisLimiter`, one Lua script per operation, timed by Redis's own clock) so
several gateway processes enforce one limit; when Redis is unreachable a configured fallback (open or closed)
decides, and the decision says it was not checked.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from conveyor.gateway.config import TenantConfig

log = logging.getLogger("conveyor.gateway")


@dataclass
class TokenBucket:
    capacity: float
    rate: float  # refill per second
    level: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is available (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class Decision:
    allowed: bool
    reason: str | None  # why not: "requests", "tokens" or "too_large"
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float  # until the request bucket is full again
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float
    retry_after_s: float  # until this request would fit
    checked: bool = True  # False: the store was unreachable, nothing was checked (and no headers claim a quota)

    def headers(self) -> dict[str, str]:
        if not self.checked:
            return {"retry-after": "1"} if not self.allowed else {}
        h = {"x-ratelimit-limit-requests": str(self.limit_requests),
             "x-ratelimit-remaining-requests": str(self.remaining_requests),
             "x-ratelimit-reset-requests": _duration(self.reset_requests_s),
             "x-ratelimit-limit-tokens": str(self.limit_tokens),
             "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
             "x-ratelimit-reset-tokens": _duration(self.reset_tokens_s)}
        if not self.allowed and math.isfinite(self.retry_after_s):
            h["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return h


def _duration(s: float) -> str:
    """OpenAI's style: '1s', '6m0s', '250ms'."""
    if s < 1:
        return f"{int(s * 1000)}ms"
    m, sec = divmod(s, 60)
    return f"{int(m)}m{sec:.0f}s" if m else f"{sec:.3g}s"


def buckets_for(t: TenantConfig, now: float) -> tuple[TokenBucket, TokenBucket]:
    return (TokenBucket(t.burst, t.requests_per_minute / 60, t.burst, now),
            TokenBucket(t.tokens_per_minute, t.tokens_per_minute / 60, t.tokens_per_minute, now))


def decide(req: TokenBucket, tok: TokenBucket, tokens: int) -> bool:
    """Take 1 request and `tokens` tokens if both are there. Buckets must be refilled to now."""
    if req.level >= 1 and tok.level >= tokens:
        req.level -= 1
        tok.level -= tokens
        return True
    return False


def decision(allowed: bool, req: TokenBucket, tok: TokenBucket, tokens: int) -> Decision:
    reason = None
    if not allowed:
        reason = "too_large" if tokens > tok.capacity else "requests" if req.level < 1 else "tokens"
    return Decision(allowed, reason, int(req.capacity), max(0, int(req.level)),
                    (req.capacity - req.level) / req.rate, int(tok.capacity), max(0, int(tok.level)),
                    max(0.0, tok.capacity - tok.level) / tok.rate,
                    0.0 if allowed else max(req.wait_s(1), tok.wait_s(tokens)))


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}

    def _buckets(self, t: TenantConfig) -> tuple[TokenBucket, TokenBucket]:
        now = self.clock()
        if t.name not in self.buckets:
            self.buckets[t.name] = buckets_for(t, now)
        req, tok = self.buckets[t.name]
        fresh = buckets_for(t, now)  # a SIGHUP reload may have changed the limits
        req.capacity, req.rate, tok.capacity, tok.rate = (fresh[0].capacity, fresh[0].rate, fresh[1].capacity,
                                                          fresh[1].rate)
        req.refill(now)
        tok.refill(now)
        req.level, tok.level = min(req.level, req.capacity), min(tok.level, tok.capacity)
        return req, tok

    async def acquire(self, t: TenantConfig, tokens: int, take: bool = True) -> Decision:
        """take=False only reports the state (for the headers of a response that costs nothing)."""
        req, tok = self._buckets(t)
        return decision(decide(req, tok, tokens) if take else True, req, tok, tokens)

    async def refund(self, t: TenantConfig, tokens: int) -> None:
        _, tok = self._buckets(t)
        tok.level = min(tok.capacity, tok.level + tokens)

    async def close(self) -> None:
        pass


# Both scripts refill the two buckets of KEYS[1] to Redis's clock first. ARGV: request capacity, request rate/s,
# token capacity, token rate/s, then the amount. Levels go back as strings: Lua numbers would be cut to integers.
_REFILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rc, rr, tc, tr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local r, k, ts = tonumber(b[1]) or rc, tonumber(b[2]) or tc, tonumber(b[3]) or now
local dt = math.max(0, now - ts)
r = math.min(rc, r + dt * rr)
k = math.min(tc, k + dt * tr)
"""
_ACQUIRE = _REFILL + """
local n = tonumber(ARGV[5])
local ok = 0
if ARGV[6] == '0' then ok = 1
elseif r >= 1 and k >= n then r = r - 1; k = k - n; ok = 1 end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(k), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return {ok, tostring(r), tostring(k)}
"""
_REFUND = _REFILL + """
k = math.min(tc, k + tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(k), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisLimiter:
    """The same buckets in Redis. When Redis cannot be reached, `on_error` decides: "open" admits requests
    unchecked, "closed" refuses them (reason "unavailable"). Either way the decision says it was not checked (so
    no quota headers), on_fallback(op) is called for each operation that fell back (op: acquire, peek, refund),
    and the outage is logged once when it starts and once when it ends. After a failure Redis is left alone for
    RETRY_S (operations fall back at once) instead of every request waiting for its timeout."""

    RETRY_S = 1.0

    def __init__(self, url: str, prefix: str = "conveyor:ratelimit:", on_error: str = "open",
                 on_fallback: Callable[[str], None] | None = None) -> None:
        import redis.asyncio as redis

        assert on_error in ("open", "closed")
        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix, self.on_error = prefix, on_error
        self.on_fallback = on_fallback or (lambda op: None)
        self.down_since: float | None = None
        self.retry_at = 0.0
        self._acquire = self.client.register_script(_ACQUIRE)
        self._refund = self.client.register_script(_REFUND)

    def _args(self, t: TenantConfig, amount: int, take: bool = True) -> list:
        req, tok = buckets_for(t, 0.0)
        return [req.capacity, req.rate, tok.capacity, tok.rate, amount, int(take)]

    async def _run(self, script, t: TenantConfig, amount: int, take: bool, op: str):
        """The script's result, or None after a fallback (counted; the outage logged when it starts)."""
        now = time.monotonic()
        if self.down_since is None or now >= self.retry_at:
            try:
                out = await script(keys=[self.prefix + t.name], args=self._args(t, amount, take))
            except Exception as e:  # noqa: BLE001 - any Redis failure: the configured fallback
                if self.down_since is None:
                    self.down_since = now
                    log.warning(json.dumps({"event": "ratelimit_store_down", "fallback": self.on_error,
                                            "error": f"{type(e).__name__}: {e}"[:300]}))
                self.retry_at = now + self.RETRY_S
            else:
                if self.down_since is not None:
                    log.warning(json.dumps({"event": "ratelimit_store_recovered",
                                            "down_s": round(now - self.down_since, 3)}))
                    self.down_since = None
                return out
        self.on_fallback(op)
        return None

    async def acquire(self, t: TenantConfig, tokens: int, take: bool = True) -> Decision:
        req, tok = buckets_for(t, 0.0)
        out = await self._run(self._acquire, t, tokens, take, "acquire" if take else "peek")
        if out is None:
            allowed = self.on_error == "open" or not take
            return replace(decision(allowed, req, tok, tokens), checked=False,
                           reason=None if allowed else "unavailable", retry_after_s=0.0 if allowed else 1.0)
        ok, r, k = out
        req.level, tok.level = float(r), float(k)
        return decision(bool(ok), req, tok, tokens)

    async def refund(self, t: TenantConfig, tokens: int) -> None:
        await self._run(self._refund, t, tokens, True, "refund")

    async def close(self) -> None:
        await self.client.aclose()
