"""The scaling policy: per-replica LLM signals → desired replica count. Pure: state in, (decision, state) out.

Each signal is target-tracked on its own (the signal asking for the most replicas wins), like Kubernetes' HPA with
several metrics. Recommendations are stabilized the HPA way: scaling up takes the smallest recommendation of the
up window, scaling down the largest of the (longer) down window, so a dip must last the whole window before
replicas go. A sudden burst (a recommendation of `panic_threshold` x the ready replicas) enters panic mode, as in
Knative's KPA: scale up at once, never down, until the burst has been over for `panic_window_s`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# signal name → PolicyConfig attribute holding its target; order breaks ties in the reason
SIGNALS = {"waiting": "target_waiting", "prefill_backlog_tokens": "target_prefill_backlog_tokens",
           "slots_used_ratio": "target_slots_used_ratio", "kv_cache_usage_ratio": "target_kv_cache_usage_ratio",
           "ttft_p95_s": "target_ttft_p95_s", "request_rate": "target_request_rate"}


@dataclass(frozen=True)
class ReplicaSample:
    """One ready replica's scrape. `ttft_p95_s` is over the last scrape interval (None: no first token in it)."""
    waiting: float = 0.0
    prefill_backlog_tokens: float = 0.0
    slots_used_ratio: float = 0.0
    kv_cache_usage_ratio: float = 0.0
    ttft_p95_s: float | None = None
    running: float = 0.0


@dataclass(frozen=True)
class Observation:
    """now: seconds on any monotonic clock; current: replicas the actuator holds, starting ones included;
    samples: the ready ones; queued: requests held by the gateway (no replica); request_rate: arrivals/s."""
    now: float
    current: int
    samples: tuple[ReplicaSample, ...] = ()
    queued: float = 0.0
    request_rate: float = 0.0

    @property
    def busy(self) -> bool:
        return self.queued > 0 or self.request_rate > 0 or any(s.running + s.waiting > 0 for s in self.samples)


@dataclass
class PolicyConfig:
    """Targets are per replica; None disables a signal. See docs/architecture.md for how the defaults were chosen."""
    min_replicas: int = 1
    max_replicas: int = 8
    target_waiting: float | None = 2.0
    target_prefill_backlog_tokens: float | None = 2048.0
    target_slots_used_ratio: float | None = 0.6
    target_kv_cache_usage_ratio: float | None = 0.8
    target_ttft_p95_s: float | None = 0.5
    target_request_rate: float | None = None
    tolerance: float = 0.1
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 120.0
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 30.0
    scale_down_max_ratio: float = 0.5  # most of the current replicas one scale-down removes (at least one)
    scale_up_max_ratio: float = 2.0  # one scale-up at most multiplies the replicas by this, or adds 4 (HPA's)
    panic_threshold: float = 2.0
    panic_window_s: float = 60.0
    scale_to_zero_after_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        targets = {name: getattr(self, attr) for name, attr in SIGNALS.items()}
        if all(t is None for t in targets.values()):
            raise ValueError("at least one signal needs a target")
        for name, t in targets.items():
            if t is not None and not t > 0:
                raise ValueError(f"target for {name} must be > 0")
        for ratio in ("target_slots_used_ratio", "target_kv_cache_usage_ratio"):
            if getattr(self, ratio) is not None and getattr(self, ratio) > 1:
                raise ValueError(f"{ratio} must be in (0, 1]")
        if not 0 <= self.tolerance < 1:
            raise ValueError("tolerance must be in [0, 1)")
        for name in ("scale_up_window_s", "scale_down_window_s", "scale_up_cooldown_s", "scale_down_cooldown_s",
                     "panic_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.scale_up_max_ratio <= 1:
            raise ValueError("scale_up_max_ratio must be > 1")
        if not 0 < self.scale_down_max_ratio <= 1:
            raise ValueError("scale_down_max_ratio must be in (0, 1]")
        if self.panic_threshold <= 1:
            raise ValueError("panic_threshold must be > 1")
        if self.scale_to_zero_after_s is not None:
            if self.min_replicas != 0:
                raise ValueError("scale_to_zero_after_s needs min_replicas 0")
            if self.scale_to_zero_after_s < 0:
                raise ValueError("scale_to_zero_after_s must be >= 0")

    @property
    def targets(self) -> dict[str, float]:
        return {name: getattr(self, attr) for name, attr in SIGNALS.items() if getattr(self, attr) is not None}


@dataclass(frozen=True)
class PolicyState:
    history: tuple[tuple[float, int], ...] = ()  # (time, raw recommendation), newest last
    last_scale_up: float = -math.inf
    last_scale_down: float = -math.inf
    panic_until: float = -math.inf
    last_busy: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    signal: str  # the signal that asked for the most replicas ("none" when idle)
    raw: int  # that signal's recommendation, before stabilization, cooldowns and bounds
    panic: bool
    recommendations: dict[str, int] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


def signal_values(obs: Observation) -> dict[str, float | None]:
    """Fleet totals of the load signals; TTFT is the mean of the replicas' p95s; gateway-held requests count
    as waiting."""
    s = obs.samples
    ttfts = [x.ttft_p95_s for x in s if x.ttft_p95_s is not None]
    return {"waiting": sum(x.waiting for x in s) + obs.queued,
            "prefill_backlog_tokens": sum(x.prefill_backlog_tokens for x in s),
            "slots_used_ratio": sum(x.slots_used_ratio for x in s),
            "kv_cache_usage_ratio": sum(x.kv_cache_usage_ratio for x in s),
            "ttft_p95_s": sum(ttfts) / len(ttfts) if ttfts else None,
            "request_rate": obs.request_rate}


def recommend(value: float | None, target: float, name: str, obs: Observation, tolerance: float) -> int:
    """Replicas that bring this signal to its target. Totals: total / target. TTFT is a latency, not a load:
    ready replicas x p95 / target. Within the tolerance band of the current count: the current count."""
    if value is None:
        return 0
    if name == "ttft_p95_s":
        want = len(obs.samples) * value / target
    else:
        want = value / target
    if obs.current > 0 and abs(want / obs.current - 1) <= tolerance:
        return obs.current
    return math.ceil(want - 1e-9)


def decide(cfg: PolicyConfig, state: PolicyState, obs: Observation) -> tuple[Decision, PolicyState]:
    values = signal_values(obs)
    recs = {name: recommend(values[name], t, name, obs, cfg.tolerance) for name, t in cfg.targets.items()}
    signal = max(recs, key=lambda k: recs[k])  # first of equals, in SIGNALS order
    raw = recs[signal]
    last_busy = obs.now if obs.busy or state.last_busy is None else state.last_busy
    # a fresh (or restarted) controller counts the fleet it finds as recommended just before, so its first
    # quiet sample can't shrink the fleet past the down window
    seed = ((obs.now - 1e-6, obs.current),) if state.last_busy is None else ()
    state = replace(state, last_busy=last_busy,
                    history=_trim(seed + state.history + ((obs.now, raw),), obs.now, cfg))
    ready = len(obs.samples)
    if raw >= cfg.panic_threshold * max(ready, 1) and raw > obs.current:
        state = replace(state, panic_until=obs.now + cfg.panic_window_s)
    panic = obs.now < state.panic_until
    desired, why = _stabilize(cfg, state, obs, raw, panic)
    desired, why = _bounds(cfg, state, obs, desired, why)
    if desired > obs.current:
        state = replace(state, last_scale_up=obs.now)
    elif desired < obs.current:
        state = replace(state, last_scale_down=obs.now)
    reason = f"{why}; {signal}={_fmt(values[signal])} asks {raw}" + (" [panic]" if panic else "")
    shown = {k: round(v, 4) for k, v in values.items() if v is not None}
    return Decision(desired, reason, signal if raw > 0 else "none", raw, panic, recs, shown), state


def _trim(history: tuple, now: float, cfg: PolicyConfig) -> tuple:
    keep = max(cfg.scale_up_window_s, cfg.scale_down_window_s)
    return tuple((t, n) for t, n in history if now - t <= keep)


def _window(history: tuple, now: float, width: float) -> list[int]:
    return [n for t, n in history if now - t <= width]


def _stabilize(cfg: PolicyConfig, state: PolicyState, obs: Observation, raw: int, panic: bool) -> tuple[int, str]:
    cur, now = obs.current, obs.now
    if raw > cur:
        # a queue that built up in seconds asks for more replicas than the load needs once it is served
        cap = max(cur + 4, math.ceil(cur * cfg.scale_up_max_ratio))
        if panic:
            return min(raw, cap), "panic: scale up now"
        if now - state.last_scale_up < cfg.scale_up_cooldown_s:
            return cur, "scale-up cooldown"
        up = min(cap, max(cur, min(_window(state.history, now, cfg.scale_up_window_s))))
        return up, "scale up" if up > cur else "scale-up window holds"
    if raw < cur:
        if panic:
            return cur, "panic: no scale-down"
        if now - max(state.last_scale_up, state.last_scale_down) < cfg.scale_down_cooldown_s:
            return cur, "scale-down cooldown"
        down = min(cur, max(_window(state.history, now, cfg.scale_down_window_s)))
        # signals are not linear in the replica count (fewer replicas: more concurrency each, slower tokens,
        # longer-lived requests), so a large cut is taken in steps that each see the load it leaves
        down = max(down, cur - max(1, math.floor(cur * cfg.scale_down_max_ratio)))
        return down, "scale down" if down < cur else "scale-down window holds"
    return cur, "steady"


def _bounds(cfg: PolicyConfig, state: PolicyState, obs: Observation, desired: int, why: str) -> tuple[int, str]:
    floor = max(cfg.min_replicas, 1)
    if cfg.min_replicas == 0:
        if obs.busy and obs.current == 0:
            return max(1, min(desired, cfg.max_replicas)), "activation: requests waiting for a replica"
        idle_for = obs.now - state.last_busy
        if cfg.scale_to_zero_after_s is not None and idle_for >= cfg.scale_to_zero_after_s:
            return 0, f"idle for {idle_for:.0f}s: scale to zero"
        if obs.current == 0:
            return 0, "idle"
    if desired < floor:
        return floor, why + f" (min {floor})"
    if desired > cfg.max_replicas:
        return cfg.max_replicas, why + f" (max {cfg.max_replicas})"
    return desired, why


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
