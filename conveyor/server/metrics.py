"""Prometheus metrics of `conveyor serve`, updated from the engine thread after every step.

Series that vLLM also exports carry vLLM's names, types, buckets, units and labels (`model_name`, the first served
name, and `engine="0"`), so that vLLM's Grafana dashboards, KEDA rules written for vLLM and the Gateway API Inference
Extension's endpoint picker read a Conveyor replica unchanged (vLLM's vllm/v1/metrics/loggers.py is the reference).
Series only Conveyor has keep the `conveyor_` prefix and the `model_name` label."""
from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from conveyor.engine.engine import Engine
from conveyor.engine.sequence import Sequence
from conveyor.outputs import RequestOutput

disable_created_metrics()  # no *_created series: they double the exposition for no use here

# vLLM's buckets, so that dashboards' `le` thresholds and quantiles line up
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FINISHED_REASONS = ("stop", "length", "abort", "error")  # vLLM's FinishReason values, created at 0
SPEC_PER_POS = "spec_decode_num_accepted_tokens_per_pos"  # Engine.stats(): a list, one count per position


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value inclusive: vLLM's buckets for token counts (max_value:
    max_model_len)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


def cache_config_info(engine: Engine) -> dict[str, str]:
    """The labels of `vllm:cache_config_info`, under vLLM's CacheConfig field names (values as Python's str(),
    as vLLM writes them); the endpoint picker reads block_size and num_gpu_blocks (the device's KV blocks, on CPU
    too)."""
    c = engine.config.cache
    return {"block_size": str(c.block_size), "num_gpu_blocks": str(engine.kv.pool.num_blocks),
            "num_cpu_blocks": str(engine.runner.num_host_blocks), "enable_prefix_caching": str(c.enable_prefix_caching),
            "gpu_memory_utilization": str(c.gpu_memory_utilization), "swap_space": str(c.swap_space),
            "cache_dtype": "auto"}


def num_requests(seqs: Iterable[Sequence]) -> int:
    """Requests among seqs (the n samples or beams of one request are one request, as vLLM counts). The copy is
    taken in one step: a scrape may read the scheduler's queues while the engine thread changes them."""
    return len({s.request_id for s in list(seqs)})


class ServerMetrics:
    """`model` is the label value (vLLM: the first served model name). `cache_info` fills vllm:cache_config_info.
    `num_speculative_tokens` (None: no speculative decoding) adds vLLM's vllm:spec_decode_* counters.
    Engine counters are cumulative; the increments since the last step go to the Prometheus counters."""

    def __init__(self, model: str, max_num_seqs: int, max_model_len: int = 2048,
                 cache_info: dict[str, str] | None = None, num_speculative_tokens: int | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.model, self.max_num_seqs = model, max_num_seqs
        vllm, own = ("model_name", "engine"), ("model_name",)
        vals = {"model_name": model, "engine": "0"}

        def metric(cls, name: str, doc: str, **kw):
            labels = vllm if name.startswith("vllm:") else own
            return cls(name, doc, labels, registry=r, **kw).labels(*(vals[k] for k in labels))

        def hist(name: str, doc: str, buckets) -> Histogram:
            return metric(Histogram, name, doc, buckets=buckets)

        # scheduler state (requests, not sequences)
        self.running = metric(Gauge, "vllm:num_requests_running",
                              "Requests with at least one sequence in the running batch.")
        self.waiting = metric(Gauge, "vllm:num_requests_waiting",
                              "Requests queued for their first (or next, after preemption) step.")
        self.swapped = metric(Gauge, "vllm:num_requests_swapped",
                              "Requests whose KV blocks are swapped out to host memory.")
        self.kv_usage = metric(Gauge, "vllm:kv_cache_usage_perc", "Share of the KV cache blocks in use, from 0 to 1.")
        self.gpu_kv_usage = metric(Gauge, "vllm:gpu_cache_usage_perc",
                                   "Share of the KV cache blocks in use, from 0 to 1: the older name of "
                                   "vllm:kv_cache_usage_perc (same value).")
        # counters
        self.prompt_tokens = metric(Counter, "vllm:prompt_tokens",
                                    "Prompt tokens of requests whose prefill has finished.")
        self.generation_tokens = metric(Counter, "vllm:generation_tokens",
                                        "Tokens generated, over every sequence of every request.")
        self.preemptions = metric(Counter, "vllm:num_preemptions",
                                  "Sequences preempted (recompute or swap) since start.")
        self.prefix_queries = metric(Counter, "vllm:prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = metric(Counter, "vllm:prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache.")
        success = Counter("vllm:request_success", "Requests finished, by the reason they ended.",
                          [*vllm, "finished_reason"], registry=r)
        self.finished = {reason: success.labels(model, "0", reason) for reason in FINISHED_REASONS}
        # histograms
        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Seconds from a request's arrival to its first output token.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Seconds between consecutive output tokens of a sequence.",
                        TOKEN_LATENCY_BUCKETS)
        self.tpot_legacy = hist("vllm:time_per_output_token_seconds",
                                "Seconds between consecutive output tokens of a sequence (the older name of "
                                "vllm:inter_token_latency_seconds, same observations).", TOKEN_LATENCY_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Each request's mean seconds per output token after its first.",
                         TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Seconds from a request's arrival to its end.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Seconds a request waited before it was first scheduled.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds",
                                   "Seconds from a request's first scheduling to its end.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Seconds from a request's first scheduling to its first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds",
                                "Seconds from a request's first token to its end.", REQUEST_LATENCY_BUCKETS)
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                          token_buckets)
        self.request_generation_tokens = hist("vllm:request_generation_tokens",
                                              "Generated tokens per finished request (every sample).", token_buckets)
        self.request_max_generation_tokens = hist("vllm:request_max_num_generation_tokens",
                                                  "The most tokens one sample of a finished request generated.",
                                                  token_buckets)
        self.iteration_tokens = hist("vllm:iteration_tokens_total",
                                     "Tokens per engine step: generated plus finished prompts.",
                                     ITERATION_TOKEN_BUCKETS)
        # info gauges: vLLM's label sets, value 1 / the time of the last update
        Gauge("vllm:cache_config_info",
              "The KV cache configuration, as labels (value 1).", [*(cache_info or {}), "engine"],
              registry=r).labels(**(cache_info or {}), engine="0").set(1)
        self.lora_info = Gauge("vllm:lora_requests_info", "LoRA adapters in use (none: Conveyor serves no adapters).",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                               registry=r).labels("0", "", "")
        # Conveyor's own
        self.slots_used = metric(Gauge, "conveyor_slots_used_ratio", "Running sequences / max_num_seqs")
        self.prefill_backlog = metric(Gauge, "conveyor_prefill_backlog_tokens", "Prompt tokens waiting to be prefilled")
        self.kv_waste = metric(Gauge, "conveyor_kv_cache_waste_ratio",
                               "Share of reserved KV slots holding no token, averaged over the steps so far")
        preempt = Counter("conveyor_preemptions_by_mode", "Sequences preempted, by mode", [*own, "mode"], registry=r)
        swapped_out = metric(Counter, "conveyor_kv_blocks_swapped_out", "KV blocks copied to host memory")
        swapped_in = metric(Counter, "conveyor_kv_blocks_swapped_in", "KV blocks copied back from host memory")
        self.batch_size = hist("conveyor_batch_size", "Sequences per engine step", _BATCH_BUCKETS)
        self._last_token_time: dict[str, float] = {}
        self._generated: dict[str, int] = {}  # num_generated_tokens counted so far, per running request
        self._counters = {"num_preemptions": self.preemptions, "prefix_cache_queries": self.prefix_queries,
                          "prefix_cache_hits": self.prefix_hits, "blocks_swapped_out": swapped_out,
                          "blocks_swapped_in": swapped_in,
                          "num_preemptions_recompute": preempt.labels(model, "recompute"),
                          "num_preemptions_swap": preempt.labels(model, "swap")}
        self._seen: dict[str | tuple[str, int], int] = dict.fromkeys(self._counters, 0)
        self._spec_counters: dict[str, Counter] = {}
        self._spec_per_pos: list[Counter] = []
        if num_speculative_tokens:
            self._add_spec_decode(num_speculative_tokens)

    def _add_spec_decode(self, k: int) -> None:
        """vLLM's speculative decoding counters; per position 0..k-1 with the label `position`."""
        labels, vals = ("model_name", "engine"), (self.model, "0")
        for key, doc in (("spec_decode_num_drafts", "Sequence-steps in which at least one proposed token was "
                                                    "verified by the target model."),
                         ("spec_decode_num_draft_tokens", "Proposed tokens verified by the target model."),
                         ("spec_decode_num_accepted_tokens", "Proposed tokens the target model accepted.")):
            self._spec_counters[key] = Counter(f"vllm:{key}", doc, labels, registry=self.registry).labels(*vals)
        per_pos = Counter(f"vllm:{SPEC_PER_POS}", "Proposed tokens accepted, by their position in the proposal "
                                                  "(0 is the first proposed token).",
                          [*labels, "position"], registry=self.registry)
        self._spec_per_pos = [per_pos.labels(*vals, str(i)) for i in range(k)]

    @classmethod
    def for_engine(cls, engine: Engine, model: str) -> ServerMetrics:
        spec = engine.config.speculative
        return cls(model, engine.config.scheduler.max_num_seqs, engine.max_model_len, cache_config_info(engine),
                   spec.num_speculative_tokens if spec else None)

    def on_step(self, engine: Engine, outs: list[RequestOutput], step_time: float | None) -> None:
        """After an engine step (step_time None: only aborts were applied)."""
        now = time.monotonic()
        stats = self._set_gauges(engine)
        for key, counter in self._counters.items():
            self._advance(key, counter, stats[key])
        self._advance_spec_decode(stats)
        if step_time is not None and engine.last_step_num_seqs:
            self.batch_size.observe(engine.last_step_num_seqs)
        tokens = sum(self._observe(out, now) for out in outs)
        if step_time is not None and engine.last_step_num_seqs:
            self.iteration_tokens.observe(tokens)

    def _advance(self, key: str | tuple[str, int], counter: Counter, total: int) -> None:
        """Add to counter what the engine's cumulative count `total` (under key) grew by since the last step."""
        seen = self._seen.get(key, 0)
        if total > seen:
            counter.inc(total - seen)
            self._seen[key] = total

    def _advance_spec_decode(self, stats: dict) -> None:
        """The vllm:spec_decode_* counters, from Engine.stats() (the keys are there once the engine speculates)."""
        for key, counter in self._spec_counters.items():
            if key in stats:
                self._advance(key, counter, stats[key])
        for i, (counter, total) in enumerate(zip(self._spec_per_pos, stats.get(SPEC_PER_POS, ()))):
            self._advance((SPEC_PER_POS, i), counter, total)

    def _observe(self, out: RequestOutput, now: float) -> int:
        """Record one output; returns its tokens as vLLM's iteration count has them: the generated ones, plus the
        prompt's when this is the request's first token (its prefill is then done). vllm:generation_tokens counts
        every generated token, best_of's candidates not returned too (num_generated_tokens)."""
        new = sum(c.num_new_tokens for c in out.outputs)
        seen = self._generated.get(out.request_id, 0)
        self._generated[out.request_id] = max(seen, out.num_generated_tokens)
        self.generation_tokens.inc(max(0, out.num_generated_tokens - seen))
        counted = new
        if new:
            last = self._last_token_time.get(out.request_id)
            if last is None:
                counted += len(out.prompt_token_ids)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                if "ttft_s" in out.metrics:  # beam search reports no first token
                    self.ttft.observe(out.metrics["ttft_s"])
            else:
                self.itl.observe(now - last)
                self.tpot_legacy.observe(now - last)
            self._last_token_time[out.request_id] = now
        if out.finished:
            self._last_token_time.pop(out.request_id, None)
            self._generated.pop(out.request_id, None)
            self._observe_finished(out)
        return counted

    def _observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        n_out = [len(c.token_ids) for c in out.outputs]  # none: beams aborted or failed early
        self.finished[finished_reason(out)].inc()
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(max(out.num_generated_tokens, sum(n_out)))
        if n_out:
            self.request_max_generation_tokens.observe(max(n_out))
        if "queue_s" in m:
            self.queue_time.observe(m["queue_s"])
        if "e2e_s" not in m:  # ended outside a step before it was ever seen (a failed batch)
            return
        self.e2e.observe(m["e2e_s"])
        if "queue_s" in m:
            self.inference_time.observe(m["e2e_s"] - m["queue_s"])
        if "ttft_s" in m and "queue_s" in m:  # the phases: queue, prefill (to the first token), decode
            self.prefill_time.observe(m["ttft_s"] - m["queue_s"])
            self.decode_time.observe(m["e2e_s"] - m["ttft_s"])
            if max(n_out, default=0) > 1:
                self.tpot.observe((m["e2e_s"] - m["ttft_s"]) / (max(n_out) - 1))

    def refresh_idle(self, engine: Engine) -> None:
        """Gauges are set after each step; an idle engine takes no steps, so refresh them at scrape time."""
        if not engine.has_unfinished_requests():
            self._set_gauges(engine)

    def _set_gauges(self, engine: Engine) -> dict:
        stats, sched = engine.stats(), engine.scheduler
        self.running.set(num_requests(sched.running))
        self.waiting.set(num_requests(sched.waiting))
        self.swapped.set(num_requests(sched.swapped))
        self.kv_usage.set(stats["kv_cache_usage"])
        self.gpu_kv_usage.set(stats["kv_cache_usage"])
        self.slots_used.set(stats["num_running"] / self.max_num_seqs)
        self.prefill_backlog.set(stats["prefill_backlog_tokens"])
        self.kv_waste.set(stats["kv_waste_ratio"])
        self.lora_info.set(time.time())  # vLLM's value: when the adapter lists were last updated
        return stats


def finished_reason(out: RequestOutput) -> str:
    """One reason per request (its n samples or beams may differ): error, then abort, then length (a sample was
    cut off), else stop."""
    reasons = {c.finish_reason for c in out.outputs}
    if out.error or "error" in reasons:
        return "error"
    if not out.outputs or None in reasons or "abort" in reasons:
        return "abort"
    return "length" if "length" in reasons else "stop"
