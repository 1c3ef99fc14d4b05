"""Async load generator: streams /v1/completions from any OpenAI-compatible server at the workload's arrival times,
under an optional concurrency cap, while scraping the server's /metrics."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from conveyor.bench.metrics import RequestRecord
from conveyor.bench.scrape import MetricsSeries, scrape_until
from conveyor.bench.workloads import BenchRequest


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # start of the run to the end of its last request
    series: MetricsSeries


@dataclass
class ServerInfo:
    model: str | None
    max_model_len: int | None


async def server_info(base_url: str, headers: dict[str, str] | None = None) -> ServerInfo:
    """The first served model and its max_model_len from /v1/models; Nones when the server doesn't say."""
    try:
        async with httpx.AsyncClient(timeout=10.0, headers=headers) as c:
            r = await c.get(f"{base_url}/v1/models")
            r.raise_for_status()
            first = r.json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return ServerInfo(None, None)
    max_len = first.get("max_model_len")
    return ServerInfo(first.get("id"), max_len if isinstance(max_len, int) and max_len > 0 else None)


def request_body(req: BenchRequest, model: str | None) -> dict:
    body = {"prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    return body


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord,
                            t0: float) -> None:
    """Send one streaming completion and fill `rec`; every failure ends up in rec.error, never raised."""
    start = time.perf_counter()
    rec.start_s = start - t0
    try:
        await _read_stream(client, url, body, rec, start)
    except Exception as e:  # HTTP errors, broken streams, bad JSON: the request failed, the run goes on
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    rec.latency_s = time.perf_counter() - start


async def _read_stream(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, start: float) -> None:
    last = start
    chunks, done, usage = 0, False, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            rec.error = f"HTTP {r.status_code}: {_error_message(r)}"
            return
        async for chunk in sse_chunks(r):
            if chunk is None:
                done = True
                break
            if chunk.get("error"):
                rec.error = f"stream error: {_message(chunk['error'])}"
                return
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.itl_s.append(now - last)
                last, chunks = now, chunks + 1
    rec.output_tokens = usage["completion_tokens"] if usage else chunks
    rec.prompt_tokens = usage.get("prompt_tokens") if usage else None
    if not done:
        rec.error = "stream ended before [DONE]"
    elif rec.ttft_s is None:
        rec.error = "no tokens received"


async def sse_chunks(r: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON objects of an OpenAI SSE stream's `data:` lines, then None for `data: [DONE]`. Raises ValueError
    for a line that is not JSON."""
    async for line in r.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            yield None if data == "[DONE]" else json.loads(data)


def _error_message(r: httpx.Response) -> str:
    try:
        return _message(r.json().get("error"))
    except ValueError:
        return r.text[:200]


def _message(err: object) -> str:
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


async def run_requests(base_url: str, reqs: list[BenchRequest], model: str | None,
                       max_concurrency: int | None = None, progress: bool = True,
                       headers: dict[str, str] | None = None, scrape_interval_s: float = 1.0) -> RunResult:
    """Send every request at its arrival offset (a request waiting for a concurrency slot is sent when it gets
    one; its latencies count from then) and scrape /metrics alongside."""
    records = [RequestRecord(i, len(r.prompt_ids), r.output_len, r.arrival_s or 0.0) for i, r in enumerate(reqs)]
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limit = min(len(reqs), max_concurrency or len(reqs)) + 4
    timeout = httpx.Timeout(connect=30.0, read=None, write=30.0, pool=None)
    series, stop = MetricsSeries(), asyncio.Event()
    bar = tqdm(total=len(reqs), desc="bench", unit="req", disable=not progress)
    async with httpx.AsyncClient(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as c:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, t0 + rec.arrival_s - time.perf_counter()))
            async with slots or contextlib.nullcontext():
                await stream_completion(c, f"{base_url}/v1/completions", request_body(req, model), rec, t0)
            bar.update(1)

        async with httpx.AsyncClient(timeout=5.0, headers=headers) as scrape_client:
            scraper = asyncio.create_task(scrape_until(scrape_client, f"{base_url}/metrics", series, t0, stop,
                                                       scrape_interval_s))
            try:
                await asyncio.gather(*(one(q, rec) for q, rec in zip(reqs, records)))
                duration = max((r.end_s for r in records), default=0.0)
            finally:
                stop.set()
                await scraper
                bar.close()
    return RunResult(records, duration, series)
