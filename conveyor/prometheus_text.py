"""Reading Prometheus' text format (a replica's or a gateway's /metrics). The one parser behind the gateway's
replica picker, the autoscaler's signals and the benchmark's scraper: prometheus_client's own."""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str) -> list[Sample]:
    """Every sample in `text` (histograms as their _bucket/_sum/_count samples). Raises ValueError when the text
    is not valid exposition format."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sum_by_name(text: str, names: Iterable[str]) -> dict[str, float]:
    """The samples named in `names`, each summed over its label sets (one per model, say); absent names are left
    out. Raises ValueError on malformed text."""
    wanted, out = set(names), {}
    for s in samples(text):
        if s.name in wanted:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out
