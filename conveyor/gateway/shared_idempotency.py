"""Idempotency-Key across gateway processes (with `redis_url`: the workers of `--workers N`, or gateways on several
machines): a claim per (tenant, key) in Redis, beside each process's own cache (idempotency.py).

- The first process to see a key claims it (`running`, with its request's hash) and runs the request. A retry that
  reaches another process while it runs is answered 409 with Retry-After (the key is in use); one with a different
  request is 422, as in one process.
- When the request ends: a complete non-stream 200 of at most MAX_BODY_BYTES is stored (`done`) for
  `idempotency_window_s` and replayed to retries in any process; anything else (an error, a stream — its events are
  kept only by the process that ran it —, a cut response, a bigger body) frees the key, so a retry elsewhere runs
  again.
- The claim lives RUNNING_TTL_S, renewed by its process while the request runs: one whose process died expires.
- Redis unreachable: every request runs as in one process (the claim is skipped), counted as a fallback.

Keys are `conveyor:idem:` + sha256(tenant, key): an Idempotency-Key never appears in Redis as sent.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.gateway.proxy import Flight

log = logging.getLogger("conveyor.gateway")

MAX_BODY_BYTES = 1 << 20
RUNNING_TTL_S = 30.0
RETRY_AFTER_S = 1
RETRY_S = 1.0  # after a Redis failure, claims are skipped this long instead of every request waiting for its timeout

# KEYS[1] the claim; ARGV: the owner's running value, the new value ("" deletes, "=" keeps it), its TTL in ms
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
elseif ARGV[2] == '=' then redis.call('PEXPIRE', KEYS[1], ARGV[3])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


@dataclass
class Claim:
    """What a process may do with a request carrying an Idempotency-Key. state: "run" (it holds the claim, or Redis
    is down: `owner` None), "running" (another process runs it), "done" (replay `status`, `body`, `headers`),
    "mismatch" (the key was used with another request)."""
    state: str
    owner: str | None = None
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] | None = None


class SharedIdempotency:
    def __init__(self, url: str, window_s: float, on_fallback: Callable[[str], None] | None = None) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.window_s = window_s
        self.on_fallback = on_fallback or (lambda op: None)
        self.retry_at = 0.0
        self._settle = self.client.register_script(_SETTLE)

    async def claim(self, tenant: str, key: str, request_hash: str) -> Claim:
        """Claim (tenant, key) for this request, or say who has it. Never raises: Redis down is "run" unclaimed."""
        if time.monotonic() < self.retry_at:
            self.on_fallback("claim")
            return Claim("run")
        k = claim_key(tenant, key)
        owner = json.dumps({"h": request_hash, "state": "running", "id": uuid.uuid4().hex})
        try:
            for _ in range(2):  # a second try when the other claim expired between SET and GET
                if await self.client.set(k, owner, nx=True, px=int(RUNNING_TTL_S * 1000)):
                    return Claim("run", owner)
                raw = await self.client.get(k)
                if raw is not None:
                    return _seen(json.loads(raw), request_hash)
        except Exception as e:  # noqa: BLE001 - any Redis failure: run it as one process would
            self._failed("claim", e)
            return Claim("run")
        return Claim("run")

    async def follow(self, tenant: str, key: str, claim: Claim, flight: Flight) -> None:
        """Hold the claim while the flight runs (renewed every third of its TTL), then settle it. Never raises."""
        if claim.owner is None:
            return
        while not flight.done and flight.task is not None and not flight.task.done():
            await asyncio.wait({flight.task}, timeout=RUNNING_TTL_S / 3)
            if not flight.done:
                await self._call("renew", tenant, key, claim, "=", RUNNING_TTL_S)
        await self.settle(tenant, key, claim, flight)

    async def settle(self, tenant: str, key: str, claim: Claim, flight: Flight | None) -> None:
        """The claimed request ended (flight None: it never started): keep its answer for replays when it is a
        complete non-stream 200 of at most MAX_BODY_BYTES, else free the key. Never raises."""
        if claim.owner is None:
            return
        value = ""
        if flight is not None and _replayable(flight):
            value = json.dumps({"h": json.loads(claim.owner)["h"], "state": "done", "status": flight.status,
                                "body": bytes(flight.chunks[0]).decode(), "headers": dict(flight.headers)})
        await self._call("settle", tenant, key, claim, value, self.window_s)

    async def _call(self, op: str, tenant: str, key: str, claim: Claim, value: str, ttl_s: float) -> None:
        try:
            await self._settle(keys=[claim_key(tenant, key)], args=[claim.owner, value, int(ttl_s * 1000)])
        except Exception as e:  # noqa: BLE001 - the claim expires on its own (RUNNING_TTL_S)
            self._failed(op, e)

    def _failed(self, op: str, e: Exception) -> None:
        if time.monotonic() >= self.retry_at:
            log.warning(json.dumps({"event": "idempotency_store_error", "op": op,
                                    "error": f"{type(e).__name__}: {e}"[:300]}))
        self.retry_at = time.monotonic() + RETRY_S
        self.on_fallback(op)

    async def close(self) -> None:
        await self.client.aclose()


def _seen(v: dict, request_hash: str) -> Claim:
    if v.get("h") != request_hash:
        return Claim("mismatch")
    if v.get("state") != "done":
        return Claim("running")
    return Claim("done", status=v["status"], body=v["body"].encode(), headers=v.get("headers") or {})


def _replayable(f: Flight) -> bool:
    if f.stream or not f.done or not f.complete or f.status != 200 or len(f.chunks) != 1:
        return False
    if len(f.chunks[0]) > MAX_BODY_BYTES:
        return False
    try:
        bytes(f.chunks[0]).decode()
    except UnicodeDecodeError:
        return False
    return True


def claim_key(tenant: str, key: str) -> str:
    """The Redis key of (tenant, Idempotency-Key): hashed, so the key as sent is never stored."""
    return "conveyor:idem:" + hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()
