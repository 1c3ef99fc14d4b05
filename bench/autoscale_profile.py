"""Measure the performance profile of one replica for `conveyor autoscale simulate`.

Starts a real `conveyor serve` (demo model by default), runs `conveyor bench serve` closed-loop at several
concurrencies (`--max-concurrency c`, all requests sent at once) and records, per concurrency: TTFT and TPOT
(p50/p95), output tokens/s and requests/s; plus the replica's start-up time (process start to /health 200),
measured over a few cold starts. Writes the profile JSON the simulator reads.

    OMP_NUM_THREADS=1 .venv/bin/python bench/autoscale_profile.py \
        --output conveyor/autoscale/profiles/demo.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import ServerProcess  # noqa: E402


def start_up_seconds(serve_args: list[str]) -> float:
    t0 = time.perf_counter()
    server = ServerProcess(*serve_args)
    elapsed = time.perf_counter() - t0
    server.stop()
    return elapsed


def kv_capacity_tokens(model: str, max_num_seqs: int) -> int:
    from conveyor import LLM

    llm = LLM(model=model, max_num_seqs=max_num_seqs, kv_cache_memory=64 << 20)
    return llm.stats()["kv_blocks_total"] * llm.engine.config.cache.block_size


def bench_point(base_url: str, c: int, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "conveyor.cli", "bench", "serve", "--base-url", base_url, "--workload", "chat",
               "--num-requests", str(max(a.min_requests, a.rounds * c)), "--max-concurrency", str(c),
               "--prompt-len", str(a.prompt_len), "--output-len", str(a.output_len), "--disable-tqdm",
               "--seed", str(c), "--output", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            r = json.load(f)
    return {"concurrency": c, "completed": r["completed"], "failed": r["failed"],
            "ttft_ms_p50": r["ttft_ms"]["p50"], "ttft_ms_p95": r["ttft_ms"]["p95"],
            "tpot_ms_p50": r["tpot_ms"]["p50"], "tpot_ms_p95": r["tpot_ms"]["p95"],
            "output_tokens_per_s": r["output_throughput"], "requests_per_s": r["request_throughput"],
            "mean_prompt_tokens": r["total_input_tokens"] / max(1, r["completed"]),
            "mean_output_tokens": r["total_output_tokens"] / max(1, r["completed"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--concurrencies", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="requests per point = rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--start-ups", type=int, default=3, help="cold starts to time")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    serve_args = ["--model", a.model, "--max-num-seqs", str(a.max_num_seqs), "--kv-cache-memory", str(64 << 20),
                  "--max-waiting-requests", "4096"]
    kv_tokens = kv_capacity_tokens(a.model, a.max_num_seqs)
    starts = [start_up_seconds(serve_args) for _ in range(a.start_ups)]
    server = ServerProcess(*serve_args)
    try:
        points = []
        for c in a.concurrencies:
            points.append(bench_point(server.base_url, c, a))
            print(json.dumps(points[-1]), file=sys.stderr)
    finally:
        server.stop()
    profile = {"model": a.model, "max_num_seqs": a.max_num_seqs, "startup_s": sorted(starts)[len(starts) // 2],
               "kv_capacity_tokens": kv_tokens,
               "startup_s_samples": [round(s, 2) for s in starts], "points": points,
               "measured": {"command": "python " + " ".join(sys.argv), "omp_num_threads":
                            os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"# profile written to {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
