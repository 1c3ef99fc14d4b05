"""Scrape the signals the policy reads: each replica's /metrics, and the gateway's queue of held requests."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx

from conveyor.autoscale.policy import ReplicaSample
from conveyor.prometheus_text import samples

GAUGES = {"vllm:num_requests_waiting": "waiting", "conveyor_prefill_backlog_tokens": "prefill_backlog_tokens",
          "conveyor_slots_used_ratio": "slots_used_ratio", "vllm:kv_cache_usage_perc": "kv_cache_usage_ratio",
          "vllm:num_requests_running": "running"}
TTFT = "vllm:time_to_first_token_seconds"
FINISHED = "vllm:request_success_total"
QUEUED = "conveyor_gateway_queued_requests"


@dataclass
class Scrape:
    gauges: dict[str, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # upper bound → cumulative count
    finished: float = 0.0


def parse(text: str, model: str | None = None) -> Scrape:
    """The policy's gauges, the TTFT histogram buckets and the finished-request counter, for one model (None:
    summed over models)."""
    out = Scrape()
    for s in samples(text):
        if model is not None and s.labels.get("model_name", model) != model:
            continue
        if s.name in GAUGES:
            out.gauges[GAUGES[s.name]] = out.gauges.get(GAUGES[s.name], 0.0) + s.value
        elif s.name == TTFT + "_bucket":
            le = float(s.labels["le"])
            out.ttft_buckets[le] = out.ttft_buckets.get(le, 0.0) + s.value
        elif s.name == FINISHED:
            out.finished += s.value
    return out


def quantile_between(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile of the observations made between two scrapes of a cumulative histogram, interpolated
    linearly inside the bucket as Prometheus' histogram_quantile does. None when nothing was observed."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    if not bounds or deltas[-1] <= 0:
        return None
    rank = q * deltas[-1]
    lower, below = 0.0, 0.0
    for bound, cum in zip(bounds, deltas):
        if cum >= rank:
            if math.isinf(bound):
                return lower  # beyond the largest finite bucket: report its bound
            return lower + (bound - lower) * (rank - below) / max(cum - below, 1e-12)
        lower, below = bound, cum
    return lower


class SignalScraper:
    """Remembers each replica's previous scrape so the TTFT p95 is over the last interval only. `model` is the
    gateway's model name, for its queue gauge; a replica serves one model (under its upstream name), so its
    metrics are taken whatever their model label."""

    def __init__(self, model: str | None = None, timeout_s: float = 2.0, headers: dict | None = None) -> None:
        self.model = model
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.previous: dict[str, Scrape] = {}

    def replica(self, url: str) -> tuple[ReplicaSample, float] | None:
        """(sample, requests finished since the last scrape); None when the replica can't be scraped."""
        try:
            r = self.client.get(url.rstrip("/") + "/metrics")
            r.raise_for_status()
            now = parse(r.text)
        except (httpx.HTTPError, ValueError):
            return None
        before = self.previous.get(url)
        self.previous[url] = now
        ttft = quantile_between(before.ttft_buckets, now.ttft_buckets, 0.95) if before else None
        finished = max(0.0, now.finished - before.finished) if before else 0.0
        g = now.gauges
        sample = ReplicaSample(waiting=g.get("waiting", 0.0),
                               prefill_backlog_tokens=g.get("prefill_backlog_tokens", 0.0),
                               slots_used_ratio=g.get("slots_used_ratio", 0.0),
                               kv_cache_usage_ratio=g.get("kv_cache_usage_ratio", 0.0),
                               ttft_p95_s=ttft, running=g.get("running", 0.0))
        return sample, finished

    def gateway_queued(self, gateway_url: str) -> float:
        """Requests the gateway holds for this model (waiting for a replica); 0 when unknown."""
        try:
            r = self.client.get(gateway_url.rstrip("/") + "/metrics")
            r.raise_for_status()
        except httpx.HTTPError:
            return 0.0
        try:
            return sum(s.value for s in samples(r.text)
                       if s.name == QUEUED and (self.model is None or s.labels.get("model") == self.model))
        except ValueError:
            return 0.0

    def forget(self, keep: set[str]) -> None:
        self.previous = {u: s for u, s in self.previous.items() if u in keep}

    def close(self) -> None:
        self.client.close()
