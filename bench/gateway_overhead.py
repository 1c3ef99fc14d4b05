"""The gateway's own overhead: latency it adds (p50 / p99) and the requests per second one gateway process sustains,
side by side with a direct connection in the same run, against

  * a fast fake upstream (a tiny FastAPI app streaming canned SSE: the baseline costs almost nothing), and
  * a real replica (`conveyor serve --model demo`).

Every request streams (`stream: true` with usage), as chat clients do. Latency runs are sequential (one client),
direct and gateway requests alternating so both see the same machine; throughput runs are closed loops of
--concurrency clients (at most 16 against the demo replica), direct and gateway in alternating windows, --seconds
each way. Each server is its own process; the load generator is this process.

    .venv/bin/python bench/gateway_overhead.py [--requests 300] [--concurrency 32] [--seconds 8]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import GatewayProcess, ServerProcess, free_port, wait_healthy  # noqa: E402

KEY = "bench-key"


# ---- the fake upstream -------------------------------------------------------------------------------------------
def fake_upstream_app(chunks: int) -> FastAPI:
    app = FastAPI()

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        base = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": body.get("model")}
        usage = {"prompt_tokens": 4, "completion_tokens": chunks, "total_tokens": 4 + chunks}
        if not body.get("stream"):
            return JSONResponse({**base, "choices": [{"index": 0, "text": "x" * chunks, "finish_reason": "length"}],
                                 "usage": usage})

        async def events():
            for i in range(chunks):
                yield sse({**base, "choices": [{"index": 0, "text": "x", "finish_reason":
                                                "length" if i == chunks - 1 else None}]})
            yield sse({**base, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return Response()

    @app.get("/metrics")
    async def metrics():
        return Response("")

    return app


def run_fake_upstream(port: int, chunks: int) -> None:
    import uvicorn

    uvicorn.run(fake_upstream_app(chunks), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- processes -----------------------------------------------------------------------------------------------------
def start_fake_upstream(chunks: int, log: str) -> tuple[subprocess.Popen, str]:
    """This script as the fake upstream on a free port: (its process, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--fake-upstream", str(port), "--chunks", str(chunks)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, url, 60, lambda: open(log).read())
    except BaseException:
        proc.kill()
        raise
    return proc, url


# ---- load --------------------------------------------------------------------------------------------------------
async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, headers: dict) -> tuple[float, float]:
    """One streamed request → (time to first token, end to end) in seconds."""
    body = {"model": model, "prompt": "Hello gateway", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0


async def latency(base: str, gw: str, model: str, n: int, max_tokens: int, auth: dict) -> tuple[dict, dict, float]:
    """Direct and gateway requests alternate, so both see the same machine; also the median paired difference."""
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        for _ in range(10):  # warm up connections
            await one(client, base, model, max_tokens, {})
            await one(client, gw, model, max_tokens, auth)
        pairs = [(await one(client, base, model, max_tokens, {}), await one(client, gw, model, max_tokens, auth))
                 for _ in range(n)]
    return (_summary([d for d, _ in pairs]), _summary([g for _, g in pairs]),
            1000 * statistics.median(g[1] - d[1] for d, g in pairs))


def _summary(samples: list[tuple[float, float]]) -> dict:
    e2e = sorted(s[1] for s in samples)
    return {"p50_ms": 1000 * statistics.median(e2e), "p99_ms": 1000 * e2e[int(0.99 * (len(e2e) - 1))],
            "ttft_p50_ms": 1000 * statistics.median(s[0] for s in samples)}


async def throughput(url: str, model: str, concurrency: int, seconds: float, max_tokens: int, headers: dict) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, trust_env=False, limits=limits) as client:
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await one(client, url, model, max_tokens, headers)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def alternating_throughput(base: str, gw: str, model: str, concurrency: int, seconds: float, max_tokens: int,
                           auth: dict, rounds: int = 4) -> tuple[float, float]:
    """Direct and gateway windows alternate (`rounds` each): the mean rate of each."""
    direct, via = [], []
    for _ in range(rounds):
        direct.append(asyncio.run(throughput(base, model, concurrency, seconds / rounds, max_tokens, {})))
        via.append(asyncio.run(throughput(gw, model, concurrency, seconds / rounds, max_tokens, auth)))
    return statistics.mean(direct), statistics.mean(via)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="sequential requests per latency run")
    p.add_argument("--concurrency", type=int, default=32, help="clients of a throughput run")
    p.add_argument("--seconds", type=float, default=8.0, help="length of a throughput run")
    p.add_argument("--chunks", type=int, default=16, help="SSE chunks per fake response")
    p.add_argument("--demo-tokens", type=int, default=16, help="max_tokens against the demo replica")
    p.add_argument("--fake-upstream", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fake_upstream is not None:
        run_fake_upstream(a.fake_upstream, a.chunks)
        return 0

    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    fake_proc, servers = None, []
    try:
        fake_proc, fake = start_fake_upstream(a.chunks, os.path.join(tmp, "fake.log"))
        servers.append(ServerProcess("--model", "demo"))
        demo = servers[0].base_url
        cfg = {"models": [{"name": "fake", "replicas": [fake], "max_in_flight_per_replica": 4096, "max_queue": 4096},
                          {"name": "demo", "replicas": [demo], "tokenizer": "demo"}],
               "tenants": [{"name": "bench", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                            "requests_per_minute": 1e9, "tokens_per_minute": 1e12, "max_concurrent": 100_000}]}
        cfg_path = os.path.join(tmp, "gateway.yaml")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        servers.append(GatewayProcess(cfg_path, "--log-level", "warning"))
        gw = servers[1].base_url
        time.sleep(1.5)  # first health checks of the gateway's pools
        auth = {"authorization": f"Bearer {KEY}"}
        rows = []
        for label, model, max_tokens in (("fake upstream", "fake", a.chunks), ("demo replica", "demo",
                                                                                a.demo_tokens)):
            base = fake if model == "fake" else demo
            direct, via, paired = asyncio.run(latency(base, gw, model, a.requests, max_tokens, auth))
            conc = a.concurrency if model == "fake" else min(a.concurrency, 16)
            rps_direct, rps_via = alternating_throughput(base, gw, model, conc, a.seconds, max_tokens, auth)
            rows.append((label, direct, via, paired, conc, rps_direct, rps_via))
    finally:
        for server in servers:
            server.stop()
        if fake_proc is not None:
            fake_proc.terminate()
            fake_proc.wait(10)

    print(f"# gateway overhead: {a.requests} sequential streamed requests each way, direct and gateway alternating; "
          f"closed loops of {a.seconds:.0f}s each way in alternating windows")
    print("| upstream | path | e2e p50 ms | e2e p99 ms | TTFT p50 ms | added p50 ms | added p99 ms | "
          "added, paired median ms | clients | req/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, direct, via, paired, conc, rps_direct, rps_via in rows:
        print(f"| {label} | direct | {direct['p50_ms']:.2f} | {direct['p99_ms']:.2f} | {direct['ttft_p50_ms']:.2f} "
              f"| | | | {conc} | {rps_direct:.0f} |")
        print(f"| {label} | gateway | {via['p50_ms']:.2f} | {via['p99_ms']:.2f} | {via['ttft_p50_ms']:.2f} | "
              f"{via['p50_ms'] - direct['p50_ms']:+.2f} | {via['p99_ms'] - direct['p99_ms']:+.2f} | {paired:+.2f} | "
              f"{conc} | {rps_via:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
