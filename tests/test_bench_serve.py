"""`conveyor bench serve` end to end against a real `conveyor serve` (demo model), and the client's handling of
failed requests against a mock transport."""
from __future__ import annotations

import asyncio
import json
import os
import re

import httpx
import pytest
from server_process import ServerProcess

from conveyor.bench.client import stream_completion
from conveyor.bench.metrics import RequestRecord
from conveyor.cli import main

MAX_MODEL_LEN = 256
SUMMARY_KEYS = {"completed", "failed", "duration_s", "request_throughput", "output_throughput",
                "total_token_throughput", "goodput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "peak_concurrency",
                "requests", "server_metrics", "throughput_series", "config"}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "4", "--num-kv-blocks", "256", "--max-model-len", str(MAX_MODEL_LEN))
    yield s
    s.stop()


def bench(tmp_path, server, *args: str) -> dict:
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, "--disable-tqdm", "--output", str(out), *args])
    assert rc == 0
    return json.loads(out.read_text())


def check_completed(res: dict, n: int) -> None:
    assert SUMMARY_KEYS <= set(res)
    assert res["completed"] == n and res["failed"] == 0 and res["errors"] == {}
    reqs = res["requests"]
    assert len(reqs) == n
    assert all(r["output_tokens"] == r["output_len"] for r in reqs)  # ignore_eos: exactly max_tokens each
    assert res["total_output_tokens"] == sum(r["output_len"] for r in reqs)
    assert res["total_input_tokens"] == sum(r["prompt_len"] for r in reqs)  # token-id prompts: exact lengths
    assert all(len(r["itl_ms"]) <= r["output_tokens"] - 1 for r in reqs)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert all(res[key][s] is not None for s in ("mean", "p50", "p95", "p99"))
    assert res["request_throughput"] * res["duration_s"] == pytest.approx(n)
    assert res["output_throughput"] * res["duration_s"] == pytest.approx(res["total_output_tokens"])
    assert 1 <= res["peak_concurrency"] <= n
    series = res["server_metrics"]
    assert series["t"] and len(series["vllm:num_requests_running"]) == len(series["t"])
    assert all(v is not None for v in series["conveyor_slots_used_ratio"])  # conveyor serve exposes them all
    tput = res["throughput_series"]["output_tokens_per_s"]
    assert sum(tput[:-1]) + tput[-1] * (res["duration_s"] - len(tput[:-1])) == pytest.approx(
        res["total_output_tokens"])


def test_chat_all_at_once_with_plots(tmp_path, server, capsys):
    plots = tmp_path / "plots"
    res = bench(tmp_path, server, "--workload", "chat", "--num-requests", "12", "--prompt-len", "24",
                "--output-len", "12", "--goodput", "ttft:60000", "e2el:60000", "--plot", str(plots))
    check_completed(res, 12)
    assert res["config"]["request_rate"] == "inf" and all(r["arrival_s"] == 0 for r in res["requests"])
    assert res["goodput"] == pytest.approx(res["request_throughput"])  # SLOs no request can miss
    assert "Serving Benchmark Result" in capsys.readouterr().out
    for name in ("latency_cdf.png", "throughput.png", "queue_depth.png", "report.md"):
        assert (plots / name).stat().st_size > 0
    report = (plots / "report.md").read_text()
    assert "| Successful requests | 12 |" in report and "![Latency CDFs](latency_cdf.png)" in report


def test_finite_rate_with_concurrency_cap(tmp_path, server):
    res = bench(tmp_path, server, "--workload", "shared-prefix", "--num-requests", "12", "--prompt-len", "40",
                "--output-len", "8", "--request-rate", "30", "--burstiness", "0.5", "--max-concurrency", "3",
                "--metrics-interval", "0.2", "--seed", "5")
    check_completed(res, 12)
    arrivals = [r["arrival_s"] for r in res["requests"]]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0
    assert res["peak_concurrency"] <= 3
    assert res["config"]["request_rate"] == 30.0 and res["config"]["max_concurrency"] == 3


def test_trace_is_clipped_to_the_servers_max_model_len(tmp_path, server):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_s": 5.0, "prompt": "Hello there", "output_len": 6}\n'
                     '{"arrival_s": 5.1, "prompt_len": 400, "output_len": 4}\n')
    res = bench(tmp_path, server, "--workload", str(trace))
    check_completed(res, 2)
    assert res["config"]["max_model_len"] == MAX_MODEL_LEN  # from /v1/models
    assert [r["prompt_len"] for r in res["requests"]] == [11, MAX_MODEL_LEN - 4]
    assert [r["arrival_s"] for r in res["requests"]] == pytest.approx([0.0, 0.1])


def test_rejected_requests_count_as_failed(tmp_path, server):
    res = bench(tmp_path, server, "--num-requests", "3", "--prompt-len", "4", "--output-len", "2",
                "--model", "no-such-model")
    assert res["completed"] == 0 and res["failed"] == 3
    (error, count), = res["errors"].items()
    assert count == 3 and error.startswith("HTTP 404") and "no-such-model" in error
    assert res["ttft_ms"]["mean"] is None and res["goodput"] is None


def test_unreachable_server_fails_every_request_without_crashing(tmp_path):
    out = tmp_path / "r.json"
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-requests", "2", "--disable-tqdm",
               "--output", str(out), "--plot", str(tmp_path / "p")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["failed"] == 2 and res["server_metrics"]["t"] == [] and res["server_metrics"]["failed_scrapes"] >= 1
    assert os.path.exists(tmp_path / "p" / "report.md")


# ---- stream handling against a mock transport ------------------------------------------------------------------
def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def text_chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


class Broken(httpx.AsyncByteStream):
    async def __aiter__(self):
        yield sse(text_chunk("a"), text_chunk("b"))
        raise httpx.ReadError("connection reset")


def run_one(handler) -> RequestRecord:
    async def go() -> RequestRecord:
        rec = RequestRecord(0, 3, 4)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            await stream_completion(c, "http://test/v1/completions", {}, rec, 0.0)
        return rec

    return asyncio.run(go())


def test_stream_counts_usage_tokens():
    body = sse(text_chunk("a"), text_chunk(""), text_chunk("bc"), text_chunk("d"),
               {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "[DONE]")
    rec = run_one(lambda req: httpx.Response(200, content=body))
    assert rec.ok and rec.output_tokens == 4 and rec.prompt_tokens == 3
    assert len(rec.itl_s) == 2  # three chunks with text
    assert rec.ttft_s is not None and rec.latency_s >= rec.ttft_s


def test_stream_without_usage_counts_chunks():
    rec = run_one(lambda req: httpx.Response(200, content=sse(text_chunk("a"), text_chunk("b"), "[DONE]")))
    assert rec.ok and rec.output_tokens == 2 and rec.prompt_tokens is None


@pytest.mark.parametrize("response,match", [
    (httpx.Response(503, json={"error": {"message": "overloaded"}}), "HTTP 503: overloaded"),
    (httpx.Response(500, text="boom"), "HTTP 500: boom"),
    (httpx.Response(200, content=sse(text_chunk("a"))), "before \\[DONE\\]"),
    (httpx.Response(200, content=sse(text_chunk("a"), {"error": {"message": "engine died"}}, "[DONE]")),
     "engine died"),
    (httpx.Response(200, content=sse("[DONE]")), "no tokens"),
    (httpx.Response(200, content=b"data: {not json\n\n"), "JSONDecodeError"),
    (httpx.Response(200, stream=Broken()), "ReadError: connection reset"),
])
def test_failures_are_recorded_not_raised(response, match):
    rec = run_one(lambda req: response)
    assert not rec.ok
    assert re.search(match, rec.error)
    assert rec.latency_s is not None
