"""OpenTelemetry tracing across gateway → replica → engine, exported over OTLP/HTTP.

Off unless an endpoint is configured (`--otlp-traces-endpoint`, vLLM's flag): then `init_tracing` makes an SDK
tracer provider with a batch span processor (export runs on its own thread); without an endpoint no provider exists
and a request costs one `if`. The provider is not made the global one: FastAPI instruments itself with the global
provider (a span per dependency and per /health poll, exception messages that may quote a request). W3C
`traceparent` carries the trace between processes.

Spans (attributes carry lengths, counts, sampling parameters and timings, never prompt or output text):

    gateway   "POST /v1/..." (SERVER) ── "queue" (its dispatch queue)
                                      └─ "upstream" (CLIENT, one per attempt; its traceparent goes to the replica)
    replica   "llm_request" (SERVER) ── per prompt: "queue" → "prefill" → "decode" (the engine's own timestamps)

The replica's spans are made when the request ends, with explicit start and end times, so neither the event loop
nor the engine thread calls into the SDK while a request runs.
"""
from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from conveyor.gateway.proxy import Flight
    from conveyor.outputs import RequestOutput
    from conveyor.sampling_params import SamplingParams

log = logging.getLogger("conveyor.tracing")
GATEWAY_SERVICE = "conveyor-gateway"
REPLICA_SERVICE = "conveyor-replica"
EXIT_FLUSH_S = 3.0  # the most an exit waits for the collector to take the last spans
_PROPAGATOR = TraceContextTextMapPropagator()  # traceparent and tracestate only: no baggage crosses a process


def traces_endpoint(url: str) -> str:
    """The OTLP/HTTP traces URL for `url`: http(s)://HOST[:PORT][/PATH]; with no path, the collector's standard
    /v1/traces is added (`http://collector:4318` → `http://collector:4318/v1/traces`). Raises ValueError saying
    what is wrong."""
    m = re.fullmatch(r"(https?://[A-Za-z0-9.\-\[\]:]+)(/[\x21-\x7e]*)?", url) if isinstance(url, str) else None
    if m is None or not _host_and_port_valid(m.group(1)):
        raise ValueError(f"{str(url)[:100]!r} is not an http(s)://HOST[:PORT][/PATH] URL of an OTLP/HTTP collector "
                         f"(gRPC is not supported)")
    return url if m.group(2) not in (None, "/") else m.group(1) + "/v1/traces"


def _host_and_port_valid(origin: str) -> bool:
    """Whether http(s)://HOST[:PORT] has a host and, if any, a port in 1-65535 (the exporter would fail on every
    export otherwise, long after startup)."""
    try:
        parts = urllib.parse.urlsplit(origin)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # an unbalanced [ or a port that is not a number in 0-65535
        return False


@dataclass
class Tracing:
    """A tracer and its provider (the SDK flushes and shuts the provider down at interpreter exit)."""
    tracer: Tracer
    provider: Any  # opentelemetry.sdk.trace.TracerProvider


def init_tracing(endpoint: str | None, service_name: str, honour_client_sampling: bool = True) -> Tracing | None:
    """A tracer exporting to `endpoint` (checked by traces_endpoint), or None when endpoint is None (tracing off:
    nothing of the SDK is loaded). honour_client_sampling=False (the gateway): every request is recorded whatever
    the caller's traceparent says about sampling, so that a client cannot switch the operator's tracing off; its
    trace id is still continued."""
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}),
                              sampler=None if honour_client_sampling else ALWAYS_ON,  # None: OTEL_TRACES_SAMPLER
                              shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint(endpoint))))
    atexit.register(_flush_at_exit, provider, EXIT_FLUSH_S)
    return Tracing(provider.get_tracer("conveyor"), provider)


def _flush_at_exit(provider: Any, limit_s: float) -> None:
    """Export the spans still queued, for at most limit_s seconds: the SDK's own exit handler retries an unreachable
    collector for up to 30 s, which a supervisor's stop would wait through (or SIGKILL)."""
    done = threading.Thread(target=provider.shutdown, name="otel-exit-flush", daemon=True)
    done.start()
    done.join(limit_s)
    if done.is_alive():
        log.warning("the OTLP collector did not take the last spans within %.0f s; they are dropped", limit_s)


def wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as epoch nanoseconds (what span timestamps are)."""
    return time.time_ns() - time.monotonic_ns() + int(monotonic_s * 1e9)


def start_server_span(tracer: Tracer, name: str, headers: Mapping[str, str], start_mono: float | None = None,
                      attributes: dict | None = None) -> Span:
    """A SERVER span continuing the caller's traceparent (a new trace when there is none, or it is malformed)."""
    ctx = _PROPAGATOR.extract(headers)
    return tracer.start_span(name, ctx, SpanKind.SERVER, attributes,
                             start_time=None if start_mono is None else wall_ns(start_mono))


def start_child(tracer: Tracer, parent: Span, name: str, kind: SpanKind = SpanKind.INTERNAL,
                start_mono: float | None = None, attributes: dict | None = None) -> Span:
    return tracer.start_span(name, trace.set_span_in_context(parent), kind, attributes,
                             start_time=None if start_mono is None else wall_ns(start_mono))


def phase(tracer: Tracer, parent: Span, name: str, start_mono: float, end_mono: float,
          attributes: dict | None = None) -> None:
    """A finished child span from start_mono to end_mono (time.monotonic() readings)."""
    start_child(tracer, parent, name, start_mono=start_mono, attributes=attributes).end(wall_ns(end_mono))


def traceparent_headers(span: Span) -> dict[str, str]:
    """{"traceparent": ..., ["tracestate": ...]} naming `span` as the parent of the receiver's spans."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier


def set_error(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description[:200]))


# ---- the replica's spans --------------------------------------------------------------------------------------------
def sampling_attributes(params: SamplingParams) -> dict[str, Any]:
    """gen_ai.request.* (OpenTelemetry's GenAI names, as vLLM sets them) and conveyor.request.* for the rest."""
    p = params
    attrs: dict[str, Any] = {"gen_ai.request.temperature": p.temperature, "gen_ai.request.top_p": p.top_p,
                             "gen_ai.request.top_k": p.top_k, "gen_ai.request.n": p.n,
                             "gen_ai.request.presence_penalty": p.presence_penalty,
                             "gen_ai.request.frequency_penalty": p.frequency_penalty,
                             "conveyor.request.min_p": p.min_p,
                             "conveyor.request.repetition_penalty": p.repetition_penalty,
                             "conveyor.request.min_tokens": p.min_tokens}
    optional = {"gen_ai.request.max_tokens": p.max_tokens, "gen_ai.request.seed": p.seed,
                "conveyor.request.best_of": p.best_of, "conveyor.request.logprobs": p.logprobs,
                "conveyor.request.beam_width": p.beam_width if p.use_beam_search else None,
                "conveyor.request.structured_output": p.structured_outputs.kind if p.structured_outputs else None}
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs


def record_request(tracer: Tracer, headers: Mapping[str, str], started_mono: float, request_id: str, model: str,
                   params: SamplingParams, outs: list[RequestOutput], status: str) -> None:
    """The replica's "llm_request" span of one HTTP request (from started_mono to now) and its engine phases per
    prompt, made now from the outputs' timings. status: "ok", "client_disconnected" or an error code. Never raises:
    tracing must not fail a request (a failure is logged)."""
    try:
        _record_request(tracer, headers, started_mono, request_id, model, params, outs, status)
    except Exception:
        log.exception("recording the request's trace failed")


def _record_request(tracer: Tracer, headers: Mapping[str, str], started_mono: float, request_id: str, model: str,
                    params: SamplingParams, outs: list[RequestOutput], status: str) -> None:
    span = start_server_span(tracer, "llm_request", headers, started_mono, {
        "gen_ai.request.id": request_id, "gen_ai.response.model": model, **sampling_attributes(params),
        "gen_ai.usage.prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "gen_ai.usage.completion_tokens": sum(o.num_generated_tokens for o in outs),
        "gen_ai.usage.num_sequences": sum(len(o.outputs) for o in outs),
        "gen_ai.response.finish_reasons": [c.finish_reason or "none" for o in outs for c in o.outputs],
        "conveyor.status": status})
    phases = [p for i, o in enumerate(outs) if (p := _phases(tracer, span, o, i if len(outs) > 1 else None))]
    if phases:
        span.set_attributes(_latencies(phases))
    if status not in ("ok", "client_disconnected"):
        set_error(span, status)
    span.end()


def _phases(tracer: Tracer, span: Span, out: RequestOutput, index: int | None) -> dict[str, float] | None:
    """Child spans queue → prefill → decode of one engine request, and events at its scheduling and first token;
    returns its timings in seconds since arrival (None when the engine reported none)."""
    m = out.metrics
    arrival = m.get("arrival_time")
    if arrival is None:
        return None
    attrs = None if index is None else {"conveyor.prompt_index": index, "gen_ai.usage.prompt_tokens":
                                        len(out.prompt_token_ids)}
    end = arrival + m.get("e2e_s", 0.0)
    scheduled = arrival + m["queue_s"] if "queue_s" in m else None
    first = arrival + m["ttft_s"] if "ttft_s" in m else None
    phase(tracer, span, "queue", arrival, scheduled or end, attrs)
    if scheduled is not None:
        span.add_event("scheduled", attrs, wall_ns(scheduled))
        phase(tracer, span, "prefill", scheduled, first or end, attrs)
    if first is not None:
        span.add_event("first_token", attrs, wall_ns(first))
        phase(tracer, span, "decode", first, end, attrs)
    return m


def _latencies(timings: list[dict[str, float]]) -> dict[str, float]:
    """vLLM's gen_ai.latency.* in seconds: the earliest queue exit and first token, the latest end; the model's
    prefill / decode / inference times when the request had one prompt."""
    out: dict[str, float] = {}
    for key, attr, pick in (("queue_s", "time_in_queue", min), ("ttft_s", "time_to_first_token", min),
                            ("e2e_s", "e2e", max)):
        values = [t[key] for t in timings if key in t]
        if values:
            out[f"gen_ai.latency.{attr}"] = pick(values)
    if len(timings) == 1 and {"queue_s", "ttft_s", "e2e_s"} <= timings[0].keys():
        t = timings[0]
        out.update({"gen_ai.latency.time_in_model_prefill": t["ttft_s"] - t["queue_s"],
                    "gen_ai.latency.time_in_model_decode": t["e2e_s"] - t["ttft_s"],
                    "gen_ai.latency.time_in_model_inference": t["e2e_s"] - t["queue_s"]})
    return out


# ---- the gateway's spans ----------------------------------------------------------------------------------------
def start_gateway_span(tracer: Tracer, headers: Mapping[str, str], path: str) -> Span:
    """The gateway's SERVER span of one client request to `path` (a route of the gateway's own, never client text),
    continuing the client's traceparent."""
    return start_server_span(tracer, f"POST {path}", headers,
                             attributes={"http.request.method": "POST", "url.path": path})


def end_gateway_span(span: Span, status: int, request_id: str, model: str, tenant: str | None, tenant_class: str,
                     flight: Flight | None, joined: str | None, reason: str | None) -> None:
    """End the gateway span with what the access log records: the model, the tenant's name and class (never its
    key), the HTTP status, and for a forwarded request its dispatch-queue wait (s), replica, retries and usage."""
    attrs: dict[str, Any] = {"http.response.status_code": status, "gen_ai.request.id": request_id,
                             "gen_ai.request.model": model, "conveyor.tenant.class": tenant_class}
    optional = {"conveyor.tenant.name": tenant, "conveyor.joined": joined, "conveyor.reason": reason}
    if flight is not None:
        usage = flight.usage if isinstance(flight.usage, dict) else {}
        optional.update({"conveyor.queue_time": None if flight.queue_ms is None or joined else flight.queue_ms / 1e3,
                         "conveyor.replica": flight.replica, "conveyor.retries": flight.retries,
                         "gen_ai.usage.prompt_tokens": _count(usage.get("prompt_tokens")),
                         "gen_ai.usage.completion_tokens": _count(usage.get("completion_tokens"))})
    span.set_attributes({**attrs, **{k: v for k, v in optional.items() if v is not None}})
    if status >= 500:
        set_error(span, reason or f"HTTP {status}")
    span.end()


def start_upstream_span(tracer: Tracer, parent: Span, replica_url: str, path: str, attempt: int) -> Span:
    """A CLIENT span for one attempt at one replica; traceparent_headers(it) goes with the upstream request."""
    return start_child(tracer, parent, "upstream", SpanKind.CLIENT,
                       attributes={"url.full": replica_url + path, "conveyor.replica": replica_url,
                                   "conveyor.attempt": attempt})


def end_upstream_span(span: Span, status: int | None, outcome: str | None) -> None:
    """outcome: "done", "unsent" (never reached the replica), "failed", or None (cancelled: the clients left)."""
    span.set_attribute("conveyor.outcome", outcome or "cancelled")
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if outcome != "done" or (status or 0) >= 500:
        set_error(span, f"{outcome or 'cancelled'} ({status})")
    span.end()


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
