"""Admission: a bounded dispatch queue per model, `interactive` before `batch`, fair share by tokens within a class.

Fairness is start-time fair queuing over tokens. Each tenant has a finish tag per class; a request arriving with an
estimated cost c (prompt + max_tokens) gets the start tag S = max(V, F_tenant) and moves F_tenant to S + c / weight,
where V is the start tag of the request dispatched last in its class. Dispatch takes the smallest (class, S). A tenant
that floods only pushes its own tags ahead; a tenant using less than its share arrives with S = V and goes next.
Tags are corrected by the actual usage when a request ends, and rolled back for a request that leaves the queue.

With several gateway processes (shared.py) a tenant waiting in k processes is weighed w / k in each (`spread`), and
the process's share of the replicas comes from shared.py (the pool's quota); the queue publishes its `backlog()`.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from conveyor.gateway.config import CLASSES


@dataclass
class Rejected(Exception):
    status: int
    reason: str  # metric label
    message: str
    retry_after_s: float | None = None


@dataclass
class Waiter:
    tenant: str
    cls: str
    cost: int
    weight: float = 1.0
    affinity: str | None = None
    deadline: float | None = None  # monotonic
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    removed: bool = False
    spread: int = 1  # gateway processes this tenant waits in (shared.py): its weight here is weight / spread


class FairQueue:
    def __init__(self) -> None:
        self.heap: list[tuple[int, float, int, Waiter]] = []
        self.vtime = dict.fromkeys(CLASSES, 0.0)
        self.finish: dict[tuple[str, str], float] = {}
        self.seq = itertools.count()
        self.size = 0
        self.waiting: dict[tuple[str, str], int] = {}  # (class, tenant) → requests queued
        self.weights: dict[tuple[str, str], float] = {}  # (class, tenant) → its configured weight

    def __len__(self) -> int:
        return self.size

    def push(self, w: Waiter) -> float:
        start = max(self.vtime[w.cls], self.finish.get((w.cls, w.tenant), 0.0))
        self.finish[(w.cls, w.tenant)] = start + w.cost * w.spread / w.weight
        heapq.heappush(self.heap, (CLASSES.index(w.cls), start, next(self.seq), w))
        self.size += 1
        key = (w.cls, w.tenant)
        self.waiting[key] = self.waiting.get(key, 0) + 1
        self.weights[key] = w.weight
        return start

    def _left(self, w: Waiter) -> None:
        self.size -= 1
        key = (w.cls, w.tenant)
        self.waiting[key] -= 1
        if not self.waiting[key]:
            del self.waiting[key], self.weights[key]

    def backlog(self) -> dict[str, dict[str, float]]:
        """class → tenant → weight, for the tenants with requests queued."""
        out: dict[str, dict[str, float]] = {}
        for (cls, tenant), weight in self.weights.items():
            out.setdefault(cls, {})[tenant] = weight
        return out

    def peek(self) -> Waiter | None:
        while self.heap and self.heap[0][3].removed:
            heapq.heappop(self.heap)
        return self.heap[0][3] if self.heap else None

    def pop(self) -> Waiter | None:
        if self.peek() is None:
            return None
        rank, start, _, w = heapq.heappop(self.heap)
        self.vtime[w.cls] = max(self.vtime[w.cls], start)
        self._left(w)
        return w

    def remove(self, w: Waiter) -> None:
        """Lazy removal (deadline passed, client gone); the tenant is not charged for it."""
        assert not w.removed
        w.removed = True
        self._left(w)
        self.charge(w, -w.cost)

    def charge(self, w: Waiter, tokens: float) -> None:
        """Correct the tenant's finish tag by `tokens` more (or fewer) than the estimate."""
        key = (w.cls, w.tenant)
        if key in self.finish:
            self.finish[key] = max(self.vtime[w.cls], self.finish[key] + tokens * w.spread / w.weight)


class ModelQueue:
    """The dispatch queue of one model. `pool.acquire(affinity, cost)` returns a replica with a free slot or None."""

    def __init__(self, model: str, pool: Any, max_queue: int, shed_batch_ratio: float,
                 cold_start_timeout_s: float) -> None:
        self.model, self.pool = model, pool
        self.max_queue, self.shed_batch_ratio, self.cold_start_timeout_s = (max_queue, shed_batch_ratio,
                                                                            cold_start_timeout_s)
        self.queue = FairQueue()
        self.spread: dict[tuple[str, str], int] = {}  # (class, tenant) → processes it waits in (shared.py)
        pool.on_capacity = self.pump

    def __len__(self) -> int:
        return len(self.queue)

    def overloaded(self, ratio: float) -> bool:
        return len(self.queue) >= max(1, ratio * self.max_queue)

    async def admit(self, w: Waiter) -> Any:
        """Wait for a replica slot; raises Rejected (503 shed / no replica, 408 deadline)."""
        if not len(self.queue) and (replica := self.pool.acquire(w.affinity, w.cost)) is not None:
            return replica
        self._shed(w)
        w.spread = self.spread.get((w.cls, w.tenant), 1)
        w.future = asyncio.get_running_loop().create_future()
        self.queue.push(w)
        self.pump()
        try:
            while not w.future.done():
                now = time.monotonic()
                if w.deadline is not None and now >= w.deadline:
                    raise Rejected(408, "deadline", "the request's deadline passed while it was queued")
                if not self.pool.usable() and now - w.enqueued >= self.cold_start_timeout_s:
                    raise Rejected(503, "no_replica", f"no replica of {self.model!r} became available",
                                   retry_after_s=5)
                wait = 0.5 if w.deadline is None else min(0.5, w.deadline - now)
                await asyncio.wait([w.future], timeout=max(wait, 0.001))
                self.pump()  # a backstop: capacity events (breaker closed, replica added) also pump at once
            return w.future.result()
        except BaseException:
            if w.future.done() and not w.future.cancelled():
                self.pool.release(w.future.result(), w.cost, None)  # got a slot but will not use it
            elif not w.removed:
                w.future.cancel()
                self.queue.remove(w)
            raise

    def _shed(self, w: Waiter) -> None:
        n = len(self.queue)
        if n >= self.max_queue or (w.cls == "batch" and n >= self.shed_batch_ratio * self.max_queue):
            raise Rejected(503, "shed", f"{self.model!r} is overloaded ({n} requests queued)", retry_after_s=1)

    def pump(self) -> None:
        while (w := self.queue.peek()) is not None:
            replica = self.pool.acquire(w.affinity, w.cost)
            if replica is None:
                return
            self.queue.pop()
            w.future.set_result(replica)
