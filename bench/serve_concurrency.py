"""N concurrent streaming requests against `conveyor serve` (demo model by default).

Starts a server unless --base-url is given, sends --num-requests streaming completions all at once, and prints
request throughput, output tokens/s, and p50/p95/p99 of TTFT and inter-token latency (ITL) as the client sees them.

    .venv/bin/python bench/serve_concurrency.py --num-requests 256 --max-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"start": t0, "times": times, "tokens": tokens, "end": time.perf_counter()}


async def run(base_url: str, n: int, max_tokens: int, prompt_len: int) -> dict:
    body = {"prompt": "x" * prompt_len, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(client, f"{base_url}/v1/completions", body) for _ in range(n)])
        duration = time.perf_counter() - t0
    ttft = [(r["times"][0] - r["start"]) * 1e3 for r in results if r["times"]]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r["times"], r["times"][1:])]
    out_tokens = sum(r["tokens"] for r in results)
    return {"requests": n, "duration_s": duration, "request_throughput": n / duration,
            "output_throughput": out_tokens / duration, "output_tokens": out_tokens,
            "ttft_ms": {"mean": statistics.fmean(ttft), "p50": pct(ttft, 50), "p95": pct(ttft, 95),
                        "p99": pct(ttft, 99)},
            "itl_ms": {"mean": statistics.fmean(itl), "p50": pct(itl, 50), "p95": pct(itl, 95), "p99": pct(itl, 99)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default=None, help="an already running server; default: start one")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length in demo tokens (bytes)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()
    server = None
    base_url = args.base_url
    if base_url is None:
        from server_process import ServerProcess

        server = ServerProcess("--max-num-seqs", str(args.max_num_seqs), "--max-waiting-requests", "4096")
        base_url = server.base_url
    try:
        res = asyncio.run(run(base_url, args.num_requests, args.max_tokens, args.prompt_len))
    finally:
        if server:
            server.stop()
    print(f"{'requests':<28}{res['requests']}")
    print(f"{'duration (s)':<28}{res['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<28}{res['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<28}{res['output_throughput']:.1f}")
    for key, name in (("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL (ms)")):
        d = res[key]
        print(f"{name:<28}mean {d['mean']:.1f}  p50 {d['p50']:.1f}  p95 {d['p95']:.1f}  p99 {d['p99']:.1f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
