"""Gateway metrics (prefix conveyor_gateway_). Labels: model, tenant class, status, reason, replica state, and the
configured tenant name on the usage counter only (served to admin scrapes only) — never API keys or request ids.

With `conveyor gateway --workers N` each worker process writes its series to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when prometheus_client is first imported) and a scrape of any worker
renders all of them merged: counters and histograms summed over the workers (a dead worker's included), gauges by
their multiprocess_mode over the living workers — what requests hold is summed, the event-loop lag is the worst
worker's, and views every worker has of the same thing (replica states, the shared batch store) are the most recent
write. Gauges set from process state are refreshed every REFRESH_S by each worker (see Gateway._refresh_loop)."""
from __future__ import annotations

import glob
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_SUM, _MAX, _LATEST = "livesum", "livemax", "livemostrecent"  # gauges' multiprocess_mode
REFRESH_S = 1.0
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "conveyor_gateway_"
        self.requests = Counter(p + "requests", "Finished requests by status", ["model", "tenant_class", "status"],
                                registry=r)
        self.rejections = Counter(p + "rejections", "Requests refused by the gateway, by reason",
                                  ["model", "tenant_class", "reason"], registry=r)
        self.queue_time = Histogram(p + "queue_time_seconds", "Time in the dispatch queue",
                                    ["model", "tenant_class"], buckets=_BUCKETS, registry=r)
        self.upstream_latency = Histogram(p + "upstream_latency_seconds", "Dispatch to the end of the upstream "
                                          "response (retries included)", ["model", "tenant_class"],
                                          buckets=_BUCKETS, registry=r)
        self.retries = Counter(p + "retries", "Attempts repeated on another replica", ["model"], registry=r)
        self.stream_errors = Counter(p + "stream_errors", "Streams cut by an upstream failure after their first "
                                     "byte", ["model"], registry=r)
        self.upstream_cuts = Counter(p + "upstream_cuts", "Attempts the gateway cut at a replica (reason: "
                                     "idle_timeout = nothing arrived for stream_idle_timeout_s, replica_dead = its "
                                     "replica was removed with abort_in_flight)", ["model", "reason"], registry=r)
        self.coalesced = Counter(p + "coalesced", "Requests served by joining an identical in-flight generation",
                                 ["model"], registry=r)
        self.idempotent_replays = Counter(p + "idempotent_replays", "Requests answered from an earlier request "
                                          "with the same Idempotency-Key", ["model"], registry=r)
        self.upstream_auth_failures = Counter(p + "upstream_auth_failures", "Replica answers 401/403 to the "
                                              "gateway's own key (attempts; a misconfigured upstream key)",
                                              ["model"], registry=r)
        self.upstream_requests = Counter(p + "upstream_requests", "Requests sent to replicas (attempts)",
                                         ["model"], registry=r)
        self.queued = Gauge(p + "queued_requests", "Requests waiting in the dispatch queue", ["model"], registry=r,
                            multiprocess_mode=_SUM)
        self.in_flight = Gauge(p + "in_flight_requests", "Requests at replicas", ["model"], registry=r,
                               multiprocess_mode=_SUM)
        self.replicas = Gauge(p + "replicas", "Replicas by state", ["model", "state"], registry=r,
                              multiprocess_mode=_LATEST)  # each worker checks every replica itself
        self.slots = Gauge(p + "concurrency_slots", "Tenants' concurrency slots held (max_concurrent)",
                           ["tenant_class"], registry=r, multiprocess_mode=_SUM)
        self.reserved_tokens = Gauge(p + "reserved_tokens", "Rate-limit tokens reserved by requests not yet "
                                     "settled", ["tenant_class"], registry=r, multiprocess_mode=_SUM)
        self.workers = Gauge(p + "workers", "Gateway worker processes running (--workers)", registry=r,
                             multiprocess_mode=_SUM)
        self.workers.set(1)
        self.cpu_jobs = Gauge(p + "cpu_jobs", "Body parses and token counts queued or running off the event loop",
                              registry=r, multiprocess_mode=_SUM)
        # the gateway's own limit (overload.py); set when /metrics is scraped
        self.open_requests = Gauge(p + "open_requests", "HTTP requests inside this gateway process (streams "
                                   "included; /health and /metrics not counted)", registry=r,
                                   multiprocess_mode=_SUM)
        self.max_open_requests = Gauge(p + "max_open_requests", "The open requests past which new ones are "
                                       "refused with 503 (reason overloaded_open_requests)", registry=r,
                                       multiprocess_mode=_SUM)
        self.event_loop_lag = Gauge(p + "event_loop_lag_seconds", "How late the event loop's periodic timer fired; "
                                    "new requests are refused while it is above max_event_loop_lag_s", registry=r,
                                    multiprocess_mode=_MAX)
        self.accept_queue = Gauge(p + "accept_queue", "Connections waiting in the kernel to be accepted by the "
                                  "gateway's listening socket; new requests are refused while it is above "
                                  "max_accept_queue", registry=r, multiprocess_mode=_MAX)
        self.ratelimit_fallbacks = Counter(p + "ratelimit_fallbacks", "Rate-limit operations that fell back "
                                           "because Redis was unreachable (op: acquire, peek, refund)", ["op"],
                                           registry=r)
        self.shared_fallbacks = Counter(p + "shared_state_fallbacks", "Operations on the state shared by gateway "
                                        "processes that fell back because Redis was unreachable (op: slot_acquire, "
                                        "slot_release, sync, idempotency_claim, idempotency_renew, "
                                        "idempotency_settle)", ["op"], registry=r)
        # per-tenant series: a registry of their own, served only to a scrape with the admin key (one tenant must
        # not read another's name or usage from /metrics)
        self.tenant_registry = CollectorRegistry()
        self.tenant_tokens = Counter(p + "tenant_tokens", "Tokens the replicas computed for each tenant (kind: "
                                     "prompt, generation), from their usage reports; an answer joined to another "
                                     "request's generation or replayed for an Idempotency-Key adds none. The "
                                     "tenant label is the name the operator gave it in the gateway config: bounded "
                                     "by the config and never an API key. Served only to scrapes with the admin "
                                     "key", ["tenant", "kind"], registry=self.tenant_registry)
        # the batch tier (batch_worker.py); the gauges are read from the batch store when /metrics is scraped
        self.batch_lines = Counter(p + "batch_lines", "Batch lines answered by the worker (outcome: completed = "
                                   "2xx, failed = a final error)", ["model", "outcome"], registry=r)
        self.batch_lines_queued = Gauge(p + "batch_lines_queued", "Batch lines not answered yet, across "
                                        "in-progress and cancelling batches", registry=r, multiprocess_mode=_LATEST)
        self.batch_lines_in_flight = Gauge(p + "batch_lines_in_flight", "Batch lines sent by the worker and not "
                                           "answered yet", registry=r, multiprocess_mode=_SUM)
        self.batches = Gauge(p + "batches", "Batches by status", ["status"], registry=r, multiprocess_mode=_LATEST)
        self.batch_backoffs = Counter(p + "batch_backoffs", "Times the batch worker held back a model's lines "
                                      "(reason: interactive_waiting, replica_busy, rejected, rate_limited, "
                                      "upstream_error, deadline, store_error)", ["reason"], registry=r)

    def render(self, admin: bool) -> bytes:
        """Prometheus text of every series, the per-tenant ones only when `admin`; with --workers N, merged over
        the worker processes."""
        path = multiprocess_dir()
        if path is None:
            text = generate_latest(self.registry)
            return text + generate_latest(self.tenant_registry) if admin else text
        tenant_names = {m.name for m in self.tenant_registry.collect()}
        merged = MultiProcessCollector.merge(glob.glob(os.path.join(path, "*.db")), accumulate=True)
        return generate_latest(_Families([m for m in merged if admin or m.name not in tenant_names]))

    def count_usage(self, tenant: str, usage: dict) -> None:
        """Add one response's OpenAI `usage` (prompt_tokens, completion_tokens) to the tenant's counters; fields
        that are not counts of 0 or more are skipped."""
        for kind, key in (("prompt", "prompt_tokens"), ("generation", "completion_tokens")):
            n = usage.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                self.tenant_tokens.labels(tenant, kind).inc(n)


class _Families:
    """Metric families already collected, in the shape generate_latest reads (a registry's collect())."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def multiprocess_dir() -> str | None:
    """The folder of the worker processes' metric files (set by the --workers supervisor), or None: one process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
