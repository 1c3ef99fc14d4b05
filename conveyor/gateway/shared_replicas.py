"""The replicas managed through the admin API (/admin/replicas: the autoscaler's), shared by the gateway processes of
one deployment through Redis (`redis_url`), so that a replica added, drained or removed through any process is
served, drained or removed by all of them within about one `redis_sync_interval_s`.

Per model a hash, one field per replica URL: "<version> <state> <abort>" with state active, draining or removed
(abort 1: removed as dead, its in-flight requests cut) and version from one counter, so each process applies each
change once and never an older one after a newer. An admin call writes Redis first, then applies the change in its
own process; the others apply it at their next sync (shared.py's loop reads every model's hash after the capacity
split). A removal stays recorded for REMOVED_KEEP_S (a process that was cut off from Redis longer keeps the replica
until its next reload or removal). Redis unreachable: the admin call is refused (503), nothing changes anywhere.
Replicas from the config file stay each process's own; a drain or removal of one through the admin API is shared.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger("conveyor.gateway")

REMOVED_KEEP_S = 3600
STATES = ("active", "draining", "removed")

# KEYS[1] the model's replica hash, KEYS[2] the version counter. ARGV: url, state, abort (0/1), whether this process
# has the replica (0/1). Returns the change's version, or 0 when a drain or removal names a replica no process has.
_WRITE = """
if ARGV[2] ~= 'active' and ARGV[4] == '0' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1])
  if not cur or string.find(cur, ' removed ', 1, true) then return 0 end
end
local v = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], v .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. t[1])
return v
"""
# KEYS: each model's replica hash. ARGV[1]: seconds a removal is kept. Returns per model its fields (flat pairs).
_READ = """
local now = tonumber(redis.call('TIME')[1])
local out = {}
for k = 1, #KEYS do
  local h = redis.call('HGETALL', KEYS[k])
  local kept = {}
  for i = 1, #h, 2 do
    local state, at = string.match(h[i + 1], '^%d+ (%a+) %d (%d+)$')
    if state == 'removed' and tonumber(at) < now - tonumber(ARGV[1]) then redis.call('HDEL', KEYS[k], h[i])
    else kept[#kept + 1] = h[i]; kept[#kept + 1] = h[i + 1] end
  end
  out[#out + 1] = kept
end
return out
"""


@dataclass(frozen=True)
class Change:
    version: int
    state: str  # one of STATES
    abort: bool  # removed as dead: cut its in-flight requests


def parse(raw: bytes | str) -> Change:
    """A hash field's value → Change. Raises ValueError for anything else."""
    version, state, abort, _ = (raw.decode() if isinstance(raw, bytes) else raw).split(" ")
    if state not in STATES or abort not in ("0", "1"):
        raise ValueError(f"not a replica change: {raw!r}")
    return Change(int(version), state, abort == "1")


def apply(pool, url: str, change: Change) -> None:
    """Make `pool` (picker.Pool) hold `url` as `change` says."""
    if change.state == "removed":
        if pool.remove(url, abort=change.abort) is not None:
            log.info(json.dumps({"event": "replica_removed", "model": pool.model, "replica": url,
                                 "abort_in_flight": change.abort, "via": "shared"}))
        return
    if url not in pool.replicas or (change.state == "active" and pool.replicas[url].draining):
        pool.add(url, "admin")
        log.info(json.dumps({"event": "replica_added", "model": pool.model, "replica": url, "via": "shared"}))
    if change.state == "draining" and not pool.replicas[url].draining:
        pool.drain(url)
        log.info(json.dumps({"event": "replica_draining", "model": pool.model, "replica": url, "via": "shared"}))


class SharedReplicas:
    """This process's side; `call(script, keys, args, op)` is SharedState._call (None: Redis unreachable)."""

    def __init__(self, client, call, prefix: str) -> None:
        self.call, self.prefix = call, prefix
        self.seen: dict[tuple[str, str], int] = {}  # (model, url) → the latest version applied here
        self._write = client.register_script(_WRITE)
        self._read = client.register_script(_READ)

    def _key(self, model: str) -> str:
        return f"{self.prefix}replicas:{model}"

    async def write(self, pool, url: str, state: str, abort: bool = False) -> bool | None:
        """Record the change in Redis, then apply it here. True done; False a drain or removal of a replica no
        process has; None Redis unreachable (nothing changed)."""
        assert state in STATES
        v = await self.call(self._write, [self._key(pool.model), self.prefix + "replicas:version"],
                            [url, state, int(abort), int(url in pool.replicas)], "replicas_write")
        if v is None:
            return None
        if not v:
            return False
        self.remember(pool.model, url, Change(int(v), state, abort), pool)
        return True

    def remember(self, model: str, url: str, change: Change, pool) -> None:
        """Apply `change` unless a newer (or the same) one was applied here."""
        if self.seen.get((model, url), 0) >= change.version:
            return
        self.seen[(model, url)] = change.version
        apply(pool, url, change)

    async def sync(self, pools: dict) -> None:
        """Apply every change recorded since the last sync; `pools`: {model: Pool}."""
        names = sorted(pools)
        out = await self.call(self._read, [self._key(m) for m in names], [REMOVED_KEEP_S], "replicas_sync")
        if out is None:
            return
        for m, pairs in zip(names, out):
            urls = {u.decode() for u in pairs[::2]}
            for key in [k for k in self.seen if k[0] == m and k[1] not in urls]:  # its removal expired
                del self.seen[key]
            for url, raw in zip(pairs[::2], pairs[1::2]):
                try:
                    change = parse(raw)
                except ValueError:
                    continue
                self.remember(m, url.decode(), change, pools[m])
