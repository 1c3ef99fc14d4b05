"""Issue 16 items 3-6 as an outside user and attacker found them: each test is one finding, fixed."""
from __future__ import annotations

import atexit
import io
import json
import logging
import pathlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conveyor import run_batch
from conveyor.cli import main


def test_run_batch_a_line_nested_too_deeply_is_a_bad_line_not_a_traceback():
    item = run_batch.parse_line(1, "[" * 200_000)
    assert isinstance(item, run_batch.BadLine) and item.code == "invalid_json"
    assert "line 1" in item.message


def test_run_batch_an_output_nested_too_deeply_is_not_an_output_line():
    with pytest.raises(run_batch.BatchFileError, match="line 1 is not a run-batch output line"):
        run_batch._scan_output(io.BytesIO(b"[" * 200_000 + b"\n"), "out.jsonl")


def test_run_batch_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out.jsonl"
    done, f = run_batch.prepare_output(str(out), "-")
    try:
        with pytest.raises(run_batch.BatchFileError, match="being written by another run-batch"):
            run_batch.prepare_output(str(out), "-")
    finally:
        f.close()
    run_batch.prepare_output(str(out), "-")[1].close()  # free again once the first run ends


def test_tracing_an_unreachable_collector_holds_the_exit_for_a_bounded_time(caplog):
    """The SDK's exit handler retried a collector that accepts and never answers for ~20 s after SIGTERM; ours
    gives up on the last spans after its limit."""
    from conveyor import tracing

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t = tracing.init_tracing(f"http://127.0.0.1:{silent.getsockname()[1]}", "attack-test")
        assert t.provider._atexit_handler is None  # the SDK's unbounded handler is not registered
        t.tracer.start_span("s").end()
        atexit.unregister(tracing._flush_at_exit)
        with caplog.at_level(logging.WARNING, "conveyor.tracing"):
            tracing._flush_at_exit(t.provider, 0.3)
        for processor in t.provider._active_span_processor._span_processors:
            processor.span_exporter.shutdown()  # ends the exporter's retries, left running in the background
    assert "did not take the last spans" in caplog.text


@pytest.mark.parametrize("url", ["http://collector:99999", "http://[::1", "http://collector:abc", "http://:4318",
                                 "http://collector:0"])
def test_tracing_an_endpoint_without_a_usable_host_or_port_is_refused_at_startup(url):
    """These passed the check, and then every export failed in the background, long after startup."""
    from conveyor.tracing import traces_endpoint

    with pytest.raises(ValueError, match="is not an http"):
        traces_endpoint(url)


def test_dashboard_the_429_503_panel_shows_every_reason_the_gateway_refuses_with_429_or_503():
    """The panel left out the Batch API's 429 batch_queued_tokens and 503 batch_store_unavailable."""
    root = pathlib.Path(__file__).resolve().parents[1]
    source = "".join(p.read_text() for p in (root / "conveyor" / "gateway").glob("*.py"))
    reasons = set(re.findall(r"(?:Rejected|_Reject|_reject)\((?:429|503), f?\"([a-z_]+)", source))
    assert {"concurrency", "shed", "batch_queued_tokens"} <= reasons  # the scan still finds them
    dashboard = json.loads((root / "deploy" / "grafana" / "dashboards" / "conveyor.json").read_text())
    panel = next(p for p in dashboard["panels"] if p.get("title") == "429 and 503 by reason")
    selector = re.search(r'reason=~"([^"]+)"', panel["targets"][0]["expr"].replace('\\"', '"')).group(1)
    assert [r for r in sorted(reasons) if not re.fullmatch(selector, r)] == []


@pytest.mark.parametrize("flags, message", [
    (["--duration", "60"], "must be at least 150 s"),  # was numpy's "high - low < 0"
    (["--duration", "nan"], "finite"),
    (["--duration", "1e12"], "too large to simulate"),  # was a MemoryError traceback
    (["--slo-ttft-ms", "nan"], "finite"),  # was accepted: every request met a NaN objective
])
def test_autoscale_simulate_bad_trace_or_sim_flags_are_one_line_before_any_work(flags, message, capsys):
    from conveyor.cli import main

    assert main(["autoscale", "simulate", "--disable-tqdm", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["[" * 100_000, '{"arrival_s": NaN, "prompt_len": 5, "output_len": 5}',
                                  '{"arrival_s": 1e300, "prompt_len": 5, "output_len": 5}',
                                  '{"arrival_s": -1, "prompt_len": 5, "output_len": 5}',
                                  '{"arrival_s": 1, "prompt_len": 0, "output_len": 5}',
                                  '{"arrival_s": 1, "prompt_len": 1e400, "output_len": 5}'])
def test_autoscale_trace_a_line_that_is_no_request_is_a_valueerror_naming_it(tmp_path, text):
    """These were tracebacks (RecursionError, NaN/inf to int) or nonsense accepted (negative times, empty prompts)."""
    from conveyor.autoscale import trace

    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 5, "output_len": 5}\n' + text + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: need"):
        trace.load(str(path))


def test_bench_plan_without_a_latency_curve_says_the_objective_is_not_checked(tmp_path, capsys):
    """An impossible --e2el-ms of 1 ms got a plain recommendation and "meets_objective": true."""
    from conveyor.cli import main

    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--arrival-rate", "10", "--prompt-tokens", "100", "--output-tokens", "100",
                 "--replica-throughput", "500", "--e2el-ms", "1", "--model", "demo", "--output", str(out)]) == 0
    assert "the latency objective is NOT checked" in capsys.readouterr().out
    assert json.loads(out.read_text())["meets_objective"] is None


def test_run_batch_ctrl_c_exits_1_with_its_message_and_the_rest_resumes(tmp_path):
    """Ctrl-C cancelled the server's lifespan before it stopped the engine thread: 'terminate called without an
    active exception' and SIGABRT instead of exit 1."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": f"p {i}", "max_tokens": 32, "ignore_eos": True}}) + "\n"
                           for i in range(200)))
    # one line at a time, so the interrupt lands mid-run (200 lines at once could all finish before it arrived)
    cmd = [sys.executable, "-m", "conveyor.cli", "run-batch", "-i", str(src), "-o", str(out), "--model", "demo",
           "--num-kv-blocks", "2048", "--disable-tqdm", "--max-concurrency", "1"]
    # SIGINT back to its default in the child: a suite started in the background (`scripts/test &`) runs with it
    # ignored, and a Python started so never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "error: interrupted;" in err and "terminate called" not in err, err[-2000:]
    assert main(["run-batch", "-i", str(src), "-o", str(out), "--model", "demo", "--num-kv-blocks", "2048",
                 "--disable-tqdm"]) == 0
    ids = [json.loads(t)["custom_id"] for t in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))


def test_bench_compare_a_workload_that_is_not_one_of_its_names_is_a_usage_error(capsys):
    """--workload trace.jsonl (or a typo) was a KeyError traceback after the model loaded."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "compare", "--workload", "trace.jsonl"])
    assert e.value.code == 2 and "invalid choice: 'trace.jsonl'" in capsys.readouterr().err


def test_bench_trace_a_line_nested_too_deeply_is_a_valueerror_naming_it(tmp_path):
    from conveyor.bench import workloads

    path = tmp_path / "t.jsonl"
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: not JSON"):
        workloads.load_trace(str(path), None, 0)


def test_gateway_sigterm_exits_0_after_exporting_its_last_spans(tmp_path):
    """uvicorn re-raised SIGTERM after its graceful stop: the gateway died (-15) before the exit flush, so the spans
    of its last seconds never reached the collector."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from server_process import GatewayProcess

    posts = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"models": [{"name": "m", "replicas": [], "tokenizer": "demo"}],
                                  "tenants": [{"name": "t", "api_key_sha256": "0" * 64}],
                                  "batch": {"db_path": str(tmp_path / "b.sqlite3")}}))
    gw = GatewayProcess(str(config), "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.server_port}",
                        env={"OTEL_BSP_SCHEDULE_DELAY": "600000"})  # nothing exported before the exit
    try:
        assert httpx.post(f"{gw.base_url}/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401
        assert posts == []
    finally:
        rc = gw.stop()
        collector.shutdown()
    assert rc == 0 and len(posts) == 1, (rc, len(posts), open(gw.log_path).read()[-2000:])
