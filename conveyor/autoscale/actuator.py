"""Actuators start and stop engine replicas and keep the gateway's pool in step with them.

One interface, two backends (`local.py`: processes on this machine; `ray_actuator.py`: Ray actors on a cluster):
`start()` launches a replica and returns at once; `poll()` (each control-loop tick) registers replicas with the
gateway once they answer /health, and finishes drains; `drain_and_stop(replica)` stops routing to it, lets its
in-flight requests finish (up to `drain_timeout_s`), then removes and stops it; `list()` is every replica held.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("conveyor.autoscale")


@dataclass
class Replica:
    id: str
    handle: Any  # the backend's: a Popen, a Ray actor
    url: str | None = None  # known once the replica has a port
    state: str = "starting"  # starting → ready → draining → stopped
    started_at: float = field(default_factory=time.monotonic)
    drain_deadline: float = 0.0


class GatewayAdmin:
    """The gateway's admin API for one model's replica pool."""

    def __init__(self, url: str, admin_key: str, model: str, timeout_s: float = 5.0) -> None:
        self.url, self.model = url.rstrip("/"), model
        self.client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {admin_key}"})

    def _call(self, method: str, path: str, **kw) -> dict:
        r = self.client.request(method, self.url + path, **kw)
        r.raise_for_status()
        return r.json() if r.content else {}

    def replicas(self) -> list[dict]:
        return self._call("GET", "/admin/replicas").get("models", {}).get(self.model, [])

    def add(self, url: str) -> None:
        self._call("POST", "/admin/replicas", json={"model": self.model, "url": url})

    def drain(self, url: str) -> int:
        return int(self._call("POST", "/admin/replicas/drain", json={"model": self.model, "url": url})
                   .get("in_flight", 0))

    def remove(self, url: str, abort_in_flight: bool = False) -> None:
        """abort_in_flight: the replica is dead — the gateway cuts its requests at once (retried elsewhere before
        their first event) instead of waiting for them."""
        self._call("DELETE", "/admin/replicas", json={"model": self.model, "url": url,
                                                      "abort_in_flight": abort_in_flight})

    def in_flight(self) -> dict[str, int]:
        return {r["url"]: int(r.get("in_flight", 0)) for r in self.replicas()}

    def close(self) -> None:
        self.client.close()


class Actuator:
    """The replica life cycle; backends implement _launch, _url and _terminate."""

    def __init__(self, gateway: GatewayAdmin | None, drain_timeout_s: float = 60.0,
                 startup_timeout_s: float = 300.0) -> None:
        self.gateway = gateway
        self.drain_timeout_s = drain_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.replicas: dict[str, Replica] = {}
        self._n = 0
        self.health = httpx.Client(timeout=1.0)

    # -- backend hooks
    def _launch(self, replica_id: str) -> Any:
        raise NotImplementedError

    def _url(self, replica: Replica) -> str | None:
        raise NotImplementedError

    def _terminate(self, replica: Replica, grace_s: float) -> None:
        """SIGTERM (the server finishes what it still has), SIGKILL after grace_s."""
        raise NotImplementedError

    def _alive(self, replica: Replica) -> bool:
        return True

    # -- the interface
    def start(self) -> Replica:
        self._n += 1
        rid = f"replica-{self._n}"
        replica = Replica(rid, self._launch(rid))
        self.replicas[rid] = replica
        log.info("replica %s starting", rid)
        return replica

    def list(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state != "stopped"]

    def drain_and_stop(self, replica: Replica) -> None:
        """A starting replica stops at once (it has nothing in flight); a ready one drains first."""
        if replica.state == "starting":
            self._stop(replica, "stopped while starting")
            return
        if replica.state != "ready":
            return
        replica.state = "draining"
        replica.drain_deadline = time.monotonic() + self.drain_timeout_s
        in_flight = self.gateway.drain(replica.url) if self.gateway else 0
        log.info("replica %s draining (%d in flight)", replica.id, in_flight)

    def poll(self) -> None:
        """Advance starting and draining replicas; call once per control-loop tick."""
        in_flight = None
        for r in list(self.list()):
            if not self._alive(r):
                self._stop(r, "exited", dead=True)
            elif r.state == "starting":
                self._poll_starting(r)
            elif r.state == "draining":
                if in_flight is None:
                    in_flight = self.gateway.in_flight() if self.gateway else {}
                left = in_flight.get(r.url, 0)
                if left == 0 or time.monotonic() > r.drain_deadline:
                    # past the timeout the replica must go: a short grace, not the server's own drain
                    self._stop(r, "drained" if left == 0 else f"drain timeout with {left} in flight", grace_s=5.0)

    def _poll_starting(self, r: Replica) -> None:
        if r.url is None:
            r.url = self._url(r)
        if r.url and self._healthy(r.url):
            if self.gateway:
                self.gateway.add(r.url)
            r.state = "ready"
            log.info("replica %s ready at %s after %.1fs", r.id, r.url, time.monotonic() - r.started_at)
        elif time.monotonic() - r.started_at > self.startup_timeout_s:
            self._stop(r, "start-up timeout")

    def _healthy(self, url: str) -> bool:
        try:
            return self.health.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _stop(self, r: Replica, why: str, grace_s: float = 30.0, dead: bool = False) -> None:
        """dead: its requests at the gateway are cut (a frozen node sends no RST: they would hang), not awaited."""
        if self.gateway and r.url and r.state in ("ready", "draining"):
            try:
                self.gateway.remove(r.url, abort_in_flight=dead)
            except httpx.HTTPError as e:
                log.warning("replica %s: gateway remove failed: %s", r.id, e)
        self._terminate(r, grace_s)
        r.state = "stopped"
        log.info("replica %s stopped (%s)", r.id, why)

    def shutdown(self) -> None:
        for r in self.list():
            self._stop(r, "shutdown")
        self.health.close()


def pick_victims(replicas: list[Replica], in_flight: dict[str, int], k: int) -> list[Replica]:
    """Which k replicas go: starting ones first (newest first), then the ready ones with the fewest in flight."""
    starting = sorted((r for r in replicas if r.state == "starting"), key=lambda r: -r.started_at)
    ready = sorted((r for r in replicas if r.state == "ready"), key=lambda r: (in_flight.get(r.url, 0), -r.started_at))
    return (starting + ready)[:max(0, k)]
