"""OpenTelemetry tracing end to end: a real gateway and a real demo replica export to an OTLP/HTTP receiver run by
the test (it decodes the protobuf the SDK's exporter sends). One trace runs client → gateway → replica → engine,
parent/child linked, with the attributes the operator needs and no prompt or output text; with tracing off
nothing is made and no traceparent is forwarded."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from server_process import GatewayProcess, ServerProcess, free_port

from conveyor.gateway.app import Gateway
from conveyor.gateway.config import parse_config
from conveyor.tracing import init_tracing, traces_endpoint

KEY = "tracing-tenant-key"
PROMPT = "a secret prompt 7f3a9c2e that must never reach a span"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # OTLP's SpanKind values
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms between the batch processor's exports


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, ExportTraceServiceRequest protobuf (gzip or not)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    receiver.add(body)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        spans = []
        for rs in req.resource_spans:
            service = attributes(rs.resource.attributes)["service.name"]
            for ss in rs.scope_spans:
                spans += [{"service": service, "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                           "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                           "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                           "attrs": attributes(s.attributes), "events": [e.name for e in s.events],
                           "error": s.status.code == 2} for s in ss.spans]
        with self.lock:
            self.raw.append(body)
            self.spans += spans

    def wait_for(self, cond, timeout: float = 20.0) -> list[dict]:
        """The spans once cond(spans) holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if cond(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans never arrived; got {[(s['service'], s['name']) for s in spans]}")


def attributes(kvs) -> dict:
    def value(v):
        kind = v.WhichOneof("value")
        return [value(x) for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return {kv.key: value(kv.value) for kv in kvs}


def config(replica: ServerProcess, folder) -> dict:
    return {"models": [{"name": "m", "replicas": [replica.base_url], "tokenizer": "demo"}],
            "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            "batch": {"db_path": str(folder / "batches.sqlite3")}}


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def replica(receiver):
    r = ServerProcess("--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "512",
                      "--served-model-name", "m", "--otlp-traces-endpoint", receiver.url, env=FAST_EXPORT)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gateway(receiver, replica, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracing")
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(replica, folder)))
    g = GatewayProcess(str(path), "--otlp-traces-endpoint", receiver.url, env=FAST_EXPORT)
    yield g
    g.stop()


def by(spans: list[dict], service: str, name: str, trace_id: str) -> dict:
    found = [s for s in spans if (s["service"], s["name"], s["trace_id"]) == (service, name, trace_id)]
    assert len(found) == 1, [(s["service"], s["name"]) for s in spans if s["trace_id"] == trace_id]
    return found[0]


def test_one_trace_from_the_client_through_gateway_replica_and_engine(receiver, replica, gateway):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 7,
            "ignore_eos": True}
    r = httpx.post(f"{gateway.base_url}/v1/completions", json=body, timeout=30,
                   headers={"authorization": f"Bearer {KEY}", "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200, r.text
    usage, text = r.json()["usage"], r.json()["choices"][0]["text"]
    names = {("conveyor-gateway", "POST /v1/completions"), ("conveyor-gateway", "queue"),
             ("conveyor-gateway", "upstream"), ("conveyor-replica", "llm_request"), ("conveyor-replica", "queue"),
             ("conveyor-replica", "prefill"), ("conveyor-replica", "decode")}
    spans = receiver.wait_for(lambda ss: names <= {(s["service"], s["name"]) for s in ss if s["trace_id"] == TRACE_ID})
    gw = by(spans, "conveyor-gateway", "POST /v1/completions", TRACE_ID)
    gw_queue, upstream = (by(spans, "conveyor-gateway", n, TRACE_ID) for n in ("queue", "upstream"))
    llm = by(spans, "conveyor-replica", "llm_request", TRACE_ID)
    phases = [by(spans, "conveyor-replica", n, TRACE_ID) for n in ("queue", "prefill", "decode")]

    # parent/child: client → gateway → (queue, upstream) → replica → (queue, prefill, decode)
    assert (gw["parent"], gw["kind"]) == (CLIENT_SPAN, SERVER)
    assert gw_queue["parent"] == upstream["parent"] == gw["span_id"] and upstream["kind"] == CLIENT
    assert (llm["parent"], llm["kind"]) == (upstream["span_id"], SERVER)
    assert all(p["parent"] == llm["span_id"] and p["kind"] == INTERNAL for p in phases)
    # the engine's phases follow each other inside the replica's span, inside the gateway's (one clock; 2 ms slack)
    slack = 2_000_000
    assert gw["start"] <= gw_queue["start"] <= gw_queue["end"] <= upstream["start"] + slack
    assert gw["start"] <= llm["start"] + slack and llm["end"] <= gw["end"] + slack
    assert llm["start"] <= phases[0]["start"] + slack and phases[-1]["end"] <= llm["end"] + slack
    for a, b in zip(phases, phases[1:]):
        assert a["start"] <= a["end"] and abs(a["end"] - b["start"]) < slack
    assert llm["events"] == ["scheduled", "first_token"]

    assert gw["attrs"] | {"conveyor.queue_time": 0} == {
        "http.request.method": "POST", "url.path": "/v1/completions", "http.response.status_code": 200,
        "gen_ai.request.id": r.headers["x-request-id"], "gen_ai.request.model": "m", "conveyor.tenant.name": "t",
        "conveyor.tenant.class": "interactive", "conveyor.replica": replica.base_url, "conveyor.retries": 0,
        "conveyor.queue_time": 0, "gen_ai.usage.prompt_tokens": usage["prompt_tokens"],
        "gen_ai.usage.completion_tokens": usage["completion_tokens"]}
    assert 0 <= gw["attrs"]["conveyor.queue_time"] < 5 and not gw["error"]
    assert upstream["attrs"]["conveyor.outcome"] == "done" and upstream["attrs"]["http.response.status_code"] == 200
    a = llm["attrs"]
    assert {k: a[k] for k in ("gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p",
                              "gen_ai.request.n", "gen_ai.request.seed", "gen_ai.response.model",
                              "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
                              "gen_ai.response.finish_reasons", "conveyor.status")} == {
        "gen_ai.request.max_tokens": 8, "gen_ai.request.temperature": pytest.approx(0.7),
        "gen_ai.request.top_p": pytest.approx(0.9), "gen_ai.request.n": 1, "gen_ai.request.seed": 7,
        "gen_ai.response.model": "m", "gen_ai.usage.prompt_tokens": usage["prompt_tokens"],
        "gen_ai.usage.completion_tokens": 8, "gen_ai.response.finish_reasons": ["length"], "conveyor.status": "ok"}
    assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"] <= \
        a["gen_ai.latency.e2e"] < 30
    ttft_ns = phases[1]["end"] - phases[0]["start"]
    assert abs(ttft_ns / 1e9 - a["gen_ai.latency.time_to_first_token"]) < 0.002

    raw = b"".join(receiver.raw)
    for secret in (PROMPT, KEY, *([text] if len(text) >= 6 else [])):
        assert secret.encode() not in raw


def test_streams_not_sampled_and_malformed_traceparents(receiver, gateway):
    """A stream is traced like any request. The operator's tracing is not the client's to switch off: a
    not-sampled traceparent is recorded, its trace id continued; a malformed one starts a new trace."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    for traceparent, rid in ((f"00-{trace_id}-b7ad6b7169203331-00", "not-sampled"), ("00-zz-bad", "malformed")):
        r = httpx.post(f"{gateway.base_url}/v1/chat/completions", timeout=30,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "ignore_eos": True, "stream": True},
                       headers={"authorization": f"Bearer {KEY}", "traceparent": traceparent, "x-request-id": rid})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    spans = receiver.wait_for(lambda ss: {"POST /v1/chat/completions", "llm_request"} <=
                              {s["name"] for s in ss if s["trace_id"] == trace_id})
    gw = by(spans, "conveyor-gateway", "POST /v1/chat/completions", trace_id)
    assert gw["parent"] == "b7ad6b7169203331" and gw["attrs"]["http.response.status_code"] == 200
    assert by(spans, "conveyor-replica", "llm_request", trace_id)["attrs"]["gen_ai.usage.completion_tokens"] == 2
    spans = receiver.wait_for(lambda ss: any(s["attrs"].get("gen_ai.request.id") == "malformed" and
                                             s["service"] == "conveyor-gateway" for s in ss))
    assert [s["parent"] for s in spans if s["attrs"].get("gen_ai.request.id") == "malformed" and
            s["service"] == "conveyor-gateway"] == [""]


def test_with_tracing_off_no_span_is_made_and_no_traceparent_forwarded(receiver, replica, tmp_path):
    """A gateway without an endpoint (in this process) in front of the traced replica: the replica's span starts
    a trace of its own, nothing of the client's trace arrives, and no tracer provider was ever set up here."""
    assert init_tracing(None, "x") is None
    gw = Gateway(parse_config(config(replica, tmp_path)))
    assert gw.tracing is None and gw.forwarder.tracing is None
    trace_id, rid = "5b8efff798038103d269b633813fc60c", "tracing-off-1"

    async def scenario() -> httpx.Response:
        async with gw.app.router.lifespan_context(gw.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gw.app), base_url="http://gw",
                                         timeout=30) as client:
                return await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                         headers={"authorization": f"Bearer {KEY}", "x-request-id": rid,
                                                  "traceparent": f"00-{trace_id}-eee19b7ec3c1b174-01"})

    assert asyncio.run(scenario()).status_code == 200
    spans = receiver.wait_for(lambda ss: any(s["attrs"].get("gen_ai.request.id") == rid for s in ss))
    llm = next(s for s in spans if s["attrs"].get("gen_ai.request.id") == rid)
    assert llm["service"] == "conveyor-replica" and llm["parent"] == "" and llm["trace_id"] != trace_id
    assert not [s for s in spans if s["trace_id"] == trace_id]
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # the API's no-op default


def test_the_endpoint_is_checked_and_completed():
    assert traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("https://c.example/custom/path") == "https://c.example/custom/path"
    for bad in ("grpc://collector:4317", "collector:4318", "http://a b", ""):
        with pytest.raises(ValueError, match="not an http"):
            traces_endpoint(bad)


def test_a_batch_line_has_a_trace_of_its_own(receiver, gateway):
    """A line of a Batch API batch: gateway span at class batch → upstream → the replica's engine phases."""
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0)
    line = {"custom_id": "only", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}}
    f = client.files.create(file=("in.jsonl", json.dumps(line).encode(), "application/jsonl"), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline, client.batches.retrieve(batch.id)
        time.sleep(0.1)

    def batch_span(spans):
        return next((s for s in spans if s["attrs"].get("conveyor.tenant.class") == "batch"
                     and s["service"] == "conveyor-gateway" and s["kind"] == SERVER), None)
    spans = receiver.wait_for(lambda ss: (b := batch_span(ss)) is not None and {"upstream", "llm_request", "decode"}
                              <= {s["name"] for s in ss if s["trace_id"] == b["trace_id"]})
    gw = batch_span(spans)
    assert gw["name"] == "POST /v1/completions" and gw["parent"] == "" and gw["attrs"]["conveyor.tenant.name"] == "t"
    assert gw["attrs"]["http.response.status_code"] == 200
    upstream = by(spans, "conveyor-gateway", "upstream", gw["trace_id"])
    assert upstream["parent"] == gw["span_id"]
    assert by(spans, "conveyor-replica", "llm_request", gw["trace_id"])["parent"] == upstream["span_id"]
    assert PROMPT.encode() not in b"".join(receiver.raw)
