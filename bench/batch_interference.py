"""What a running batch costs interactive traffic: steady interactive load (Poisson arrivals, streamed completions
through the bench client) against a gateway + one replica, measured in windows that alternate between no batch and a
batch running (a fresh batch created before the window, cancelled after it, drained before the next window), so both
conditions see the same machine. Prints, per condition: interactive TTFT p50 / p95 (and E2E p95, errors), batch lines
completed per minute, and CPU utilization (the whole machine from /proc/stat, and the replica + gateway processes'
CPU seconds per wall second).

    .venv/bin/python bench/batch_interference.py [--rounds 2] [--seconds 30] [--rate 2] [--prompt-len 64]
        [--output-len 32] [--batch-max-in-flight 16] [--scheduling-policy fcfs] [--out results.json]

The replica is `conveyor serve --model demo` (random weights: timing only) started by tests/server_process.py, so
with OMP_NUM_THREADS=1 (one core for the model). Each window sends rate × seconds interactive requests; the batch has
more lines than a window can finish.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import httpx

from conveyor.bench.client import run_requests
from conveyor.bench.metrics import stats_ms
from conveyor.bench.workloads import Lengths, TextTokens, assign_arrivals, load_tokenizer, make_workload
from conveyor.prometheus_text import samples

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import GatewayProcess, ServerProcess  # noqa: E402

CHAT_KEY, BATCH_KEY = "interactive-key", "batch-key"


def _tenant(name: str, key: str) -> dict:
    return {"name": name, "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(), "requests_per_minute": 1e9,
            "tokens_per_minute": 1e12, "max_concurrent": 100_000}


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class CpuMeter:
    """Machine-wide CPU utilization (/proc/stat) and the CPU seconds of some processes (/proc/PID/stat)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0, self.machine0, self.procs0 = time.monotonic(), _machine(), _proc_cpu(pids)

    def read(self) -> dict[str, float]:
        busy0, total0 = self.machine0
        busy1, total1 = _machine()
        wall = time.monotonic() - self.t0
        return {"machine_util_pct": 100.0 * (busy1 - busy0) / max(total1 - total0, 1),
                "servers_cpu_per_wall_s": (_proc_cpu(self.pids) - self.procs0) / wall, "cores": os.cpu_count()}


def _machine() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _proc_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def _batch_file(text: TextTokens, n: int, prompt_len: int, output_len: int, seed: int) -> bytes:
    reqs = make_workload("chat", n, text, seed, Lengths(prompt_len, output_len))
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "demo", "prompt": r.prompt_ids, "max_tokens": r.output_len,
                                        "ignore_eos": True}}) + "\n" for i, r in enumerate(reqs)).encode()


def _start_batch(gw: str, content: bytes) -> str:
    up = httpx.post(f"{gw}/v1/files", headers=_auth(BATCH_KEY), data={"purpose": "batch"},
                    files={"file": ("batch.jsonl", content)}, timeout=60)
    up.raise_for_status()
    b = httpx.post(f"{gw}/v1/batches", headers=_auth(BATCH_KEY), timeout=60,
                   json={"input_file_id": up.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    b.raise_for_status()
    return b.json()["id"]


def _stop_batch(gw: str, batch_id: str) -> dict:
    """Cancel the batch and wait until it has ended (its lines in flight answered); its final object."""
    httpx.post(f"{gw}/v1/batches/{batch_id}/cancel", headers=_auth(BATCH_KEY), timeout=30).raise_for_status()
    while (b := httpx.get(f"{gw}/v1/batches/{batch_id}", headers=_auth(BATCH_KEY), timeout=30).json())["status"] \
            not in ("cancelled", "completed"):
        time.sleep(0.2)
    return b


def _lines_completed(gw: str) -> float:
    text = httpx.get(f"{gw}/metrics", timeout=30).text
    return sum(s.value for s in samples(text)
               if s.name == "conveyor_gateway_batch_lines_total" and s.labels.get("outcome") == "completed")


def window(gw: str, pids: list[int], text: TextTokens, a: argparse.Namespace, seed: int, batch: bytes | None) -> dict:
    """One measurement window of interactive load; with a batch running throughout when `batch` is given."""
    n = max(1, round(a.rate * a.seconds))
    reqs = make_workload("chat", n, text, seed, Lengths(a.prompt_len, a.output_len))
    assign_arrivals(reqs, a.rate, 1.0, seed)
    batch_id = _start_batch(gw, batch) if batch is not None else None
    if batch_id is not None:
        time.sleep(a.warmup)  # the worker's window opens
    lines0, cpu = _lines_completed(gw), CpuMeter(pids)
    t0 = time.monotonic()
    run = asyncio.run(run_requests(gw, reqs, "demo", progress=False, headers=_auth(CHAT_KEY)))
    wall = time.monotonic() - t0
    lines = _lines_completed(gw) - lines0
    usage = cpu.read()
    if batch_id is not None:
        _stop_batch(gw, batch_id)
    ok = [r for r in run.records if r.error is None]
    return {"batch": batch is not None, "requests": n, "errors": n - len(ok), "wall_s": wall,
            "ttft_ms": stats_ms([r.ttft_s for r in ok]), "e2e_ms": stats_ms([r.latency_s for r in ok]),
            "batch_lines_per_min": 60.0 * lines / wall, **usage}


def summarize(windows: list[dict]) -> dict:
    out = {}
    for cond, label in ((False, "without_batch"), (True, "with_batch")):
        ws = [w for w in windows if w["batch"] is cond]
        out[label] = {
            "windows": len(ws),
            "ttft_p50_ms": _median([w["ttft_ms"]["p50"] for w in ws]),
            "ttft_p95_ms": _median([w["ttft_ms"]["p95"] for w in ws]),
            "e2e_p95_ms": _median([w["e2e_ms"]["p95"] for w in ws]),
            "errors": sum(w["errors"] for w in ws),
            "batch_lines_per_min": _median([w["batch_lines_per_min"] for w in ws]),
            "machine_util_pct": _median([w["machine_util_pct"] for w in ws]),
            "servers_cpu_per_wall_s": _median([w["servers_cpu_per_wall_s"] for w in ws])}
    return out


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="pairs of windows (without, with a batch; order alternates)")
    p.add_argument("--seconds", type=float, default=30.0, help="interactive arrivals per window span this long")
    p.add_argument("--rate", type=float, default=2.0, help="interactive requests per second (Poisson)")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt tokens (interactive and batch)")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens (interactive and batch)")
    p.add_argument("--batch-lines", type=int, default=2000, help="lines per batch (more than a window finishes)")
    p.add_argument("--batch-max-in-flight", type=int, default=16, help="the gateway's batch.max_in_flight")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds the batch runs before a window starts")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs", help="the replica's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the windows and the summary here (JSON)")
    a = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="batch-interference-")
    text = TextTokens(load_tokenizer("demo"))
    batch = _batch_file(text, a.batch_lines, a.prompt_len, a.output_len, a.seed + 1000)
    replica = ServerProcess("--model", "demo", "--scheduling-policy", a.scheduling_policy)
    gateway = None
    try:
        cfg = {"models": [{"name": "demo", "replicas": [replica.base_url], "tokenizer": "demo"}],
               "tenants": [_tenant("chat", CHAT_KEY), _tenant("nightly", BATCH_KEY)],
               "batch": {"db_path": os.path.join(tmp, "batches.sqlite3"), "max_in_flight": a.batch_max_in_flight}}
        path = os.path.join(tmp, "gateway.yaml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        gateway = GatewayProcess(path, "--log-level", "warning")
        time.sleep(1.5)  # the gateway's first health checks and scrapes
        pids = [replica.proc.pid, gateway.proc.pid]
        windows = []
        for r in range(a.rounds):
            for with_batch in ((False, True) if r % 2 == 0 else (True, False)):
                w = window(gateway.base_url, pids, text, a, a.seed + len(windows), batch if with_batch else None)
                windows.append(w)
                print(f"window {len(windows)}: batch={with_batch} TTFT p50 {w['ttft_ms']['p50']:.0f} ms "
                      f"p95 {w['ttft_ms']['p95']:.0f} ms, {w['batch_lines_per_min']:.0f} lines/min, "
                      f"machine CPU {w['machine_util_pct']:.0f}%, errors {w['errors']}", file=sys.stderr)
    finally:
        for server in (gateway, replica):
            if server is not None:
                server.stop()
    summary = summarize(windows)
    print(f"# batch interference: {a.rounds} rounds of {a.seconds:.0f}s windows, interactive {a.rate}/s "
          f"(prompt ~{a.prompt_len}, output ~{a.output_len} tokens), batch.max_in_flight {a.batch_max_in_flight}, "
          f"replica --scheduling-policy {a.scheduling_policy} (OMP_NUM_THREADS=1), {os.cpu_count()} cores")
    print("| condition | TTFT p50 ms | TTFT p95 ms | E2E p95 ms | errors | batch lines/min | machine CPU % | "
          "replica+gateway CPU s/s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        print(f"| {label.replace('_', ' ')} | {_fmt(s['ttft_p50_ms'])} | {_fmt(s['ttft_p95_ms'])} | "
              f"{_fmt(s['e2e_p95_ms'])} | {s['errors']} | {_fmt(s['batch_lines_per_min'])} | "
              f"{_fmt(s['machine_util_pct'])} | {s['servers_cpu_per_wall_s']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "windows": windows, "summary": summary}, f, indent=1)
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


if __name__ == "__main__":
    sys.exit(main())
