"""Prometheus metrics (prefix conveyor_, label: model only), updated from the engine thread after every step."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from conveyor.engine.engine import Engine
from conveyor.outputs import RequestOutput

disable_created_metrics()  # no *_created series: they double the exposition for no use here

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, model: str, max_num_seqs: int) -> None:
        self.registry = CollectorRegistry()
        self.max_num_seqs = max_num_seqs
        r, lbl = self.registry, ["model"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"conveyor_{name}", doc, lbl, registry=r).labels(model)

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"conveyor_{name}", doc, lbl, buckets=buckets, registry=r).labels(model)

        self.running = gauge("requests_running", "Sequences in the running batch")
        self.waiting = gauge("requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Share of KV cache blocks in use")
        self.slots_used = gauge("slots_used_ratio", "Running sequences / max_num_seqs")
        self.prefill_backlog = gauge("prefill_backlog_tokens", "Prompt tokens waiting to be prefilled")
        self.prompt_tokens = Counter("conveyor_prompt_tokens", "Prompt tokens of finished requests", lbl,
                                     registry=r).labels(model)
        self.generation_tokens = Counter("conveyor_generation_tokens", "Generated tokens", lbl,
                                         registry=r).labels(model)
        preempt = Counter("conveyor_preemptions", "Sequences preempted, by mode", ["model", "mode"], registry=r)
        self.preempt_recompute, self.preempt_swap = preempt.labels(model, "recompute"), preempt.labels(model, "swap")
        self.swapped_out = Counter("conveyor_kv_blocks_swapped_out", "KV blocks copied to host memory", lbl,
                                   registry=r).labels(model)
        self.swapped_in = Counter("conveyor_kv_blocks_swapped_in", "KV blocks copied back from host memory", lbl,
                                  registry=r).labels(model)
        self.prefix_queries = Counter("conveyor_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      lbl, registry=r).labels(model)
        self.prefix_hits = Counter("conveyor_prefix_cache_hits", "Prompt tokens found in the prefix cache", lbl,
                                   registry=r).labels(model)
        self.requests = Counter("conveyor_requests", "Finished requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.model = model
        self.ttft = hist("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens", _ITL_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Mean time per output token after the first",
                         _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduled", _LATENCY_BUCKETS)
        self.batch_size = hist("batch_size", "Sequences per engine step", _BATCH_BUCKETS)
        self._last_token_time: dict[str, float] = {}
        self._counters = {"num_preemptions_recompute": self.preempt_recompute,
                          "num_preemptions_swap": self.preempt_swap, "prefix_cache_queries": self.prefix_queries,
                          "prefix_cache_hits": self.prefix_hits, "blocks_swapped_out": self.swapped_out,
                          "blocks_swapped_in": self.swapped_in}
        self._seen = dict.fromkeys(self._counters, 0)

    def on_step(self, engine: Engine, outs: list[RequestOutput], step_time: float | None) -> None:
        """After an engine step (step_time None: only aborts were applied)."""
        now = time.monotonic()
        stats = self._set_gauges(engine)
        for key, counter in self._counters.items():
            if stats[key] > self._seen[key]:  # the engine counts; Prometheus counters take the increments
                counter.inc(stats[key] - self._seen[key])
                self._seen[key] = stats[key]
        if step_time is not None and engine.last_step_num_seqs:
            self.batch_size.observe(engine.last_step_num_seqs)
        for out in outs:
            self._observe(out, now)

    def _observe(self, out: RequestOutput, now: float) -> None:
        new = sum(c.num_new_tokens for c in out.outputs)
        if new:
            self.generation_tokens.inc(new)
            last = self._last_token_time.get(out.request_id)
            if last is None:
                self.ttft.observe(out.metrics.get("ttft_s", 0.0))
            else:
                self.itl.observe(now - last)
            self._last_token_time[out.request_id] = now
        if out.finished:
            self._last_token_time.pop(out.request_id, None)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            m = out.metrics
            self.e2e.observe(m.get("e2e_s", 0.0))
            if "queue_s" in m:
                self.queue_time.observe(m["queue_s"])
            n_out = max((len(c.token_ids) for c in out.outputs), default=0)  # none: beams aborted or failed early
            if n_out > 1 and "ttft_s" in m:
                self.tpot.observe((m["e2e_s"] - m["ttft_s"]) / (n_out - 1))
            for reason in [c.finish_reason for c in out.outputs] or ["error" if out.error else "abort"]:
                self.requests.labels(self.model, reason or "abort").inc()

    def refresh_idle(self, engine: Engine) -> None:
        """Gauges are set after each step; an idle engine takes no steps, so refresh them at scrape time."""
        if not engine.has_unfinished_requests():
            self._set_gauges(engine)

    def _set_gauges(self, engine: Engine) -> dict:
        stats = engine.stats()
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.slots_used.set(stats["num_running"] / self.max_num_seqs)
        self.prefill_backlog.set(stats["prefill_backlog_tokens"])
        return stats
