"""Replica pools: health (active /health checks, passive ejection, a circuit breaker per replica), load (this
gateway's in-flight tokens plus the replica's own /metrics, used only when under a second old) and prefix affinity.
With several gateway processes (shared.py) a pool has a quota (requests this process may have in flight) and each
replica's cap counts the other processes' requests there (`others`); without, neither limits anything."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from conveyor.prometheus_text import sum_by_name

log = logging.getLogger("conveyor.gateway")

METRICS_MAX_AGE_S = 1.0
_SCRAPED = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
            "vllm:kv_cache_usage_perc": "kv_usage"}  # vLLM's names: a vLLM replica is picked from the same series


class Breaker:
    """closed → (N consecutive failures) → open → (open_s) → half_open: one trial; success closes, failure reopens.
    A passing active health check closes it at once, open or half-open: the replica answered, and requests waiting
    behind it should not sit out the rest of a cooldown that each failed check restarted."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.threshold, self.open_s = failures, open_s
        self.state, self.failures, self.opened_at, self.trial = "closed", 0, 0.0, False

    def available(self, now: float) -> bool:
        if self.state == "open" and now - self.opened_at >= self.open_s:
            self.state, self.trial = "half_open", False
        return self.state == "closed" or (self.state == "half_open" and not self.trial)

    def on_dispatch(self) -> None:
        if self.state == "half_open":
            self.trial = True

    def success(self) -> None:
        self.state, self.failures, self.trial = "closed", 0, False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.state, self.opened_at, self.trial = "open", now, False

    def health_ok(self, now: float) -> None:
        """An active check passed."""
        if self.state != "closed":
            self.success()

    def trial_abandoned(self) -> None:
        """The trial request ended without a verdict (its client left): allow another."""
        self.trial = False


@dataclass
class Replica:
    url: str
    breaker: Breaker
    source: str = "config"  # or "admin"
    started: bool = False  # a health check has passed once
    draining: bool = False
    in_flight: int = 0
    in_flight_tokens: int = 0
    others: int = 0  # other gateway processes' requests here, as they last published them (shared.py)
    served: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_at: float = -1e9
    max_model_len: int | None = None  # from its GET /v1/models, once it answered
    attempts: set = field(default_factory=set)  # requests at it now, each with cut(reason) (proxy.Attempt)

    def state(self, now: float) -> str:
        if self.draining:
            return "draining"
        if not self.started:
            return "starting"
        return "healthy" if self.breaker.state == "closed" else "unhealthy"

    def routable(self, now: float) -> bool:
        return self.started and not self.draining and self.breaker.available(now)

    def load(self, now: float) -> float:
        """Outstanding tokens: ours, plus requests the replica has from elsewhere (other gateways) at our mean cost."""
        load = float(self.in_flight_tokens)
        if now - self.metrics_at <= METRICS_MAX_AGE_S and self.metrics:
            others = self.metrics.get("running", 0) + self.metrics.get("waiting", 0) - self.in_flight
            mean = self.in_flight_tokens / self.in_flight if self.in_flight else 256
            load += max(0.0, others) * mean + self.metrics.get("kv_usage", 0.0)
        return load


def affinity_key(text: str, prefix_chars: int, salt: str = "") -> str | None:
    """The routing key of a prompt whose first `prefix_chars` characters a replica may have cached, or None for a
    shorter prompt. Only prompts with the same cache salt share cached blocks, so the salt is part of the key."""
    if prefix_chars <= 0 or len(text) < prefix_chars:
        return None
    h = hashlib.sha256(salt.encode() + b"\0" + text[:prefix_chars].encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


class Pool:
    def __init__(self, model: str, max_in_flight: int, client: httpx.AsyncClient, *, breaker_failures: int = 3,
                 breaker_open_s: float = 5.0, health_interval_s: float = 1.0, scrape_interval_s: float = 0.5,
                 affinity_max_load_ratio: float = 2.0) -> None:
        self.model, self.max_in_flight, self.client = model, max_in_flight, client
        self.breaker_failures, self.breaker_open_s = breaker_failures, breaker_open_s
        self.health_interval_s, self.scrape_interval_s = health_interval_s, scrape_interval_s
        self.affinity_max_load_ratio = affinity_max_load_ratio
        self.replicas: dict[str, Replica] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.affinity: OrderedDict[str, str] = OrderedDict()
        self.on_capacity: Callable[[], None] = lambda: None
        self.headers: dict[str, str] = {}  # the replicas' credentials, for health checks and scrapes
        self.upstream_model = model  # the name the replicas serve it under
        self.last_max_model_len: int | None = None  # the latest a replica reported (kept when it goes away)
        self.in_flight = 0  # this process's requests at the replicas (removed ones included)
        self.quota: int | None = None  # this process's share of the replicas (shared.py); None: no limit

    # ---- membership (config, SIGHUP reload, admin API) -----------------------------------------------------------
    def add(self, url: str, source: str = "config") -> Replica:
        url = url.rstrip("/")
        if url in self.replicas:
            r = self.replicas[url]
            r.draining = False
            self.on_capacity()
            return r
        r = self.replicas[url] = Replica(url, Breaker(self.breaker_failures, self.breaker_open_s), source)
        self.tasks[url] = asyncio.create_task(self._watch(r))
        return r

    def drain(self, url: str) -> Replica | None:
        r = self.replicas.get(url.rstrip("/"))
        if r is not None:
            r.draining = True
        return r

    def remove(self, url: str, abort: bool = False) -> Replica | None:
        """In-flight requests keep their Replica object and finish normally; abort=True (the replica is dead): they
        are cut at once, to be retried elsewhere (or end with an error event when already streaming)."""
        r = self.replicas.pop(url.rstrip("/"), None)
        task = self.tasks.pop(url.rstrip("/"), None)
        if task is not None:
            task.cancel()
        if r is not None and abort:
            for attempt in list(r.attempts):
                attempt.cut("replica_dead")
        return r

    async def close(self) -> None:
        for url in list(self.replicas):
            self.remove(url)

    def usable(self) -> bool:
        now = time.monotonic()
        return any(r.routable(now) for r in self.replicas.values())

    def states(self) -> dict[str, int]:
        now = time.monotonic()
        counts = dict.fromkeys(("healthy", "unhealthy", "draining", "starting"), 0)
        for r in self.replicas.values():
            counts[r.state(now)] += 1
        return counts

    def max_model_len(self) -> int | None:
        """The context length of this model's replicas (the largest, should they differ: reservations must cover
        any of them), or the last one reported when no current replica has; None before any has."""
        known = [r.max_model_len for r in self.replicas.values() if r.max_model_len is not None]
        return max(known) if known else self.last_max_model_len

    # ---- picking -------------------------------------------------------------------------------------------------
    def acquire(self, affinity: str | None, cost: int, exclude: tuple[Replica, ...] = (),
                ignore_cap: bool = False) -> Replica | None:
        if not ignore_cap and self.quota is not None and self.in_flight >= self.quota:
            return None
        now = time.monotonic()
        cands = [r for r in self.replicas.values() if r.routable(now) and r not in exclude
                 and (ignore_cap or r.in_flight + r.others < self.max_in_flight)]
        if not cands:
            return None
        loads = {r.url: r.load(now) for r in cands}
        best = min(cands, key=lambda r: (loads[r.url], r.in_flight, random.random()))
        if affinity is not None:
            url = self.affinity.get(affinity)
            if url in loads and loads[url] <= self.affinity_max_load_ratio * loads[best.url] + cost:
                best = self.replicas[url]
            self.affinity[affinity] = best.url
            self.affinity.move_to_end(affinity)
            if len(self.affinity) > 100_000:
                self.affinity.popitem(last=False)
        best.in_flight += 1
        self.in_flight += 1
        best.in_flight_tokens += cost
        best.breaker.on_dispatch()
        return best

    def release(self, r: Replica, cost: int, ok: bool | None) -> None:
        """ok: True success, False a failure to count against the replica, None neither."""
        r.in_flight -= 1
        self.in_flight -= 1
        r.in_flight_tokens -= cost
        assert r.in_flight >= 0 and r.in_flight_tokens >= 0 and self.in_flight >= 0
        if ok is True:
            r.served += 1
            r.breaker.success()
        elif ok is False:
            self.failed(r)
        else:
            r.breaker.trial_abandoned()
        self.on_capacity()

    def failed(self, r: Replica) -> None:
        """Evidence that the replica itself is broken: a failed health check, or a connection it refused."""
        was = r.breaker.state
        r.breaker.failure(time.monotonic())
        if r.breaker.state == "open" and was != "open":
            log.warning('{"event": "replica_ejected", "model": "%s", "replica": "%s"}', self.model, r.url)
            with contextlib.suppress(RuntimeError):  # no loop: a unit test driving the pool by hand
                # half-open after the cooldown: requests queued behind the open breaker get their trial then
                asyncio.get_running_loop().call_later(r.breaker.open_s, self.on_capacity)

    # ---- active checks -------------------------------------------------------------------------------------------
    async def _watch(self, r: Replica) -> None:
        next_health = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_health:
                    next_health = now + self.health_interval_s
                    await self._check_health(r)
                if r.started:
                    await self._scrape(r)
            except Exception:  # noqa: BLE001 - a watcher that dies would leave the replica's state frozen
                log.exception('{"event": "replica_watch_error", "model": "%s", "replica": "%s"}', self.model, r.url)
            await asyncio.sleep(min(self.scrape_interval_s, self.health_interval_s))

    async def _check_health(self, r: Replica) -> None:
        try:
            ok = (await self.client.get(f"{r.url}/health", timeout=1.0, headers=self.headers)).status_code == 200
        except httpx.HTTPError:
            ok = False
        now = time.monotonic()
        was_routable = r.routable(now)
        if ok:
            r.started = True
            r.breaker.health_ok(now)
            if r.max_model_len is None:
                await self._learn_max_model_len(r)
        elif r.started:
            self.failed(r)
            r.max_model_len = None  # it may be restarting, perhaps with another context: ask again once it is back
        if r.routable(now):
            if not was_routable:
                log.info('{"event": "replica_available", "model": "%s", "replica": "%s"}', self.model, r.url)
            self.on_capacity()  # its breaker may have closed (half-open stays "routable"): wake the queue either way

    async def _learn_max_model_len(self, r: Replica) -> None:
        """The replica's max_model_len from its GET /v1/models (the entry of the name it serves this model under,
        else the first); left unknown, to be asked again at the next health check, when it does not say."""
        try:
            resp = await self.client.get(f"{r.url}/v1/models", timeout=1.0, headers=self.headers)
            data = resp.json()["data"] if resp.status_code == 200 else []
            entry = next((m for m in data if m.get("id") == self.upstream_model), data[0] if data else {})
            n = entry.get("max_model_len")
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 31:
            r.max_model_len = self.last_max_model_len = n

    async def _scrape(self, r: Replica) -> None:
        try:
            resp = await self.client.get(f"{r.url}/metrics", timeout=1.0, headers=self.headers)
            resp.raise_for_status()
            sums = sum_by_name(resp.text, _SCRAPED)
        except (httpx.HTTPError, ValueError):  # unreachable, or not Prometheus text: no fresh numbers
            return
        r.metrics, r.metrics_at = {_SCRAPED[k]: v for k, v in sums.items()}, time.monotonic()
