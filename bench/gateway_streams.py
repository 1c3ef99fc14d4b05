"""Thousands of concurrent SSE streams through one gateway: what completes, what is refused (and how fast), what
times out, and what the gateway costs (RSS, CPU) and adds to TTFT.

N streams arrive spread evenly over --ramp seconds; each stays open --stream-seconds: the fake upstream sends one
chunk a second, then the usage chunk and [DONE]. There are two upstreams (the gateway balances over both). A share
of the streams (--direct-share, interleaved with the others) goes straight to an upstream: the baseline in the same
run, so TTFT added by the gateway = gateway TTFT - direct TTFT.

  * fake upstream: a minimal asyncio HTTP/1.1 server in this script (costs little), one process per upstream;
  * --upstream demo: two `conveyor serve --model demo` replicas instead (they generate --demo-tokens as fast as
    they can, not one a second).

The load generator is raw asyncio HTTP/1.1 (one connection per stream, no pooling), in --loaders processes. Gateway
RSS and CPU are summed over its processes (with --workers, the supervisor and its workers) from /proc; its
/metrics is scraped once a second for the open requests and the event-loop lag it reports.

    .venv/bin/python bench/gateway_streams.py --streams 500 2000 5000 [--guard on|off|both] [--workers 2]

Outcomes: completed ([DONE] read), refused (503; the share with Retry-After and the time to the refusal), errors
(any other status, a reset, a stream cut before [DONE]), timeouts (not done within --timeout seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import GatewayProcess, ServerProcess, free_port, wait_healthy  # noqa: E402

from conveyor.prometheus_text import samples  # noqa: E402

KEY = "bench-key"
TICK = os.sysconf("SC_CLK_TCK")


def _fast_loop() -> None:
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# ---- the fake upstream: one chunk a second ----------------------------------------------------------------------
def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class FakeUpstream:
    """An OpenAI-ish completions server: a request's `max_tokens` chunks (`seconds` without one), one a second
    from the first, then the usage chunk and [DONE] a second after the last. Every request streams."""

    def __init__(self, seconds: int) -> None:
        self.base = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake"}
        self.seconds = seconds
        self.tick = _event({**self.base, "choices": [{"index": 0, "text": "x", "finish_reason": None}]})
        models = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model",
                                                         "max_model_len": 4096}]}).encode()
        self.plain = {b"/health": b"", b"/metrics": b"", b"/v1/models": models}

    def tail(self, n: int) -> bytes:
        usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}
        return _event({**self.base, "choices": [], "usage": usage}) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                if path in self.plain:
                    body = self.plain[path]
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))
                    continue
                n = json.loads(body).get("max_tokens") or self.seconds
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + self.tick)
                for i in range(n):
                    await asyncio.sleep(1.0)
                    if writer.is_closing():  # the client left
                        return
                    writer.write(self.tick if i < n - 1 else self.tail(n))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


def run_fake_upstream(port: int, seconds: int) -> None:
    _fast_loop()

    async def serve() -> None:
        server = await asyncio.start_server(FakeUpstream(seconds).handle, "127.0.0.1", port, backlog=8192)
        async with server:
            await server.serve_forever()
    asyncio.run(serve())


# ---- the load generator ------------------------------------------------------------------------------------------
async def one_stream(port: int, request: bytes, timeout: float) -> tuple:
    """One request on its own connection → (outcome, status, seconds to the first event or to the refusal,
    Retry-After present, seconds to connect). Outcomes: completed, refused, error, timeout; a timeout's status says
    where it stalled (connect, head: no response head yet, first: no event yet, body: events but no [DONE])."""
    t0 = time.perf_counter()
    writer, phase, connected = None, "connect", None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connected = time.perf_counter() - t0
            writer.write(request)
            phase = "head"
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            if status != 200:
                return ("refused" if status == 503 else "error", status, time.perf_counter() - t0,
                        b"\r\nretry-after:" in head.lower(), connected)
            first, done, tail, phase = None, False, b"", "first"
            while True:
                data = await reader.read(65536)
                if not data:
                    return ("completed" if done else "error", 200, first, False, connected)
                seen = tail + data
                if first is None and b"data: {" in seen:
                    first, phase = time.perf_counter() - t0, "body"
                done = done or b"data: [DONE]" in seen
                if done and seen.endswith(b"0\r\n\r\n"):
                    return ("completed", 200, first, False, connected)
                tail = seen[-16:]
    except TimeoutError:
        return ("timeout", phase, None, False, connected)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        return ("error", type(e).__name__, None, False, connected)
    finally:
        if writer is not None:
            writer.close()


def request_bytes(model: str, key: str | None, max_tokens: int) -> bytes:
    body = json.dumps({"model": model, "prompt": "Hello streams", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True}).encode()
    auth = b"authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n%s" % (len(body), auth, body))


def run_loader() -> None:
    """A loader process: a JSON plan on stdin, one JSON result per stream on stdout (in plan order)."""
    _fast_loop()
    plan = json.load(sys.stdin)
    requests = {k: v.encode("latin-1") for k, v in plan["requests"].items()}

    async def go() -> list:
        async def at(offset: float, port: int, kind: str) -> tuple:
            await asyncio.sleep(max(0.0, plan["start"] + offset - time.time()))
            return (kind, *await one_stream(port, requests[kind], plan["timeout"]))
        return await asyncio.gather(*(at(o, p, k) for o, p, k in plan["streams"]))
    results = asyncio.run(go())
    json.dump({"results": results, "cpu_s": time.process_time()}, sys.stdout)


# ---- measuring processes -------------------------------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total / 1024


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel for the listening socket on `port` to accept them (IPv4 loopback)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return 0


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # all, idle + iowait


class Sampler(threading.Thread):
    """Twice a second: the gateway's peak RSS (summed over its processes), the longest accept queue of its
    listening socket, and, from its /metrics (over a connection opened before the load), the highest open requests
    and event-loop lag it reported; also how long the slowest scrape took and how many failed."""

    def __init__(self, pid: int, url: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.url, self.stop = pid, url, threading.Event()
        self.rss = self.lag = self.open = self.scrape_max = 0.0
        self.scrape_failed = self.backlog = 0
        self.client = httpx.Client(timeout=5, trust_env=False)  # connected before the load: never in the backlog

    def run(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        while not self.stop.wait(0.5):
            self.rss = max(self.rss, rss_mb(tree(self.pid)))
            self.backlog = max(self.backlog, accept_queue(port))
            t0 = time.perf_counter()
            try:
                text = self.client.get(self.url + "/metrics").text
                self.scrape_max = max(self.scrape_max, time.perf_counter() - t0)
                for s in samples(text):
                    if s.name == "conveyor_gateway_event_loop_lag_seconds":
                        self.lag = max(self.lag, s.value)
                    elif s.name == "conveyor_gateway_open_requests":
                        self.open = max(self.open, s.value)
            except httpx.HTTPError:
                self.scrape_failed += 1
                self.scrape_max = max(self.scrape_max, time.perf_counter() - t0)


# ---- one run -------------------------------------------------------------------------------------------------------
def plan_streams(n: int, ramp: float, direct_share: float, gw_port: int, up_ports: list[int],
                 loaders: int) -> list[list]:
    """Stream i starts at i * ramp / n; every round(1 / direct_share)-th goes direct, to the upstreams in turn."""
    every = round(1 / direct_share) if direct_share > 0 else 0
    plans: list[list] = [[] for _ in range(loaders)]
    for i in range(n):
        direct = every and i % every == every - 1
        port = up_ports[(i // max(every, 1)) % len(up_ports)] if direct else gw_port
        plans[i % loaders].append([i * ramp / n, port, "direct" if direct else "gateway"])
    return plans


def warm_up(client: httpx.Client, gw: str, model: str) -> None:
    """A few short streams through the gateway first: its first request pays one-time costs (lazy imports, first
    validation) that are no part of the load."""
    done = 0
    for _ in range(40):
        r = client.post(gw + "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                        json={"model": model, "prompt": "warm up", "max_tokens": 1, "stream": True})
        assert r.status_code in (200, 503), r.text  # 503: the gateway, just started, is still catching up
        done += r.status_code == 200
        if done == 3:
            return
        time.sleep(0.1 if r.status_code == 200 else 0.5)
    raise RuntimeError("the gateway refused its warm-up requests for 20 s")


def run_load(a, n: int, gw: str, ups: list[str], gw_pid: int, model: str, max_tokens: int) -> dict:
    port = lambda url: int(url.rsplit(":", 1)[1])
    sampler = Sampler(gw_pid, gw)
    warm_up(sampler.client, gw, model)
    plans = plan_streams(n, a.ramp, a.direct_share, port(gw), [port(u) for u in ups], a.loaders)
    start = time.time() + 2.0  # the loaders' start, the same for all of them
    requests = {"gateway": request_bytes(model, KEY, max_tokens).decode("latin-1"),
                "direct": request_bytes(model, None, max_tokens).decode("latin-1")}
    procs = []
    for streams in plans:
        p = subprocess.Popen([sys.executable, __file__, "--loader"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        p.stdin.write(json.dumps({"start": start, "timeout": a.timeout, "streams": streams,
                                  "requests": requests}).encode())
        p.stdin.close()
        procs.append(p)
    time.sleep(max(0.0, start - time.time()))
    sampler.start()
    gw_pids = tree(gw_pid)
    cpu0, m0, t0 = cpu_s(gw_pids), machine_busy(), time.perf_counter()
    outs = [json.loads(p.stdout.read()) for p in procs]
    results = [r for out in outs for r in out["results"]]
    wall = time.perf_counter() - t0
    cpu1, m1 = cpu_s(tree(gw_pid)), machine_busy()
    sampler.stop.set()
    sampler.join()
    reasons = refusal_reasons(sampler.client.get(gw + "/metrics").text)
    for p in procs:
        p.wait()
    return summarize(results, {"gw_cpu_pct": 100 * (cpu1 - cpu0) / wall, "gw_rss_mb": sampler.rss,
                               "machine_pct": 100 * (1 - (m1[1] - m0[1]) / max(1, m1[0] - m0[0])),
                               "max_lag_s": sampler.lag, "max_open": sampler.open, "wall_s": wall,
                               "scrape_max_s": sampler.scrape_max, "scrape_failed": sampler.scrape_failed,
                               "accept_queue": sampler.backlog,
                               "loader_cpu_pct": 100 * sum(o["cpu_s"] for o in outs) / wall,
                               "reasons": reasons})


def refusal_reasons(metrics: str) -> dict[str, int]:
    """The gateway's own refusals by reason, from conveyor_gateway_rejections_total."""
    out: dict[str, int] = {}
    for s in samples(metrics):
        reason = s.labels.get("reason", "")
        if s.name == "conveyor_gateway_rejections_total" and reason.startswith("overloaded_"):
            out[reason[len("overloaded_"):]] = out.get(reason[len("overloaded_"):], 0) + int(s.value)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(results: list, extra: dict) -> dict:
    gw = [r for r in results if r[0] == "gateway"]
    direct = [r for r in results if r[0] == "direct"]
    count = lambda rs, o: sum(1 for r in rs if r[1] == o)
    refused = [r for r in gw if r[1] == "refused"]
    ttft = lambda rs: [r[3] for r in rs if r[1] == "completed" and r[3] is not None]
    errors: dict[str, int] = {}  # errors by status or exception, timeouts by where they stalled
    for r in gw:
        if r[1] in ("error", "timeout"):
            kind = f"{r[1]} {r[2]}"
            errors[kind] = errors.get(kind, 0) + 1
    return {"gateway": len(gw), "completed": count(gw, "completed"), "refused": len(refused),
            "retry_after": sum(1 for r in refused if r[4]), "refusal_p50_ms": _pct([r[3] for r in refused], 0.5),
            "refusal_max_ms": _pct([r[3] for r in refused], 1.0), "errors": count(gw, "error"), "error_kinds": errors,
            "timeouts": count(gw, "timeout"), "direct": len(direct), "direct_completed": count(direct, "completed"),
            "direct_failed": len(direct) - count(direct, "completed"),
            "ttft_gw_p50": _pct(ttft(gw), 0.5), "ttft_gw_p99": _pct(ttft(gw), 0.99),
            "ttft_direct_p50": _pct(ttft(direct), 0.5), "ttft_direct_p99": _pct(ttft(direct), 0.99),
            "connect_gw_p99": _pct([r[5] for r in gw if r[5] is not None], 0.99), **extra}


# ---- processes -----------------------------------------------------------------------------------------------------
def start_fake(seconds: int, log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--fake-upstream", str(port), "--stream-seconds",
                             str(seconds)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, url, 30, lambda: open(log).read())
    except BaseException:
        proc.kill()
        raise
    return proc, url


def start_redis() -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server for the state gateway workers share (`--workers` > 1 needs one)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def gateway_config(tmp: str, model: str, ups: list[str], guard: bool, a, redis_url: str | None) -> str:
    overload = {} if guard else {"max_open_requests": 10_000_000, "max_event_loop_lag_s": 1e9,
                                 "max_accept_queue": None}
    if guard:
        for key, value in (("max_event_loop_lag_s", a.max_lag), ("max_open_requests", a.max_open),
                           ("max_accept_queue", a.max_accept_queue)):
            if value is not None:
                overload[key] = value
    cfg = {"models": [{"name": model, "replicas": ups, "max_in_flight_per_replica": 100_000, "max_queue": 100_000,
                       **({"tokenizer": "demo"} if model == "demo" else {})}],
           "tenants": [{"name": "bench", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                        "requests_per_minute": 1e9, "tokens_per_minute": 1e12, "max_concurrent": 1_000_000}],
           "overload": overload, "batch": {"db_path": os.path.join(tmp, "batches.sqlite3")},
           "client_read_timeout_s": 120.0, **({"redis_url": redis_url} if redis_url else {})}
    path = os.path.join(tmp, f"gateway-{'guard' if guard else 'noguard'}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return path


def bench(a) -> list[tuple]:
    tmp = tempfile.mkdtemp(prefix="gw-streams-")
    fakes, servers, rows, redis_proc, redis_url = [], [], [], None, None
    try:
        if a.workers > 1:
            redis_proc, redis_url = start_redis()
        if a.upstream == "fake":
            fakes = [start_fake(a.stream_seconds, os.path.join(tmp, f"fake{i}.log")) for i in range(2)]
            ups, model, max_tokens = [u for _, u in fakes], "fake", a.stream_seconds
        else:
            servers = [ServerProcess("--model", "demo", "--disable-log-requests") for _ in range(2)]
            ups, model, max_tokens = [s.base_url for s in servers], "demo", a.demo_tokens
        guards = {"on": [True], "off": [False], "both": [False, True]}[a.guard]
        for n in a.streams:
            for guard in guards:
                extra = ("--workers", str(a.workers)) if a.workers > 1 else ()
                cfg = gateway_config(tmp, model, ups, guard, a, redis_url)
                gw = GatewayProcess(cfg, "--log-level", "warning", *extra)
                try:
                    time.sleep(1.5)  # the pools' first health checks
                    rows.append((n, guard, run_load(a, n, gw.base_url, ups, gw.proc.pid, model, max_tokens)))
                finally:
                    gw.stop()
                print(f"# done: {n} streams, guard {'on' if guard else 'off'}: {json.dumps(rows[-1][2])}",
                      file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
        for p in [p for p, _ in fakes] + ([redis_proc] if redis_proc else []):
            p.terminate()
            p.wait(10)
    return rows


def print_table(a, rows: list[tuple]) -> None:
    print(f"# {a.upstream} upstream x2, {a.workers} gateway process(es), arrivals over {a.ramp:g} s, streams open "
          f"{a.stream_seconds} s, {a.direct_share:.0%} direct, timeout {a.timeout:g} s, {a.loaders} loader "
          f"processes, {os.cpu_count()} CPUs")
    print("| streams | guard | completed | refused (with Retry-After) | refused for | refusal p50 / max ms | errors | "
          "timeouts | TTFT p50 / p99 ms: gateway | direct | added |")
    print("|" + "---|" * 11)
    for n, guard, r in rows:
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items()) or "-"
        print(f"| {n} | {'on' if guard else 'off'} | {r['completed']}/{r['gateway']} | {r['refused']} "
              f"({r['retry_after']}) | {reasons} | {r['refusal_p50_ms']:.0f} / {r['refusal_max_ms']:.0f} | "
              f"{r['errors']} | {r['timeouts']} | {r['ttft_gw_p50']:.1f} / {r['ttft_gw_p99']:.1f} | "
              f"{r['ttft_direct_p50']:.1f} / {r['ttft_direct_p99']:.1f} | "
              f"{r['ttft_gw_p50'] - r['ttft_direct_p50']:+.1f} / {r['ttft_gw_p99'] - r['ttft_direct_p99']:+.1f} |")
    print()
    print("| streams | guard | gateway CPU % of a core | RSS MB | max open | max lag s | slowest /metrics s "
          "(failed) | max accept queue | connect p99 ms | loaders CPU % | machine CPU % |")
    print("|" + "---|" * 11)
    for n, guard, r in rows:
        print(f"| {n} | {'on' if guard else 'off'} | {r['gw_cpu_pct']:.0f} | {r['gw_rss_mb']:.0f} | "
              f"{r['max_open']:.0f} | {r['max_lag_s']:.2f} | {r['scrape_max_s']:.2f} ({r['scrape_failed']}) | "
              f"{r['accept_queue']} | {r['connect_gw_p99']:.0f} | {r['loader_cpu_pct']:.0f} | "
              f"{r['machine_pct']:.0f} |")
    failed = [(n, g, r["error_kinds"]) for n, g, r in rows if r["error_kinds"]]
    if failed:
        print("errors and timeouts by kind: " + "; ".join(f"{n}/{'on' if g else 'off'}: {k}" for n, g, k in failed))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[500, 2000, 5000], help="concurrent streams per run")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which the streams arrive")
    p.add_argument("--stream-seconds", type=int, default=15, help="chunks per fake stream, one a second")
    p.add_argument("--direct-share", type=float, default=0.1, help="share of the streams sent straight upstream")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a stream may take, start to [DONE]")
    p.add_argument("--loaders", type=int, default=2, help="load-generator processes")
    p.add_argument("--guard", choices=["on", "off", "both"], default="on",
                   help="the gateway's overload guard (off: its limits set out of reach)")
    p.add_argument("--max-lag", type=float, default=None, help="overload.max_event_loop_lag_s (default: the config's)")
    p.add_argument("--max-open", type=int, default=None, help="overload.max_open_requests (default: from the fds)")
    p.add_argument("--max-accept-queue", type=int, default=None,
                   help="overload.max_accept_queue (default: the config's)")
    p.add_argument("--workers", type=int, default=1,
                   help="gateway processes (`conveyor gateway --workers N`, sharing state in a redis-server started "
                        "for the run)")
    p.add_argument("--upstream", choices=["fake", "demo"], default="fake")
    p.add_argument("--demo-tokens", type=int, default=16, help="max_tokens per stream against the demo replicas")
    p.add_argument("--fake-upstream", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--loader", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fake_upstream is not None:
        run_fake_upstream(a.fake_upstream, a.stream_seconds)
        return 0
    if a.loader:
        run_loader()
        return 0
    print_table(a, bench(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
