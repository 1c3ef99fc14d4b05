"""Discrete-time simulation of a replica fleet under a traffic trace, scaled by the real policy code.

Each replica is modeled by a measured profile (conveyor/autoscale/profile.py): up to `max_num_seqs` requests run;
one that is admitted prefills for profile.prefill(c, prompt) seconds, then emits a token every profile.tpot(c)
seconds, c being the replica's running count at that step. Beyond the slots, requests wait in the replica's queue
(bounded like `conveyor serve --max-waiting-requests`: over it, a request is rejected). The gateway sends each
request to the ready replica with the fewest in flight, and holds requests while no replica is ready (up to
`cold_start_timeout_s`, then rejects them). Replicas take `startup_s` to start and cost from launch to stop.
Every `interval_s` the policy sees the same signals a scrape would give, and its decision is applied as the
controller applies it (starting replicas are removed first; draining ones take no new requests).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from conveyor.autoscale.actuator import Replica, pick_victims
from conveyor.autoscale.policy import Observation, PolicyConfig, PolicyState, ReplicaSample, decide
from conveyor.autoscale.profile import Profile
from conveyor.autoscale.trace import TraceRequest
from conveyor.progress import Progress


@dataclass
class SimConfig:
    dt_s: float = 0.1
    interval_s: float = 2.0
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.05
    max_waiting: int = 512
    cold_start_timeout_s: float = 60.0
    drain_tail_s: float = 900.0  # how long past the trace's end requests may still finish

    def __post_init__(self) -> None:
        if not all(map(math.isfinite, (self.dt_s, self.interval_s, self.slo_ttft_s, self.slo_tpot_s,
                                       self.cold_start_timeout_s, self.drain_tail_s))):
            raise ValueError("the simulation's intervals and SLOs must be finite numbers")
        if not 0 < self.dt_s <= self.interval_s:
            raise ValueError("need 0 < dt_s <= interval_s")
        if min(self.slo_ttft_s, self.slo_tpot_s, self.cold_start_timeout_s) <= 0 or self.max_waiting < 0:
            raise ValueError("SLOs and cold_start_timeout_s must be > 0, max_waiting >= 0")


class SimRequest:
    __slots__ = ("arrival", "prompt", "output", "prefill_left", "generated", "first_token", "finish", "rejected")

    def __init__(self, r: TraceRequest) -> None:
        self.arrival, self.prompt, self.output = r.arrival_s, r.prompt_len, max(1, r.output_len)
        self.prefill_left = -1.0
        self.generated = 0.0
        self.first_token = self.finish = None
        self.rejected = False


@dataclass
class SimReplica:
    meta: Replica  # the actuator's record, so victims are picked by the real pick_victims
    ready_at: float
    stopped_at: float | None = None
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    ttfts: list = field(default_factory=list)  # (time of first token, ttft) since the last scrape

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)


class Fleet:
    def __init__(self, profile: Profile, sim: SimConfig) -> None:
        self.profile, self.sim = profile, sim
        self.replicas: list[SimReplica] = []
        self.gateway: deque[SimRequest] = deque()
        self.rejected = 0
        self._n = 0

    def start(self, now: float, ready_now: bool = False) -> None:
        self._n += 1
        meta = Replica(f"r{self._n}", None, url=f"r{self._n}", started_at=now)
        self.replicas.append(SimReplica(meta, now if ready_now else now + self.profile.startup_s))

    def live(self) -> list[SimReplica]:
        return [r for r in self.replicas if r.meta.state != "stopped"]

    def route(self, req: SimRequest, now: float) -> None:
        ready = [r for r in self.replicas if r.meta.state == "ready"]
        if not ready:
            self.gateway.append(req)
            return
        target = min(ready, key=lambda r: r.in_flight)
        if len(target.waiting) >= self.sim.max_waiting:
            req.rejected = True
            self.rejected += 1
        else:
            target.waiting.append(req)

    def step(self, now: float) -> None:
        for r in self.replicas:
            if r.meta.state == "starting" and now >= r.ready_at:
                r.meta.state = "ready"
        while self.gateway and now - self.gateway[0].arrival > self.sim.cold_start_timeout_s:
            self.gateway.popleft().rejected = True
            self.rejected += 1
        if any(r.meta.state == "ready" for r in self.replicas):
            held, self.gateway = self.gateway, deque()
            for req in held:
                self.route(req, now)
        for r in self.replicas:
            if r.meta.state in ("ready", "draining"):
                self._advance(r, now)
            if r.meta.state == "draining" and not r.in_flight:
                r.meta.state, r.stopped_at = "stopped", now

    def _advance(self, r: SimReplica, now: float) -> None:
        p, dt = self.profile, self.sim.dt_s
        while r.waiting and len(r.running) < p.max_num_seqs:
            req = r.waiting.popleft()
            # a request that arrived inside this step only gets the rest of it
            req.prefill_left = p.prefill(len(r.running) + 1, req.prompt) + max(0.0, req.arrival - (now - dt))
            r.running.append(req)
        tpot = p.tpot(len(r.running))
        still = []
        for req in r.running:
            if req.first_token is None:
                req.prefill_left -= dt
                if req.prefill_left > 0:
                    still.append(req)
                    continue
                req.first_token = now + req.prefill_left  # prefill ended inside this step
                req.generated = 1 - req.prefill_left / tpot
                r.ttfts.append((now, req.first_token - req.arrival))
            else:
                req.generated += dt / tpot
            if req.generated >= req.output:
                req.finish = now - (req.generated - req.output) * tpot
            else:
                still.append(req)
        r.running = still

    def stop(self, r: SimReplica, now: float) -> None:
        if r.meta.state == "starting":
            r.meta.state, r.stopped_at = "stopped", now
        elif r.meta.state == "ready":
            r.meta.state = "draining"

    def sample(self, r: SimReplica, now: float) -> ReplicaSample:
        p = self.profile
        ttfts = [x for t, x in r.ttfts if t > now - self.sim.interval_s]
        r.ttfts.clear()
        backlog = sum(q.prompt for q in r.waiting) + sum(
            q.prompt * min(1.0, q.prefill_left / max(p.prefill(len(r.running), q.prompt), 1e-9))
            for q in r.running if q.first_token is None)
        kv = sum(q.prompt + q.generated for q in r.running) / p.kv_capacity_tokens
        return ReplicaSample(waiting=len(r.waiting), prefill_backlog_tokens=backlog,
                             slots_used_ratio=len(r.running) / p.max_num_seqs, kv_cache_usage_ratio=min(1.0, kv),
                             ttft_p95_s=float(np.percentile(ttfts, 95)) if ttfts else None, running=len(r.running))

    def replica_seconds(self, end: float) -> float:
        return sum((r.stopped_at if r.stopped_at is not None else end) - r.meta.started_at for r in self.replicas)


def simulate(trace: list[TraceRequest], profile: Profile, sim: SimConfig, policy: PolicyConfig | None,
             fixed: int | None = None, on_tick: Callable[[float], None] | None = None) -> dict:
    """Run one policy (or a fixed fleet of `fixed` replicas, ready from the start) over the trace; on_tick gets
    the simulated time (s) at every decision interval."""
    reqs = [SimRequest(r) for r in trace]
    fleet = Fleet(profile, sim)
    for _ in range(fixed or (policy.min_replicas if policy else 0)):
        fleet.start(0.0, ready_now=True)
    state, timeline, nxt, arrivals = PolicyState(), [], 0, 0
    end = (trace[-1].arrival_s if trace else 0.0) + sim.drain_tail_s
    steps_per_tick = max(1, round(sim.interval_s / sim.dt_s))
    for step in range(1, int(end / sim.dt_s) + 1):
        now = step * sim.dt_s
        while nxt < len(reqs) and reqs[nxt].arrival <= now:
            fleet.route(reqs[nxt], now)
            nxt, arrivals = nxt + 1, arrivals + 1
        fleet.step(now)
        if step % steps_per_tick == 0:
            row, state = _tick(fleet, policy, now, arrivals / sim.interval_s, state)
            timeline.append(row)
            arrivals = 0
            if on_tick is not None:
                on_tick(now)
        if nxt == len(reqs) and not fleet.gateway and all(r.in_flight == 0 for r in fleet.live()):
            break
    return _report(reqs, fleet, sim, now, timeline)


def _tick(fleet: Fleet, policy: PolicyConfig | None, now: float, rate: float,
          state: PolicyState) -> tuple[dict, PolicyState]:
    live = fleet.live()
    samples = tuple(fleet.sample(r, now) for r in live if r.meta.state == "ready")
    current = sum(r.meta.state in ("starting", "ready") for r in live)
    ttfts = [s.ttft_p95_s for s in samples if s.ttft_p95_s is not None]
    row = {"t": round(now, 2), "request_rate": rate, "replicas": current,
           "ready": sum(r.meta.state == "ready" for r in live),
           "ttft_p95_s": round(max(ttfts), 4) if ttfts else None}
    if policy is None:
        return row, state
    obs = Observation(now, current, samples, float(len(fleet.gateway)), rate)
    decision, state = decide(policy, state, obs)
    row["desired"], row["signal"] = decision.desired, decision.signal
    if decision.desired > current:
        for _ in range(decision.desired - current):
            fleet.start(now)
    elif decision.desired < current:
        held = [r for r in live if r.meta.state in ("starting", "ready")]
        by_meta = {id(r.meta): r for r in held}
        in_flight = {r.meta.url: r.in_flight for r in held}
        for meta in pick_victims([r.meta for r in held], in_flight, current - decision.desired):
            fleet.stop(by_meta[id(meta)], now)
    return row, state


def _report(reqs: list[SimRequest], fleet: Fleet, sim: SimConfig, end: float, timeline: list) -> dict:
    n = len(reqs)
    done = [r for r in reqs if r.finish is not None]
    unfinished = n - len(done) - sum(r.rejected for r in reqs)
    ttft = np.array([r.first_token - r.arrival for r in done]) if done else np.zeros(0)
    tpot = np.array([(r.finish - r.first_token) / (r.output - 1) if r.output > 1 else 0.0 for r in done])
    rejected = sum(r.rejected for r in reqs)
    # a rejected or never-finished request missed its objective too
    violations = int(((ttft > sim.slo_ttft_s) | (tpot > sim.slo_tpot_s)).sum()) + unfinished + rejected
    pct = lambda xs, q: None if len(xs) == 0 else round(float(np.percentile(xs, q)) * 1e3, 2)  # noqa: E731
    return {"requests": n, "completed": len(done), "rejected": rejected, "unfinished": unfinished,
            "replica_hours": fleet.replica_seconds(end) / 3600,
            "slo_violations": violations, "slo_violation_ratio": violations / max(n, 1),
            "rejected_ratio": rejected / max(n, 1),
            "ttft_violation_ratio": float((ttft > sim.slo_ttft_s).sum()) / max(n, 1),
            "tpot_violation_ratio": float((tpot > sim.slo_tpot_s).sum()) / max(n, 1),
            "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p95": pct(tpot, 95), "p99": pct(tpot, 99)},
            "peak_replicas": max((row["replicas"] for row in timeline), default=0),
            "mean_replicas": float(np.mean([row["replicas"] for row in timeline])) if timeline else 0.0,
            "timeline": timeline}


# ---- baselines -------------------------------------------------------------------------------------------------
def peak_window(trace: list[TraceRequest], window_s: float = 60.0) -> tuple[float, float, float]:
    """(arrivals/s, mean prompt, mean output) of the busiest window of the trace."""
    t = np.array([r.arrival_s for r in trace])
    ends = np.searchsorted(t, t + window_s)
    i = int(np.argmax(ends - np.arange(len(t))))
    sel = trace[i:ends[i]]
    return len(sel) / window_s, float(np.mean([r.prompt_len for r in sel])), float(np.mean([r.output_len for r in sel]))


def littles_law_size(trace: list[TraceRequest], profile: Profile) -> int:
    """Little's law at the busiest minute with every slot in use: rate x E2E(full batch) / slots."""
    rate, prompt, output = peak_window(trace)
    c = profile.max_num_seqs
    return max(1, math.ceil(rate * profile.e2e(c, prompt, output) / c))


def fixed_peak(trace: list[TraceRequest], profile: Profile, sim: SimConfig, budget: float = 0.01,
               limit: int = 256, progress: Progress | None = None) -> tuple[int, dict]:
    """The smallest fixed fleet that keeps SLO violations within `budget` on this very trace (hindsight: the
    best a fixed fleet can do), searched upward from the Little's-law size."""
    n = littles_law_size(trace, profile)
    while True:
        run = _phase(progress, f"fixed-peak, {n} replicas", trace,
                     lambda tick, n=n: simulate(trace, profile, sim, None, fixed=n, on_tick=tick))
        if run["slo_violation_ratio"] <= budget or n >= limit:
            return n, run
        n += 1
        if progress is not None:  # one more run than counted: the total grows
            progress.add_total(_horizon(trace))


def request_rate_target(trace: list[TraceRequest], profile: Profile, slots_target: float) -> float:
    """Requests/s one replica carries at the conveyor policy's slot target, for the trace's mean request."""
    c = max(1.0, slots_target * profile.max_num_seqs)
    prompt = float(np.mean([r.prompt_len for r in trace]))
    output = float(np.mean([r.output_len for r in trace]))
    return c / profile.e2e(c, prompt, output)


def request_count_policy(policy: PolicyConfig, target_rate: float) -> PolicyConfig:
    """The same windows, panic, bounds and cooldowns; request rate as the only signal."""
    return replace(policy, target_waiting=None, target_prefill_backlog_tokens=None, target_slots_used_ratio=None,
                   target_kv_cache_usage_ratio=None, target_ttft_p95_s=None, target_request_rate=target_rate)


def _horizon(trace: list[TraceRequest]) -> int:
    return max(1, math.ceil(trace[-1].arrival_s if trace else 0.0))


def progress_total(trace: list[TraceRequest]) -> int:
    """compare()'s work before the fixed-peak search grows it: three runs of the trace's span, in simulated s."""
    return 3 * _horizon(trace)


def _phase(progress: Progress | None, desc: str, trace: list[TraceRequest],
           run: Callable[[Callable[[float], None] | None], dict]) -> dict:
    """One simulation run, counted as the trace's span of simulated seconds on `progress` (the drain after the
    last arrival is not counted)."""
    if progress is None:
        return run(None)
    horizon, start = _horizon(trace), progress.n
    progress.set_description(f"simulating {desc}")
    progress.note(f"simulating {desc} ...")

    def tick(now: float) -> None:
        progress.update(max(0, int(min(now, horizon)) - (progress.n - start)))

    result = run(tick)
    progress.update(horizon - (progress.n - start))
    return result


def compare(trace: list[TraceRequest], profile: Profile, sim: SimConfig, policy: PolicyConfig,
            progress: Progress | None = None) -> dict:
    """The conveyor policy, the fixed-peak fleet and the request-count policy over the trace. progress, if given,
    counts simulated seconds from progress_total(trace); the fixed-peak search adds a run's worth for each size it
    tries beyond the first."""
    slots = policy.target_slots_used_ratio or 0.8
    fixed, fixed_run = fixed_peak(trace, profile, sim, progress=progress)
    rate_target = request_rate_target(trace, profile, slots)
    count_policy = request_count_policy(policy, rate_target)
    runs = {"conveyor": _phase(progress, "the conveyor policy", trace,
                               lambda tick: simulate(trace, profile, sim, policy, on_tick=tick)),
            "fixed-peak": fixed_run,
            "request-count": _phase(progress, "the request-count policy", trace,
                                    lambda tick: simulate(trace, profile, sim, count_policy, on_tick=tick))}
    runs["fixed-peak"]["replicas_fixed"] = fixed
    runs["fixed-peak"]["littles_law_size"] = littles_law_size(trace, profile)
    runs["request-count"]["target_request_rate"] = rate_target
    return runs
