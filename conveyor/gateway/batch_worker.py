"""The batch worker: feeds the lines of in-progress batches to the replicas at class `batch`, in the capacity
interactive traffic leaves idle, and records each answer exactly once.

One asyncio task in the gateway. Each pass reads the active batches (tenant by tenant from a rotating start, each
tenant's oldest first: a tenant's many batches get no more turns than another's one), takes their queued lines that
are not in flight, and sends each through `Gateway.dispatch_line` (routing, the dispatch queue, replica pick,
failover, settlement: the HTTP path, at class `batch`, outside the per-minute rate limits). Cancelling batches
get no new line, nor do lines whose tenant or model was removed from the config (they wait for a reload, or
expire). Then `finalize_ready` ends the batches that are done, expired, or cancelling with no line in flight. A pass
runs when a line ends or every POLL_S.

When a model gets a new line (the backoff rule), per model:
- at most `window` of its lines in flight; the window starts at `batch.max_in_flight` and grows by one per line
  answered, up to it (additive increase); while other (interactive) requests are in flight at the model's
  replicas, and for SHARED_FOR_S after they were last seen there (steady traffic comes back), at most
  `batch.max_in_flight_shared` (every running sequence slows every step on a CPU);
- none is sent while an interactive request waits in the model's dispatch queue (`interactive_waiting`), or a
  replica's fresh /metrics shows requests waiting in its engine queue (`replica_busy`): interactive traffic needs the
  capacity. The window is then halved (at most once per CUT_EVERY_S), down to 1 (multiplicative decrease); lines
  already in flight finish (they run at the replica's batch priority);
- none beyond the gateway's free replica slots (`max_in_flight_per_replica` minus what is in flight): a batch line
  never waits in the dispatch queue ahead of capacity; but with no usable replica at all one line is sent, so that
  the queue shows the demand (an autoscaler scaled to zero starts a replica);
- a retryable outcome (408, 5xx, a connection error: the gateway's 502/503) leaves the line queued, never recorded:
  the window is halved and the model paused for an exponential backoff with full jitter (BACKOFF_BASE_S doubling up
  to BACKOFF_MAX_S; a success resets it). A 429 (batch lines are outside the tenant's per-minute limits, so only a
  replica's own) pauses that tenant's batches the same way, not the model. Any other answer (2xx, 4xx, and a 429
  `request_too_large`) is final and goes to the output or error file; so is a line's LINE_MAX_FAILURES-th replica
  failure when other lines of its model were answered in between and none failed beside it (that line, not the
  replica, is at fault: e.g. it outlives the gateway's read timeout; a crash fails all the lines in flight).

Exactly once: `record_result` stores only the first answer of a line. After a crash the queued lines are picked up
again; a line that was in flight is sent again, and whichever answer is recorded first is the only one kept.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.gateway.batch_store import BatchStore, Line
from conveyor.gateway.config import TenantConfig
from conveyor.gateway.picker import METRICS_MAX_AGE_S

if TYPE_CHECKING:
    from conveyor.gateway.app import Gateway

log = logging.getLogger("conveyor.gateway.batch")

POLL_S = 0.5  # a pass at least this often (new batches, expiry, cancellations)
MIN_PASS_S = 0.02  # and at most this often: lines that end together are refilled in one pass
CUT_EVERY_S = 1.0  # the window is halved at most this often (replica metrics are scraped every 0.5 s)
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
SHARED_FOR_S = 10.0  # the shared window holds this long after other requests were last seen at a model's replicas
LINE_MAX_FAILURES = 3  # a line's upstream errors, with its model's other lines answered meanwhile, that make it final
UNKNOWN = "unknown"  # a line whose model is not configured (any more): it waits (a reload may bring it) or expires


def retry_reason(status: int, body: dict) -> str | None:
    """Why an answer is to be retried later (a backoff reason), or None when it is final (2xx, and 4xx but 408, 429
    and 499; a 429 `request_too_large` is final: waiting never helps)."""
    if status == 429:
        err = body.get("error")
        return None if isinstance(err, dict) and err.get("code") == "request_too_large" else "rate_limited"
    if status == 408:
        return "deadline"
    if status == 503:
        return "rejected"  # shed, no replica, rate-limit store down: the gateway's own refusals
    if status >= 500 or status == 499:  # 499: the line's flight was cancelled (the gateway is stopping)
        return "upstream_error"
    return None


@dataclass
class Backoff:
    """Exponential backoff with full jitter: a pause of up to BACKOFF_BASE_S doubling per consecutive failure, at
    most BACKOFF_MAX_S."""
    until: float = 0.0  # monotonic
    failures: int = 0

    def fail(self) -> None:
        self.failures = min(self.failures + 1, 32)
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        self.until = max(self.until, time.monotonic() + random.uniform(0, delay))

    def paused(self, now: float) -> bool:
        return now < self.until


@dataclass
class ModelState:
    """The worker's view of one model: its window, its lines in flight, its backoff."""
    window: int
    in_flight: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    last_cut: float = -1e9
    held: str | None = None  # why no line may start now (counted once per hold in batch_backoffs)
    answered: int = 0  # lines of this model with a final answer (since the gateway started)
    failed: int = 0  # retryable answers to this model's lines but 429s (since the gateway started)
    interactive_at: float = -1e9  # monotonic: when other requests were last seen in flight at its replicas


@dataclass
class BatchWorker:
    gateway: Gateway
    store: BatchStore
    models: dict[str, ModelState] = field(default_factory=dict)
    in_flight: dict[str, set[int]] = field(default_factory=dict)  # batch id → line indices at replicas
    tenants: dict[str, Backoff] = field(default_factory=dict)  # rate-limited tenants
    # (batch id, line idx) -> (its upstream errors that came alone, its model's `answered` at the first, the
    # model's `failed` just after its latest error if that came alone, else None): see _given_up
    strikes: dict[tuple[str, int], tuple[int, int, int | None]] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    # the worker's store calls run here; stop() waits for them, so the store is never closed under a running call
    threads: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "batch-worker"))
    turn: int = 0  # rotates which tenant's batches are served first
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    stopping: bool = False

    def start(self) -> None:
        assert self.task is None
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Cancel the loop and the lines in flight (they stay queued: the next start sends them again)."""
        self.stopping = True  # the loop ends even if a cancellation is lost
        for t in [self.task, *self.tasks]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in [self.task, *self.tasks] if t is not None), return_exceptions=True)
        await asyncio.to_thread(self.threads.shutdown, True)

    async def _db(self, fn, *args):
        """fn(*args) (a store call) in the worker's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)

    async def run(self) -> None:
        """Pass after pass until cancelled; a pass that fails (a database error) is logged and retried."""
        while not self.stopping:
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - the worker must outlive a bad pass (disk full, a locked database)
                log.exception(json.dumps({"event": "batch_worker_error"}))
                self.metrics.batch_backoffs.labels("store_error").inc()
                await asyncio.sleep(BACKOFF_BASE_S * 4)
            # asyncio.wait, not wait_for: Python 3.11's wait_for drops a cancellation that arrives as the wait ends
            woken = asyncio.ensure_future(self.wake.wait())
            try:
                await asyncio.wait([woken], timeout=POLL_S)
            finally:
                woken.cancel()
            await asyncio.sleep(MIN_PASS_S)
            self.wake.clear()

    @property
    def metrics(self):
        return self.gateway.metrics

    @property
    def cap(self) -> int:
        """batch.max_in_flight: lines of one model in flight at most (read at each use: a reload may change it)."""
        return self.gateway.cfg.batch.max_in_flight

    async def step(self) -> None:
        """One pass: send what the backoff rule allows, then end the batches that are done."""
        batches = await self._db(self.store.active_batches)
        live = [b for b in batches if b["status"] == "in_progress" and b["expires_at"] > time.time()]
        if live:
            room = {name: self._room(name) for name in self.gateway.pools}
            for b in self._in_turn(live):
                if sum(room.values()) <= 0:
                    break
                await self._fill(b, room)
        active = {b["id"] for b in batches}
        self.in_flight = {b: idx for b, idx in self.in_flight.items() if idx or b in active}
        self.strikes = {k: v for k, v in self.strikes.items() if k[0] in active}  # ended batches' lines: never again
        busy = {b for b, idx in self.in_flight.items() if idx}
        await self._db(self.store.finalize_ready, None, busy)
        self.metrics.batch_lines_in_flight.set(sum(map(len, self.in_flight.values())))

    def _in_turn(self, live: list[dict]) -> list[dict]:
        """The batches in the order this pass serves them: tenant by tenant from a start that rotates each pass,
        each tenant's oldest first (a tenant with many batches gets no more turns than one with a single batch)."""
        tenants = list(dict.fromkeys(b["tenant"] for b in live))
        self.turn = (self.turn + 1) % len(tenants)
        rank = {t: i for i, t in enumerate(tenants[self.turn:] + tenants[:self.turn])}
        return sorted(live, key=lambda b: rank[b["tenant"]])  # stable: oldest first within a tenant

    async def _fill(self, batch: dict, room: dict[str, int]) -> None:
        tenant = next((t for t in self.gateway.cfg.tenants if t.name == batch["tenant"]), None)
        if tenant is None:  # removed from the config: its lines wait (a reload may bring it back) or expire
            return
        if self.tenants.setdefault(tenant.name, Backoff()).paused(time.monotonic()):
            return
        inflight = self.in_flight.setdefault(batch["id"], set())
        models = self._names_with_room(room)
        if not models:
            return
        lines = await self._db(self.store.pending_lines, batch["id"], self.cap * 2, set(inflight), models)
        for line in lines:
            name = self._model_of(line)
            if room.get(name, 0) <= 0:
                continue
            room[name] -= 1
            inflight.add(line.idx)
            self._state(name).in_flight += 1
            task = asyncio.create_task(self._send(batch, tenant, line, name))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _names_with_room(self, room: dict[str, int]) -> list[str]:
        """The model names a line may give (names, aliases, `auto`) whose pool may take a line now."""
        cfg = self.gateway.cfg
        names = [n for m in cfg.models for n in (m.name, *m.aliases)] + ["auto"]
        return [n for n in names if room.get(self._pool_of(n), 0) > 0]

    def _model_of(self, line: Line) -> str:
        """The pool a line goes to (its model's name; `auto`: the large model), UNKNOWN for a model not configured."""
        return self._pool_of(line.body.get("model"))

    def _pool_of(self, name: str | None) -> str:
        cfg = self.gateway.cfg
        if name == "auto" and cfg.auto_route is not None:
            name = cfg.auto_route.large
        model = cfg.model(name) if isinstance(name, str) else None
        return model.name if model is not None and model.name in self.gateway.pools else UNKNOWN

    def _state(self, name: str) -> ModelState:
        if name not in self.models:
            self.models[name] = ModelState(window=self.cap)
        st = self.models[name]
        st.window = min(st.window, self.cap)  # a reload may have lowered the cap
        return st

    def _room(self, name: str) -> int:
        """How many more lines of model `name` may start now (the backoff rule in the module docstring)."""
        st, now = self._state(name), time.monotonic()
        if st.backoff.paused(now):
            return 0
        queue, pool = self.gateway.queues[name], self.gateway.pools[name]
        if not pool.usable():
            return self._hold(st, None, 1 - st.in_flight)
        first = queue.queue.peek()
        if first is not None and first.cls == "interactive":
            return self._hold(st, "interactive_waiting", 0, cut=True)
        routable = [r for r in pool.replicas.values() if r.routable(now)]
        if any(now - r.metrics_at <= METRICS_MAX_AGE_S and r.metrics.get("waiting", 0) > 0 for r in routable):
            return self._hold(st, "replica_busy", 0, cut=True)
        # what this process may dispatch: the replicas' room (other gateway processes' requests there included)
        # within its share of the model (shared.py); a line past it would only wait in the dispatch queue
        free = sum(max(0, pool.max_in_flight - r.in_flight - r.others) for r in routable)
        if pool.quota is not None:
            free = min(free, pool.quota - pool.in_flight)
        if sum(r.in_flight + r.others for r in routable) > st.in_flight:  # the gateway's other requests are there
            st.interactive_at = now
        shared = now - st.interactive_at < SHARED_FOR_S
        window = min(st.window, self.gateway.cfg.batch.max_in_flight_shared) if shared else st.window
        return self._hold(st, None, min(window - st.in_flight, free))

    def _hold(self, st: ModelState, reason: str | None, room: int, cut: bool = False) -> int:
        """room (at least 0); when a reason holds the model back, count it once per hold and maybe halve its
        window."""
        if reason is not None and st.held != reason:
            self.metrics.batch_backoffs.labels(reason).inc()
        st.held = reason
        if cut:
            self._cut(st)
        return max(0, room)

    def _cut(self, st: ModelState) -> None:
        now = time.monotonic()
        if now - st.last_cut >= CUT_EVERY_S:
            st.window, st.last_cut = max(1, st.window // 2), now

    async def _send(self, batch: dict, tenant: TenantConfig, line: Line, name: str) -> None:
        """Dispatch one line and record a final answer; a retryable one only backs the model off."""
        st = self._state(name)
        rid = f"{line.batch_id}-{line.idx}-{uuid.uuid4().hex[:12]}"  # a new id per attempt (a resend is visible)
        deadline = time.monotonic() + max(0.0, batch["expires_at"] - time.time())
        failed_before = st.failed
        try:
            status, body = await self.gateway.dispatch_line(tenant, line.url, line.body, rid, deadline)
            reason = retry_reason(status, body)
            if reason == "rate_limited":
                self.metrics.batch_backoffs.labels(reason).inc()
                self.tenants.setdefault(tenant.name, Backoff()).fail()
                return
            if reason is not None and not self._given_up(st, line, reason, failed_before):
                self._backoff(st, reason)
                return
            self.strikes.pop((line.batch_id, line.idx), None)
            st.answered += 1
            if await self._db(self.store.record_result, line.batch_id, line.idx, status, body, rid):
                outcome = "completed" if 200 <= status < 300 else "failed"
                self.metrics.batch_lines.labels(name, outcome).inc()
            st.backoff.failures = 0
            self.tenants.setdefault(tenant.name, Backoff()).failures = 0
            st.window = min(self.cap, st.window + 1)
        except Exception:  # noqa: BLE001 - a database error: the line stays queued and is sent again later
            log.exception(json.dumps({"event": "batch_line_error", "batch_id": line.batch_id, "idx": line.idx}))
            self._backoff(st, "store_error")
        finally:
            st.in_flight -= 1
            self.in_flight[line.batch_id].discard(line.idx)
            self.wake.set()

    def _given_up(self, st: ModelState, line: Line, reason: str, failed_before: int | None = None) -> bool:
        """Whether a retryable answer of this line is final after all: its LINE_MAX_FAILURES-th upstream error
        while other lines of its model were answered in between (the line itself fails, e.g. it outlives the
        gateway's read timeout; a replica that fails every line is a fault to wait out, never recorded).
        `failed_before`: the model's `failed` when this attempt was sent (None: now). A failure counts only when
        it came alone: no other line of the model had a retryable answer from this attempt's start until the
        line's next attempt (a replica that crashes fails every line it runs at once: those lines are not at
        fault); the latest failure is counted on trust, its successor not being sent yet."""
        failed_before = st.failed if failed_before is None else failed_before
        alone = st.failed == failed_before
        st.failed += 1
        if reason != "upstream_error":
            return False
        key = (line.batch_id, line.idx)
        count, answered_then, mark = self.strikes.get(key, (0, st.answered, None))
        count += mark == failed_before  # its previous failure was alone until this attempt was sent
        self.strikes[key] = (count, answered_then, st.failed if alone else None)
        return alone and count + 1 >= LINE_MAX_FAILURES and st.answered > answered_then

    def _backoff(self, st: ModelState, reason: str) -> None:
        self.metrics.batch_backoffs.labels(reason).inc()
        st.backoff.fail()
        self._cut(st)

    async def refresh_metrics(self) -> None:
        """Set the batch gauges from the store (before /metrics is rendered)."""
        counts = await self._db(self.store.counts)
        self.metrics.batch_lines_queued.set(counts["lines_queued"])
        for status, n in counts["batches"].items():
            self.metrics.batches.labels(status).set(n)
        self.metrics.batch_lines_in_flight.set(sum(map(len, self.in_flight.values())))
