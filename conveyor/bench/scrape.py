"""Time series of the server's Prometheus gauges, scraped from /metrics while a benchmark runs."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from conveyor.prometheus_text import sum_by_name

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "conveyor_slots_used_ratio",
          "vllm:kv_cache_usage_perc")


@dataclass
class MetricsSeries:
    """t: seconds since the start of the run; values[name][i] is None where a scrape lacked the gauge."""
    t: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=lambda: {g: [] for g in GAUGES})
    failed_scrapes: int = 0

    def add(self, t: float, sample: dict[str, float]) -> None:
        self.t.append(t)
        for name, column in self.values.items():
            column.append(sample.get(name))

    def to_json(self) -> dict:
        return {"t": [round(x, 3) for x in self.t], **self.values, "failed_scrapes": self.failed_scrapes}


def parse_gauges(text: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """The named gauges from Prometheus text, each summed over its label sets (one per model)."""
    return sum_by_name(text, names)


async def scrape_once(client: httpx.AsyncClient, url: str, series: MetricsSeries, t0: float) -> None:
    try:
        r = await client.get(url, timeout=5.0)
        r.raise_for_status()
        sample = parse_gauges(r.text)
    except Exception:  # a server without /metrics (or a bad scrape) must never stop the benchmark
        series.failed_scrapes += 1
        return
    series.add(time.perf_counter() - t0, sample)


async def scrape_until(client: httpx.AsyncClient, url: str, series: MetricsSeries, t0: float,
                       stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """Scrape at once, then every interval until `stop` is set, then one last time."""
    while not stop.is_set():
        await scrape_once(client, url, series, t0)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass
    await scrape_once(client, url, series, t0)
