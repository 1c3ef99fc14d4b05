"""Traffic traces: a generator (a diurnal curve plus bursts) and the JSONL format `conveyor bench serve` replays
(`{"arrival_s", "prompt_len", "output_len"}` per line; `.gz` is read and written compressed)."""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


MAX_TRACE_S = 1e7  # about 116 days of simulated time
MAX_ARRIVALS = 1e7  # requests a generated trace may hold (a few hundred bytes of memory each)


@dataclass
class TraceConfig:
    """A compressed day: the rate follows a raised cosine from `night_rate` to `peak_rate` (req/s) over
    `duration_s`, with Poisson arrivals. Bursts add `burst_rate` for `burst_s` at random times; burst requests
    are batch jobs with longer outputs (`burst_output_len`), the shift in request size that request counts miss."""
    duration_s: float = 3600.0
    night_rate: float = 2.0
    peak_rate: float = 30.0
    prompt_len: int = 128
    output_len: int = 256
    bursts: int = 6
    burst_rate: float = 15.0
    burst_s: float = 90.0
    burst_output_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not all(map(math.isfinite, (self.duration_s, self.night_rate, self.peak_rate, self.burst_rate,
                                       self.burst_s))):
            raise ValueError("the trace's duration and rates must be finite numbers")
        if self.duration_s <= 0 or not 0 < self.night_rate <= self.peak_rate:
            raise ValueError(f"need duration_s > 0 and 0 < night_rate ({self.night_rate:g}) <= peak_rate "
                             f"({self.peak_rate:g})")
        if self.duration_s > MAX_TRACE_S or self.peak_rate * self.duration_s > MAX_ARRIVALS:
            raise ValueError(f"a trace of {self.duration_s:g} s at up to {self.peak_rate:g} requests/s is too large to "
                             f"simulate (at most {MAX_TRACE_S:g} s and {MAX_ARRIVALS:g} requests)")
        if self.bursts and self.burst_s > 0.6 * self.duration_s:
            raise ValueError(f"duration_s must be at least {self.burst_s / 0.6:g} s: its bursts of {self.burst_s:g} s "
                             f"land in the busy middle 60 % of the day")
        if min(self.prompt_len, self.output_len, self.burst_output_len) < 1 or self.bursts < 0:
            raise ValueError("lengths must be >= 1 and bursts >= 0")
        if self.burst_rate < 0 or self.burst_s <= 0:
            raise ValueError("need burst_rate >= 0 and burst_s > 0")


def diurnal_rate(cfg: TraceConfig, t: np.ndarray) -> np.ndarray:
    phase = (1 - np.cos(2 * math.pi * t / cfg.duration_s)) / 2  # 0 at midnight, 1 at noon
    return cfg.night_rate + (cfg.peak_rate - cfg.night_rate) * phase


def _poisson(rng: np.random.Generator, rate_fn, t0: float, t1: float, peak: float) -> np.ndarray:
    """Arrivals of an inhomogeneous Poisson process by thinning."""
    n = rng.poisson(peak * (t1 - t0))
    t = np.sort(rng.uniform(t0, t1, n))
    return t[rng.uniform(0, peak, n) < rate_fn(t)]


def _lengths(rng: np.random.Generator, mean: int, n: int) -> np.ndarray:
    """Uniform in [mean/4, 7 mean/4]: mean as asked, a wide spread."""
    return np.maximum(1, rng.integers(max(1, mean // 4), mean * 7 // 4 + 1, n))


def generate(cfg: TraceConfig) -> list[TraceRequest]:
    rng = np.random.default_rng(cfg.seed)
    day = _poisson(rng, lambda t: diurnal_rate(cfg, t), 0.0, cfg.duration_s, cfg.peak_rate)
    reqs = list(zip(day, _lengths(rng, cfg.prompt_len, len(day)), _lengths(rng, cfg.output_len, len(day))))
    # bursts land in the busy half of the day, where they hurt
    starts = rng.uniform(0.2 * cfg.duration_s, 0.8 * cfg.duration_s - cfg.burst_s, cfg.bursts)
    for s in starts:
        t = _poisson(rng, lambda x: np.full_like(x, cfg.burst_rate), s, s + cfg.burst_s, cfg.burst_rate)
        reqs += zip(t, _lengths(rng, cfg.prompt_len, len(t)), _lengths(rng, cfg.burst_output_len, len(t)))
    reqs.sort(key=lambda r: r[0])
    return [TraceRequest(round(float(t), 4), int(p), int(o)) for t, p, o in reqs]


def _open(path: str, mode: str):
    return gzip.open(path, mode + "t") if path.endswith(".gz") else open(path, mode)


def save(reqs: list[TraceRequest], path: str) -> None:
    with _open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps({"arrival_s": r.arrival_s, "prompt_len": r.prompt_len,
                                "output_len": r.output_len}) + "\n")


def load(path: str) -> list[TraceRequest]:
    reqs = []
    with _open(path, "r") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                req = TraceRequest(float(d["arrival_s"]), int(d["prompt_len"]), int(d["output_len"]))
            except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
                raise ValueError(f"{path}:{i}: need arrival_s, prompt_len, output_len ({e})") from None
            if not 0 <= req.arrival_s <= MAX_TRACE_S or min(req.prompt_len, req.output_len) < 1:
                raise ValueError(f"{path}:{i}: need 0 <= arrival_s <= {MAX_TRACE_S:g} and prompt_len, output_len "
                                 f">= 1")
            reqs.append(req)
    reqs.sort(key=lambda r: r.arrival_s)
    return reqs
