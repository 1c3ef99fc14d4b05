"""State shared by the gateway processes of one deployment through Redis (`redis_url`): tenants' concurrency slots,
and each model's replica capacity split fairly between the processes' dispatch queues.

Which state is shared, and why. Token buckets: ratelimit.py (one Lua script per request). Concurrency slots: here,
one round trip per acquire, exact across processes. The dispatch queues stay per process (a request waits where its
client is connected) but their *capacity* is split through Redis without any round trip on the dispatch path.
Everything else stays per process: replica health and breakers (each process watches the replicas itself),
coalescing and idempotency (per client connection), prefix affinity (a hint).

Liveness. Every process has an id and beats every `redis_sync_interval_s` (a sorted set, scored by Redis's clock).
A process not heard from for `redis_heartbeat_ttl_s` is presumed dead: what it published is ignored and dropped.

Concurrency slots. Per tenant a hash with one field per process: the slots it holds. Acquire is one Lua script: drop
the fields of dead processes, sum the rest, take one if under max_concurrent. Release decrements in the background
(nothing waits for it). A process that crashed frees its slots after the TTL. Ops that could not reach Redis (a
slot taken or released during an outage, an acquire whose client left mid-call, a process presumed dead during a
long pause) mark the tenant dirty; the next sync with nothing in flight for it rewrites the field to what the
process really holds, so slots taken during an outage count once Redis is back.
Redis unreachable: the process's own count alone decides (with ratelimit_on_redis_error "closed" the rate limits,
checked next, refuse the request with a 503).

Fair capacity split. Each sync publishes, per model, the process's in-flight requests per replica, its backlog (per
class, the tenants waiting and their weights) and its quota, and reads every live process's. Each process computes
the same fair targets for the model's capacity C (the routable replicas' max_in_flight_per_replica, summed):
  - no backlog anywhere: what each has in flight plus an equal share of the free room;
  - otherwise, in the highest class with a backlog (interactive before batch): a tenant t waiting in k_t processes
    counts w_t / k_t in each; a backlogged process's target is C, less what the processes with an empty queue have
    in flight, times its tenants' weight over all backlogged tenants' weight (largest remainder, whole requests).
    A process with an empty queue keeps what it has in flight; one whose backlog is only of a lower class gets 0.
  So each tenant gets w_t / sum(w) of the model globally, and the local fair queue weighs tenant t by w_t / k_t
  (`spread`), splitting the process's quota as the global rule does.
A process's quota (pool.quota: what it may have in flight) above its target shrinks at once. Below, it grows in two
steps: a sync *claims* a share of the room nobody holds (a process holds the larger of its in-flight requests and its
published quota), and the next sync, once the claim is published, takes at most the claim and what the others'
published values leave. A quota never exceeds what its process last published, and Redis runs the syncs one at a
time, so whoever grows sees every claim made before: the quotas never sum to more than C (while the processes
agree on C and none alive is presumed dead). Costs: a new backlog or
freed room is used within about two intervals (work-conserving then), and no Redis call on the dispatch path.
Per replica, a process counts the others' published in-flight requests there (Replica.others); with one replica
the quota bound is exact, with several a replica can exceed its cap by what others dispatched to it since their
last publish (the model's total never exceeds C). A retry on another replica ignores caps, as without Redis.
Redis unreachable: each process takes ceil(C / live processes last seen), and that fraction of each replica.

Replicas managed through the admin API: shared_replicas.py, read at each sync after the split.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from conveyor.gateway.config import CLASSES
from conveyor.gateway.shared_replicas import SharedReplicas

log = logging.getLogger("conveyor.gateway")

# KEYS[1] the tenant's slot hash, KEYS[2] the live set. ARGV: this process, max_concurrent, ttl.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #h, 2 do
  local seen = tonumber(redis.call('ZSCORE', KEYS[2], h[i]))
  if h[i] ~= ARGV[1] and (not seen or seen < now - tonumber(ARGV[3])) then
    redis.call('HDEL', KEYS[1], h[i])
  else
    total = total + tonumber(h[i + 1])
  end
end
if total >= tonumber(ARGV[2]) then return {0, total} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], 3600)
return {1, total + 1}
"""
# KEYS[1] the tenant's slot hash. ARGV: this process, the delta (-1), or 'set' and the count to write.
_RELEASE = """
local n
if ARGV[2] == 'set' then n = tonumber(ARGV[3]) else
  n = (tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0) + tonumber(ARGV[2]) end
if n > 0 then redis.call('HSET', KEYS[1], ARGV[1], n) else redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""
# KEYS[1] the live set, KEYS[2..] each model's state hash. ARGV: this process, ttl, then each model's state.
# Returns whether this process had been presumed dead, and per model the live processes' states (flat pairs).
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
local before = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 100 * ttl)
local out = {(before and before >= now - ttl) and 0 or 1}
for k = 2, #KEYS do
  redis.call('HSET', KEYS[k], ARGV[1], ARGV[k + 1])
  redis.call('EXPIRE', KEYS[k], 3600)
  local h = redis.call('HGETALL', KEYS[k])
  local live = {}
  for i = 1, #h, 2 do
    local seen = tonumber(redis.call('ZSCORE', KEYS[1], h[i]))
    if not seen or seen < now - ttl then redis.call('HDEL', KEYS[k], h[i])
    else live[#live + 1] = h[i]; live[#live + 1] = h[i + 1] end
  end
  out[#out + 1] = live
end
return out
"""


@dataclass
class View:
    """One process's published state of one model."""
    gid: str
    in_flight: dict[str, int]  # replica URL → requests there
    backlog: dict[str, dict[str, float]]  # class → tenant → weight, tenants with requests queued
    quota: int | None = None  # the most it may have in flight until its next sync (None: nothing yet)

    def busy(self) -> bool:
        return any(self.backlog.values())


@dataclass
class Split:
    quota: int  # requests this process may have in flight for the model, from now on
    claim: int  # its fair quota now: published at the next sync, the most it may grow to after that
    others: dict[str, int]  # replica URL → the other processes' requests there
    spread: dict[tuple[str, str], int] = field(default_factory=dict)  # (class, tenant) → other processes waiting + 1


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """`total` whole units split in proportion to `weights` (largest remainder, ties by key): sums to total when
    any weight is positive, else all zero."""
    s = sum(weights.values())
    if total <= 0 or s <= 0:
        return dict.fromkeys(weights, 0)
    exact = {k: total * w / s for k, w in weights.items()}
    out = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[:total - sum(out.values())]:
        out[k] += 1
    return out


def targets(views: list[View], capacity: int) -> dict[str, int]:
    """Each process's fair quota of a model's `capacity` requests (the rule in the module doc)."""
    n = {v.gid: sum(v.in_flight.values()) for v in views}
    top = next((c for c in CLASSES if any(v.backlog.get(c) for v in views)), None)
    if top is None:
        room = apportion(max(0, capacity - sum(n.values())), {v.gid: 1.0 for v in views})
        return {g: n[g] + room[g] for g in n}
    kept = sum(n[v.gid] for v in views if not v.busy())
    k = Counter((top, t) for v in views for t in v.backlog.get(top, {}))
    weights = {v.gid: sum(w / k[(top, t)] for t, w in v.backlog.get(top, {}).items()) for v in views}
    share = apportion(max(0, capacity - kept), {g: w for g, w in weights.items() if w > 0})
    return {v.gid: n[v.gid] if not v.busy() else share.get(v.gid, 0) for v in views}


def split(views: list[View], me: str, capacity: int, quota: int, claim: int) -> Split:
    """This process's (`me`, one of `views`, which published max(quota, claim)) new quota and claim, and its view
    of the replicas. A quota above the fair target shrinks at once. One below grows in two steps: this sync claims
    a share of the room no process holds (the larger of its in-flight requests and its published value), that room
    apportioned among the processes below their targets; the next sync, once the claim is published, takes at most
    the claim and what the others' published values leave. As each process's quota never exceeds what it last
    published, and Redis orders the syncs, the quotas never sum to more than `capacity`: a process growing sees
    every claim published before its own."""
    target = targets(views, capacity)
    held = {v.gid: max(sum(v.in_flight.values()), v.quota or 0) for v in views}
    want = {g: max(0, target[g] - held[g]) for g in held}
    grant = apportion(min(max(0, capacity - sum(held.values())), sum(want.values())), want)
    fair = target[me] if target[me] <= held[me] else held[me] + grant[me]
    room = capacity - sum(h for g, h in held.items() if g != me)
    new = fair if fair <= quota else max(quota, min(fair, claim, room))
    others: Counter[str] = Counter()
    for v in views:
        if v.gid != me:
            others.update(v.in_flight)
    k = Counter((c, t) for v in views if v.gid != me for c, ts in v.backlog.items() for t in ts)
    return Split(new, fair, dict(others), {key: k[key] + 1 for key in k})


class SharedState:
    """This process's side of the shared state. `models()` returns {model: (pool, queue)} as the gateway has them
    now; `on_fallback(op)` counts an operation that could not reach Redis (op: slot_acquire, slot_release, sync)."""

    RETRY_S = 1.0  # after a failure Redis is left alone this long: operations fall back at once

    def __init__(self, url: str, ttl_s: float, interval_s: float, models: Callable[[], dict],
                 on_fallback: Callable[[str], None], prefix: str = "conveyor:shared:") -> None:
        import redis.asyncio as redis

        assert ttl_s > interval_s > 0
        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.gid = uuid.uuid4().hex[:16]
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self.models, self.on_fallback, self.prefix = models, on_fallback, prefix
        self.held: dict[str, int] = {}  # tenant → slots counted in Redis for this process
        self.pending: Counter[str] = Counter()  # tenant → slot operations in flight
        self.ops: Counter[str] = Counter()  # tenant → slot operations started, ever (see _resync)
        self.dirty: set[str] = set()  # tenants whose field may differ from `held`
        self.live_seen = 1  # processes alive at the last sync (this one included)
        self.claims: dict[str, int] = {}  # model → the quota claimed at the last sync (see split)
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.task: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()
        self._acquire = self.client.register_script(_ACQUIRE)
        self._release = self.client.register_script(_RELEASE)
        self._sync = self.client.register_script(_SYNC)
        self.replicas = SharedReplicas(self.client, self._call, prefix)

    # ---- Redis calls with the fallback ---------------------------------------------------------------------------
    async def _call(self, script, keys: list[str], args: list, op: str):
        """The script's result, or None when Redis is unreachable (counted; the outage logged when it starts)."""
        now = time.monotonic()
        if self.down_since is None or now >= self.retry_at:
            try:
                out = await script(keys=keys, args=args)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any Redis failure: the fallback
                if self.down_since is None:
                    self.down_since = now
                    log.warning(json.dumps({"event": "shared_state_down", "fallback": "this process's own counts",
                                            "error": f"{type(e).__name__}: {e}"[:300]}))
                self.retry_at = now + self.RETRY_S
            else:
                if self.down_since is not None:
                    log.warning(json.dumps({"event": "shared_state_recovered",
                                            "down_s": round(now - self.down_since, 3)}))
                    self.down_since = None
                    self.dirty.update(self.held)
                return out
        self.on_fallback(op)
        return None

    def _slots_key(self, tenant: str) -> str:
        return f"{self.prefix}slots:{tenant}"

    # ---- concurrency slots ---------------------------------------------------------------------------------------
    async def take_slot(self, tenant: str, max_concurrent: int) -> bool | None:
        """One of the tenant's max_concurrent slots across all live processes: True taken, False all held
        elsewhere, None Redis unreachable: taken on this process's own count (checked by the caller), and written
        to Redis once it is back. True or None: release_slot it when the request ends."""
        self.pending[tenant] += 1
        self.ops[tenant] += 1
        try:
            out = await self._call(self._acquire, [self._slots_key(tenant), self.prefix + "live"],
                                   [self.gid, max_concurrent, self.ttl_s], "slot_acquire")
        except asyncio.CancelledError:
            self.dirty.add(tenant)  # the script may have run
            raise
        finally:
            self._done(tenant)
        if out is None or out[0]:
            self.held[tenant] = self.held.get(tenant, 0) + 1
        if out is None:
            self.dirty.add(tenant)
            return None
        return bool(out[0])

    def release_slot(self, tenant: str) -> None:
        """Give back a slot take_slot returned True or None for; the Redis update runs in the background."""
        self.held[tenant] -= 1
        assert self.held[tenant] >= 0
        if not self.held[tenant]:
            del self.held[tenant]
        self.pending[tenant] += 1
        self.ops[tenant] += 1
        self._spawn(self._decrement(tenant))

    async def _decrement(self, tenant: str) -> None:
        try:
            if await self._call(self._release, [self._slots_key(tenant)], [self.gid, -1], "slot_release") is None:
                self.dirty.add(tenant)
        finally:
            self._done(tenant)

    def _done(self, tenant: str) -> None:
        self.pending[tenant] -= 1
        if not self.pending[tenant]:
            del self.pending[tenant]

    async def _resync(self) -> None:
        """Rewrite the fields of dirty tenants with nothing in flight to what this process holds."""
        for tenant in [t for t in self.dirty if not self.pending[t]]:
            n, ops = self.held.get(tenant, 0), self.ops[tenant]
            if await self._call(self._release, [self._slots_key(tenant)], [self.gid, "set", n], "sync") is None:
                return
            # clean only if no slot operation started meanwhile: one that reached Redis before this write was
            # overwritten by n (a release lost that way counted a slot for good); the next sync writes it again
            if self.ops[tenant] == ops:
                self.dirty.discard(tenant)

    # ---- capacity split ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Sync from now on; until the first syncs no pool has a share (it is claimed, then taken: two syncs)."""
        for pool, _ in self.models().values():
            pool.quota = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.sync()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - nor a dead loop nor quotas frozen as they were (0 at start)
                if not failing:
                    log.exception(json.dumps({"event": "shared_state_sync_error",
                                              "fallback": "this process's own counts"}))
                failing = True
                self.on_fallback("sync")
                self._fall_back()
            await asyncio.sleep(self.interval_s)

    def _fall_back(self) -> None:
        """No split this time: each model's fallback share (see _apply_fallback)."""
        models = self.models()
        for m in models:
            _apply_fallback(*models[m], self.live_seen)
        self.claims.clear()  # back: quotas start again from what is published then

    async def sync(self) -> None:
        """Beat, publish this process's state of every model, read the others', apply the split."""
        models = self.models()
        names = sorted(models)
        mine = {m: _own_view(self.gid, *models[m], self.claims.get(m, 0)) for m in names}
        out = await self._call(self._sync, [self.prefix + "live", *(f"{self.prefix}queue:{m}" for m in names)],
                               [self.gid, self.ttl_s, *(json.dumps([v.in_flight, v.backlog, v.quota]) for v in
                                                        mine.values())], "sync")
        if out is None:
            self._fall_back()
            return
        if out[0]:  # presumed dead (or new): whatever this process held may have been dropped
            self.dirty.update(self.held)
        if self.dirty:
            await self._resync()
        gids: set[str] = {self.gid}
        for m, pairs in zip(names, out[1:]):
            views = [mine[m]]
            for g, raw in zip(pairs[::2], pairs[1::2]):
                g = g.decode()
                gids.add(g)
                if g != self.gid and (view := _peer_view(g, raw)) is not None:
                    views.append(view)
            pool = models[m][0]
            s = split(views, self.gid, _capacity(pool), pool.quota or 0, self.claims.get(m, 0))
            self.claims[m] = s.claim
            _apply(*models[m], s)
        self.live_seen = len(gids)
        await self.replicas.sync({m: models[m][0] for m in names})

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        """Stop syncing and leave: this process's slots and published state are dropped at once when reachable."""
        if self.task is not None:
            self.task.cancel()
        for t in list(self.background):
            await asyncio.gather(t, return_exceptions=True)
        try:
            async with self.client.pipeline(transaction=False) as p:
                p.zrem(self.prefix + "live", self.gid)
                for tenant in self.held:
                    p.hdel(self._slots_key(tenant), self.gid)
                await p.execute()
        except Exception:  # noqa: BLE001 - unreachable: the TTL frees it all
            pass
        await self.client.aclose()


def _peer_view(gid: str, raw: bytes) -> View | None:
    """Another process's published view of a model; None when it is not one this version reads (a process of
    another version in a rolling deploy): left out of the split, as if that process had no share."""
    try:
        in_flight, backlog, quota = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(in_flight, dict) and all(isinstance(n, int) and n >= 0 for n in in_flight.values())
            and isinstance(backlog, dict) and all(isinstance(ts, dict) and all(
                isinstance(w, int | float) and w > 0 for w in ts.values()) for ts in backlog.values())
            and (quota is None or isinstance(quota, int) and quota >= 0)):
        return None
    return View(gid, in_flight, backlog, quota)


def _own_view(gid: str, pool, queue, claim: int) -> View:
    return View(gid, {url: r.in_flight for url, r in pool.replicas.items() if r.in_flight},
                queue.queue.backlog(), max(pool.quota or 0, claim))


def _capacity(pool) -> int:
    now = time.monotonic()
    return sum(pool.max_in_flight for r in pool.replicas.values() if r.routable(now))


def _apply(pool, queue, s: Split) -> None:
    pool.quota = s.quota
    for url, r in pool.replicas.items():
        r.others = s.others.get(url, 0)
    queue.spread = s.spread
    pool.on_capacity()  # the quota or a replica's room may have grown


def _apply_fallback(pool, queue, live: int) -> None:
    """Redis unreachable: 1/live of the capacity and of each replica, the others presumed to hold the rest."""
    assert live >= 1
    quota = math.ceil(_capacity(pool) / live)
    _apply(pool, queue, Split(quota, quota,
                              {url: pool.max_in_flight - math.ceil(pool.max_in_flight / live)
                               for url in pool.replicas}))


def detach(pools, queues) -> None:
    """No shared state any more: every pool and queue back to this process's own view."""
    for pool in pools:
        pool.quota = None
        for r in pool.replicas.values():
            r.others = 0
        pool.on_capacity()
    for queue in queues:
        queue.spread = {}
