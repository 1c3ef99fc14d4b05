"""The control loop: scrape → policy → actuator, once per interval; every decision is a metric and a JSON log."""
from __future__ import annotations

import json
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from conveyor.autoscale.actuator import Actuator, pick_victims
from conveyor.autoscale.policy import SIGNALS, Decision, Observation, PolicyConfig, PolicyState, decide
from conveyor.autoscale.signals import SignalScraper

log = logging.getLogger("conveyor.autoscale.decision")


class ControllerMetrics:
    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry()
        self.desired = Gauge("conveyor_autoscaler_desired_replicas", "Replicas the policy wants", ["model"],
                             registry=r).labels(model)
        self.replicas = Gauge("conveyor_autoscaler_replicas", "Replicas held, by state", ["model", "state"],
                              registry=r)
        self.signal = Gauge("conveyor_autoscaler_signal", "Fleet value of each policy signal", ["model", "signal"],
                            registry=r)
        self.recommended = Gauge("conveyor_autoscaler_signal_recommendation", "Replicas each signal asks for",
                                 ["model", "signal"], registry=r)
        self.panic = Gauge("conveyor_autoscaler_panic", "1 while in panic mode", ["model"], registry=r).labels(model)
        self.actions = Counter("conveyor_autoscaler_actions", "Scaling actions taken", ["model", "action"],
                               registry=r)
        self.model = model

    def record(self, d: Decision, states: dict[str, int], action: str) -> None:
        self.desired.set(d.desired)
        self.panic.set(int(d.panic))
        for state in ("starting", "ready", "draining"):
            self.replicas.labels(self.model, state).set(states.get(state, 0))
        for name in SIGNALS:
            if name in d.values:
                self.signal.labels(self.model, name).set(d.values[name])
            if name in d.recommendations:
                self.recommended.labels(self.model, name).set(d.recommendations[name])
        self.actions.labels(self.model, action).inc()


class Controller:
    def __init__(self, cfg: PolicyConfig, actuator: Actuator, scraper: SignalScraper, gateway_url: str | None,
                 model: str, interval_s: float = 2.0) -> None:
        self.cfg, self.actuator, self.scraper = cfg, actuator, scraper
        self.gateway_url, self.model, self.interval_s = gateway_url, model, interval_s
        self.state = PolicyState()
        self.metrics = ControllerMetrics(model)
        self.decisions: list[dict] = []  # every tick's log entry, for tests and post-mortems
        self._last_tick: float | None = None

    def observe(self, now: float) -> Observation:
        replicas = self.actuator.list()
        ready = [r for r in replicas if r.state == "ready"]
        scraped = [s for r in ready if (s := self.scraper.replica(r.url)) is not None]
        self.scraper.forget({r.url for r in ready})
        elapsed = now - self._last_tick if self._last_tick is not None else self.interval_s
        finished = sum(f for _, f in scraped)
        queued = self.scraper.gateway_queued(self.gateway_url) if self.gateway_url else 0.0
        current = sum(r.state in ("starting", "ready") for r in replicas)
        return Observation(now, current, tuple(s for s, _ in scraped), queued, finished / max(elapsed, 1e-3))

    def tick(self, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        self.actuator.poll()
        obs = self.observe(now)
        self._last_tick = now
        decision, self.state = decide(self.cfg, self.state, obs)
        action = self.act(decision.desired, obs.current)
        states: dict[str, int] = {}
        for r in self.actuator.list():
            states[r.state] = states.get(r.state, 0) + 1
        self.metrics.record(decision, states, action.split(" ")[0])
        entry = {"event": "autoscale_decision", "model": self.model, "current": obs.current,
                 "desired": decision.desired, "reason": decision.reason, "signal": decision.signal,
                 "panic": decision.panic, "action": action, "signals": decision.values,
                 "recommendations": decision.recommendations, "replicas": states}
        self.decisions.append(entry)
        log.info(json.dumps(entry))
        return decision

    def act(self, desired: int, current: int) -> str:
        if desired > current:
            started = [self.actuator.start().id for _ in range(desired - current)]
            return "scale_up " + ",".join(started)
        if desired < current:
            held = [r for r in self.actuator.list() if r.state in ("starting", "ready")]
            gw = self.actuator.gateway
            in_flight = gw.in_flight() if gw and any(r.state == "ready" for r in held) else {}
            victims = pick_victims(held, in_flight, current - desired)
            for r in victims:
                self.actuator.drain_and_stop(r)
            return "scale_down " + ",".join(r.id for r in victims)
        return "none"

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                self.tick(t0)
            except Exception:  # a failed tick (gateway briefly down) must not end the loop
                logging.getLogger("conveyor.autoscale").exception("autoscaler tick failed")
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))
        self.actuator.poll()
