"""Idempotency-Key replays: the first response to (tenant, key) is kept and returned to retries of the same request.

Kept responses are bounded three ways — age (`window_s`), count and bytes. Expired ones go first; then, while over
the count (or byte) bound, the oldest entry of the tenant holding the most entries (or bytes): a tenant that floods
keys only evicts its own, never another's kept responses, and the bounds hold for all tenants together. A response
is counted in bytes once it is complete (a live one is held by its own clients anyway); one that did not complete
(any status but 200, a stream cut or without `data: [DONE]`, a flight cancelled when its last client left) is
dropped as soon as it ends, and never replayed: a retry runs again.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.gateway.proxy import Flight


class KeyReused(Exception):
    """The key was first used with a different request (422)."""


@dataclass
class Entry:
    request_hash: str
    flight: Flight
    expires: float  # monotonic
    nbytes: int = 0  # the kept response's size, once complete


@dataclass
class _Held:
    """One tenant's entries, oldest first, and their bytes."""
    keys: OrderedDict[str, Entry]
    nbytes: int = 0


class IdempotencyCache:
    def __init__(self, window_s: float, max_entries: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.max_entries, self.max_bytes, self.clock = window_s, max_entries, max_bytes, clock
        self.entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # oldest first
        self.tenants: dict[str, _Held] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, tenant: str, key: str, request_hash: str) -> Flight | None:
        """The flight to replay, or None (run the request). Raises KeyReused for a different request."""
        self._purge()
        entry = self.entries.get((tenant, key))
        if entry is None:
            return None
        if entry.request_hash != request_hash:
            raise KeyReused(key)
        if _failed(entry.flight) or entry.expires < self.clock():
            self._drop((tenant, key))
            return None
        return entry.flight

    def put(self, tenant: str, key: str, request_hash: str, flight: Flight) -> None:
        k = (tenant, key)
        self._drop(k)
        entry = self.entries[k] = Entry(request_hash, flight, self.clock() + self.window_s)
        self.tenants.setdefault(tenant, _Held(OrderedDict())).keys[key] = entry
        if flight.done:
            self._settle(k, entry)
        elif flight.task is not None:
            flight.task.add_done_callback(lambda _t: self._settle(k, entry))
        self._purge()

    def _settle(self, k: tuple[str, str], entry: Entry) -> None:
        """The flight ended: count its bytes, or forget it if it failed."""
        if self.entries.get(k) is not entry:
            return  # evicted meanwhile
        if _failed(entry.flight):
            self._drop(k)
            return
        entry.nbytes = sum(len(c) for c in entry.flight.chunks)
        self.nbytes += entry.nbytes
        self.tenants[k[0]].nbytes += entry.nbytes
        self._purge()

    def _purge(self) -> None:
        now = self.clock()
        while self.entries:
            k, first = next(iter(self.entries.items()))
            if first.expires >= now:
                break
            self._drop(k)
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            by_bytes = self.nbytes > self.max_bytes
            tenant, held = max(self.tenants.items(), key=lambda t: t[1].nbytes if by_bytes else len(t[1].keys))
            self._drop((tenant, next(iter(held.keys))))

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self.entries.pop(k, None)
        if entry is None:
            return
        held = self.tenants[k[0]]
        del held.keys[k[1]]
        self.nbytes -= entry.nbytes
        held.nbytes -= entry.nbytes
        if not held.keys:
            del self.tenants[k[0]]
        assert self.nbytes >= 0 and held.nbytes >= 0


def _failed(f: Flight) -> bool:
    """It ended without the whole response (its task may end without finishing it: cancelled before it started)."""
    return (f.done or f.task is not None and f.task.done()) and not f.complete
