"""Per-request records and the arithmetic of a benchmark summary: TTFT, TPOT, ITL, E2EL, throughput, goodput."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds, `start_s` from the start of the run."""
    index: int
    prompt_len: int  # tokens sent
    output_len: int  # tokens asked for (max_tokens)
    arrival_s: float = 0.0  # when the workload scheduled it; start_s can be later (concurrency cap, event loop)
    start_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None  # end-to-end: send to end of stream
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    output_tokens: int = 0  # the server's usage.completion_tokens, else the number of content chunks
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens when it reports it
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (latency − TTFT) / (output tokens − 1)."""
        if self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + (self.latency_s or 0.0)

    def token_times(self) -> list[float]:
        """Arrival time of each content chunk since the start of the run."""
        if self.ttft_s is None:
            return []
        return [float(t) for t in self.start_s + self.ttft_s + np.cumsum([0.0, *self.itl_s])]

    def to_json(self) -> dict:
        ms = lambda x: None if x is None else round(x * 1e3, 3)  # noqa: E731
        return {"index": self.index, "arrival_s": round(self.arrival_s, 6), "start_s": round(self.start_s, 6),
                "prompt_len": self.prompt_len, "output_len": self.output_len, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "ttft_ms": ms(self.ttft_s), "tpot_ms": ms(self.tpot_s),
                "e2el_ms": ms(self.latency_s), "itl_ms": [ms(x) for x in self.itl_s], "error": self.error}


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50, p95, p99 (numpy's linear interpolation) and max, in milliseconds; None when empty."""
    if not values_s:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    xs = np.asarray(values_s, dtype=float) * 1e3
    p50, p95, p99 = np.percentile(xs, [50, 95, 99])
    return {"mean": float(xs.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(xs.max())}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] → {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad goodput SLO {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not slos[key] > 0:
            raise ValueError(f"bad goodput SLO {item!r}: must be > 0")
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """A one-token output has no TPOT and meets any TPOT SLO."""
    if not r.ok:
        return False
    measured = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.latency_s}
    return all(measured[k] is not None and measured[k] * 1e3 <= v for k, v in slos.items())


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once (a request ending at t no longer counts for one starting at t)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    peak = live = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def throughput_series(records: list[RequestRecord], duration_s: float, bucket_s: float = 1.0) -> list[float]:
    """Output tokens/s in consecutive buckets of the run (the last one may be shorter). Each content chunk counts
    one token; tokens the server reported beyond the chunks (several tokens in one chunk) count at the last chunk."""
    n = max(1, math.ceil(duration_s / bucket_s))
    counts = [0.0] * n
    for r in records:
        if not r.ok:
            continue
        times = r.token_times()
        for i, t in enumerate(times):
            extra = max(0, r.output_tokens - len(times)) if i == len(times) - 1 else 0
            counts[min(n - 1, int(t // bucket_s))] += 1 + extra
    last_width = duration_s - (n - 1) * bucket_s  # the last bucket is cut short where the run ended
    return [c / (last_width if i == n - 1 and 0 < last_width < bucket_s else bucket_s) for i, c in enumerate(counts)]


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """The stable-key summary of a run (duration: start of the run to the end of its last request)."""
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(meets_slos(r, slos) for r in ok) if slos else None
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "goodput": None if good is None else good / duration,
        "goodput_slos_ms": dict(slos or {}),
        "peak_concurrency": peak_concurrency(records),
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl_s]),
        "e2el_ms": stats_ms([r.latency_s for r in ok if r.latency_s is not None]),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
    }
