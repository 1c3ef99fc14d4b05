"""A replica's measured performance (bench/autoscale_profile.py), as functions of its concurrency."""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "demo.json"


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through the points; flat beyond the ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class Profile:
    """concurrency[i] → ttft_s[i] (p50, closed loop: prefill with that many sequences in the batch, no queueing)
    and tpot_s[i] (p50). Prefill time scales with prompt length from the measured mean."""
    max_num_seqs: int
    startup_s: float
    concurrency: list[float]
    ttft_s: list[float]
    tpot_s: list[float]
    prompt_tokens: float
    kv_capacity_tokens: int

    def __post_init__(self) -> None:
        if not self.concurrency or not (len(self.concurrency) == len(self.ttft_s) == len(self.tpot_s)):
            raise ValueError("profile needs matching, non-empty concurrency / ttft / tpot points")
        if self.concurrency != sorted(self.concurrency) or len(set(self.concurrency)) != len(self.concurrency):
            raise ValueError("profile concurrencies must be increasing")
        if self.max_num_seqs < 1 or self.startup_s < 0 or self.prompt_tokens <= 0 or self.kv_capacity_tokens < 1:
            raise ValueError("bad profile: max_num_seqs, startup_s, prompt_tokens or kv_capacity_tokens")
        if min(self.ttft_s + self.tpot_s) <= 0:
            raise ValueError("profile latencies must be > 0")

    def tpot(self, c: float) -> float:
        return interpolate(self.concurrency, self.tpot_s, c)

    def prefill(self, c: float, prompt_tokens: int) -> float:
        return interpolate(self.concurrency, self.ttft_s, c) * prompt_tokens / self.prompt_tokens

    def e2e(self, c: float, prompt_tokens: float, output_tokens: float) -> float:
        return self.prefill(c, prompt_tokens) + max(0.0, output_tokens - 1) * self.tpot(c)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PROFILE) -> "Profile":
        with open(path) as f:
            d = json.load(f)
        pts = sorted(d["points"], key=lambda p: p["concurrency"])
        prompt = sum(p["mean_prompt_tokens"] for p in pts) / len(pts)
        return cls(d["max_num_seqs"], d["startup_s"], [p["concurrency"] for p in pts],
                   [p["ttft_ms_p50"] / 1e3 for p in pts], [p["tpot_ms_p50"] / 1e3 for p in pts], prompt,
                   d["kv_capacity_tokens"])
