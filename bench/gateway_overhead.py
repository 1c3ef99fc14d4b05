"""The gateway's own cost per streamed request: requests/s and CPU seconds per request of one gateway process (and of
`--workers N`), against a direct connection to the same upstream in the same run, in interleaved windows.

* The upstream is a fake replica: a raw asyncio server that answers each request with canned SSE (--chunks events,
  then a usage-only event and `data: [DONE]`, each in its own HTTP chunk as vLLM writes them): it costs almost
  nothing, so what the gateway adds shows.
* The load generator is --procs processes of raw keep-alive HTTP/1.1 clients (no HTTP library: cheap enough not to
  be the bottleneck), --conns connections in all, each a closed loop of streamed requests.
* Isolation on a 2-core box: every gateway process is pinned to core 0 (`taskset`), the upstream and the load
  generator to core 1, and the gateway's CPU time is read from /proc (summed over its worker processes). `req/s per
  gateway core` = requests / gateway CPU seconds: what one process could pass with a core of its own, the number to
  compare with a target such as 2,000 req/s per process where the upstream runs elsewhere.
* Variants (gateway config `loop`, `http`): asyncio+h11, uvloop+h11, uvloop+httptools, `--workers N`, and `before`:
  the gateway of another checkout (--before-src, e.g. `git worktree add /tmp/before cc17099`). All are started
  once; each round runs one window per variant and one direct, in turn, so all see the same machine.
* Latency: one connection, sequential requests, windows interleaved the same way (e2e and TTFT p50 / p99).
* Open streams (--open-streams N): N streams of one event a second for --stream-seconds, arrivals spread over
  --ramp-s, through the default variant; reports errors, TTFT p99, and the gateway's CPU share and RSS
  (--profile-dir: a py-spy flame graph of it, while they are open).

    .venv/bin/python bench/gateway_overhead.py [--seconds 3 --rounds 3 --conns 64 --procs 2]
        [--before-src /tmp/before] [--workers 2] [--open-streams 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import free_port, wait_healthy  # noqa: E402

KEY = "bench-key"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
VARIANTS = {"asyncio+h11": {"loop": "asyncio", "http": "h11"}, "uvloop+h11": {"loop": "uvloop", "http": "h11"},
            "uvloop+httptools": {"loop": "uvloop", "http": "httptools"}}


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# ---- the fake upstream -------------------------------------------------------------------------------------------
def _sse_chunks(n: int) -> list[bytes]:
    """The HTTP chunks of one streamed completion: n one-token events, a usage-only event, [DONE], the last chunk."""
    base = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake"}
    events = [{**base, "choices": [{"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}]}
              for i in range(n)]
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": n,
                                                     "total_tokens": 4 + n}})
    out = [b"data: %s\n\n" % json.dumps(e).encode() for e in events] + [b"data: [DONE]\n\n"]
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in out] + [b"0\r\n\r\n"]


_STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
_MODELS = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 4096}]}).encode()


class FakeReplica(asyncio.Protocol):
    """Keep-alive HTTP/1.1: POST → the canned stream (all at once, or one chunk every `interval` s); GET /v1/models
    → a model list; any other GET → an empty 200."""
    chunks: list[bytes] = []
    interval = 0.0

    def connection_made(self, transport) -> None:
        self.t, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self._answer(head)

    def _answer(self, head: bytes) -> None:
        if head.startswith(b"post"):
            if self.interval:
                asyncio.ensure_future(self._slow())
            else:
                self.t.write(_STREAM_HEAD + b"".join(self.chunks))
            return
        body = _MODELS if head.startswith(b"get /v1/models") else b""
        self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))

    async def _slow(self) -> None:
        self.t.write(_STREAM_HEAD)
        for c in self.chunks:
            if self.t.is_closing():
                return
            self.t.write(c)
            await asyncio.sleep(self.interval)


def serve_fake(port: int, chunks: int, interval: float) -> None:
    FakeReplica.chunks, FakeReplica.interval = _sse_chunks(chunks), interval
    loop = _new_loop()
    server = loop.run_until_complete(loop.create_server(FakeReplica, "127.0.0.1", port, backlog=4096))
    loop.run_until_complete(server.serve_forever())


# ---- the load generator --------------------------------------------------------------------------------------------
class Conn(asyncio.Protocol):
    """One keep-alive client connection sending `request` again as soon as each response has ended."""

    def __init__(self, request: bytes, stats: dict, stop_at: float, once: bool = False) -> None:
        self.request, self.stats, self.stop_at, self.once = request, stats, stop_at, once
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.t = transport
        self._send()

    def _send(self) -> None:
        self.buf, self.t0, self.ttft = b"", time.perf_counter(), None
        self.t.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ttft is None and b"data: {" in self.buf:
            self.ttft = time.perf_counter() - self.t0
        if not self.buf.startswith(b"HTTP/1.1 200"):
            if b"\r\n\r\n" in self.buf:  # an error answer: counted, and the connection is dropped
                self.stats["errors"] += 1
                self.stats["statuses"].append(self.buf[9:12].decode())
                self.t.close()
            return
        if self.buf.endswith(b"0\r\n\r\n"):
            now = time.perf_counter()
            self.stats["e2e"].append(now - self.t0)
            self.stats["ttft"].append(self.ttft or now - self.t0)
            if self.once or now >= self.stop_at:
                self.t.close()
            else:
                self._send()

    def connection_lost(self, exc) -> None:
        if not self.buf.endswith(b"0\r\n\r\n") and self.buf.startswith(b"HTTP/1.1 200"):
            self.stats["errors"] += 1
            self.stats["statuses"].append("cut")
        if not self.closed.done():
            self.closed.set_result(None)


def _request(port: int, auth: bool, model: str, max_tokens: int) -> bytes:
    body = json.dumps({"model": model, "prompt": "Hello gateway", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n" + (f"authorization: Bearer {KEY}\r\n" if auth else "") + "\r\n")
    return head.encode() + body


async def _load(port: int, request: bytes, conns: int, seconds: float, ramp_s: float, once: bool) -> dict:
    stats = {"e2e": [], "ttft": [], "errors": 0, "statuses": []}
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    opened = []
    for i in range(conns):
        if ramp_s:
            await asyncio.sleep(max(0.0, t0 + ramp_s * i / conns - time.perf_counter()))
        try:
            _, c = await loop.create_connection(lambda: Conn(request, stats, stop_at, once), "127.0.0.1", port)
            opened.append(c)
        except OSError:
            stats["errors"] += 1
            stats["statuses"].append("connect")
    await asyncio.gather(*(c.closed for c in opened))
    stats["elapsed"] = time.perf_counter() - t0
    return stats


def load_main(a: argparse.Namespace) -> None:
    port = int(a.load.rsplit(":", 1)[1])
    request = _request(port, a.auth, a.model, a.chunks)
    stats = _new_loop().run_until_complete(_load(port, request, a.conns, a.seconds, a.ramp_s, a.once))
    json.dump(stats, sys.stdout)


# ---- processes -----------------------------------------------------------------------------------------------------
def _pinned(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def start_fake(chunks: int, interval: float, core: int | None, logdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = os.path.join(logdir, f"fake-{port}.log")
    proc = subprocess.Popen([*_pinned(core), sys.executable, __file__, "--fake-upstream", str(port), "--chunks",
                             str(chunks), "--interval", str(interval)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    wait_healthy(proc, f"http://127.0.0.1:{port}", 30, lambda: open(log).read())
    return proc, port


def gateway_config(replicas: dict[str, int], extra: dict) -> dict:
    return {"models": [{"name": name, "replicas": [f"http://127.0.0.1:{port}"], "max_in_flight_per_replica": 10_000,
                        "max_queue": 10_000} for name, port in replicas.items()],
            "tenants": [{"name": "bench", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                         "requests_per_minute": 1e9, "tokens_per_minute": 1e12, "max_concurrent": 100_000}],
            "batch": {"db_path": os.path.join(tempfile.mkdtemp(prefix="gw-bench-batch-"), "b.sqlite3")}, **extra}


class Gateway:
    """`conveyor gateway` from checkout `src`, pinned to `core`; its CPU seconds summed over its process tree."""

    def __init__(self, name: str, src: str, cfg: dict, args: list[str], core: int | None, logdir: str) -> None:
        self.name, self.port = name, free_port()
        path = os.path.join(logdir, f"gateway-{self.port}.yaml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        log = os.path.join(logdir, f"gateway-{self.port}.log")
        env = dict(os.environ, PYTHONPATH=src, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([*_pinned(core), sys.executable, "-m", "conveyor.cli", "gateway", "--config",
                                      path, "--port", str(self.port), "--log-level", "warning", *args], cwd=src,
                                     env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        wait_healthy(self.proc, f"http://127.0.0.1:{self.port}", 60, lambda: open(log).read())

    def pids(self) -> list[int]:
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        return out

    def cpu_s(self) -> float:
        """User + system CPU seconds of the gateway and its worker processes so far."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_load(port: int, auth: bool, model: str, a: argparse.Namespace, conns: int, seconds: float,
             procs: int, ramp_s: float = 0.0, once: bool = False) -> dict:
    """Load from `procs` client processes on the load core; their stats merged."""
    per = [conns // procs + (i < conns % procs) for i in range(procs)]
    ps = [subprocess.Popen([*_pinned(a.load_core), sys.executable, __file__, "--load", f"127.0.0.1:{port}",
                            "--model", model, "--chunks", str(a.chunks), "--conns", str(n), "--seconds", str(seconds),
                            "--ramp-s", str(ramp_s), *(["--auth"] if auth else []), *(["--once"] if once else [])],
                           stdout=subprocess.PIPE) for n in per if n]
    outs = [json.loads(p.communicate()[0]) for p in ps]
    return {"e2e": [x for o in outs for x in o["e2e"]], "ttft": [x for o in outs for x in o["ttft"]],
            "errors": sum(o["errors"] for o in outs), "statuses": [s for o in outs for s in o["statuses"]],
            "elapsed": max(o["elapsed"] for o in outs)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[int(q * (len(xs) - 1))] if xs else float("nan")


# ---- the measurements ------------------------------------------------------------------------------------------------
def throughput(gateways: list[Gateway], port: int, a: argparse.Namespace) -> list[dict]:
    """Rounds of one window per target (direct first, then each gateway): rows of req/s, errors, CPU s/request."""
    names = ["direct"] + [g.name for g in gateways]
    acc = {name: {"done": 0, "elapsed": 0.0, "errors": 0, "statuses": [], "cpu": 0.0} for name in names}
    for _ in range(a.rounds):
        for g in [None, *gateways]:
            before = g.cpu_s() if g else 0.0
            s = run_load(g.port if g else port, g is not None, "fake", a, a.conns, a.seconds, a.procs)
            row = acc[g.name if g else "direct"]
            row["done"] += len(s["e2e"])
            row["elapsed"] += s["elapsed"]
            row["errors"] += s["errors"]
            row["statuses"] += s["statuses"]
            row["cpu"] += (g.cpu_s() - before) if g else 0.0
    return [{"path": name, "rps": r["done"] / r["elapsed"],
             "errors": f"{r['errors']} {sorted(set(r['statuses']))}" if r["errors"] else "0",
             "cpu_ms": 1000 * r["cpu"] / r["done"] if r["cpu"] and r["done"] else None,
             "per_core": r["done"] / r["cpu"] if r["cpu"] else None} for name, r in acc.items()]


def latency(gateways: list[Gateway], port: int, a: argparse.Namespace) -> list[dict]:
    """One connection, sequential requests, the targets' windows interleaved: e2e and TTFT percentiles."""
    acc = {name: {"e2e": [], "ttft": []} for name in ["direct"] + [g.name for g in gateways]}
    for _ in range(a.rounds):
        for g in [None, *gateways]:
            s = run_load(g.port if g else port, g is not None, "fake", a, 1, a.latency_seconds, 1)
            acc[g.name if g else "direct"]["e2e"] += s["e2e"]
            acc[g.name if g else "direct"]["ttft"] += s["ttft"]
    return [{"path": name, "p50": _pct(r["e2e"], 0.5), "p99": _pct(r["e2e"], 0.99), "ttft50": _pct(r["ttft"], 0.5),
             "ttft99": _pct(r["ttft"], 0.99), "n": len(r["e2e"])} for name, r in acc.items()]


def open_streams(g: Gateway, slow_port: int, a: argparse.Namespace) -> dict:
    """--open-streams streams of one event a second through g, arrivals over --ramp-s (py-spy while they are open)."""
    spy = None
    if a.profile_dir:
        os.makedirs(a.profile_dir, exist_ok=True)
        out = os.path.join(a.profile_dir, f"gateway-{a.open_streams}-streams.svg")
        spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-o", out,
                                "--pid", str(g.proc.pid), "--subprocesses", "--duration",
                                str(int(a.ramp_s + a.stream_seconds))], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    cpu0, t0 = g.cpu_s(), time.perf_counter()
    ps = []
    procs = max(1, a.procs)
    per = [a.open_streams // procs + (i < a.open_streams % procs) for i in range(procs)]
    for n in per:
        ps.append(subprocess.Popen([*_pinned(a.load_core), sys.executable, __file__, "--load",
                                    f"127.0.0.1:{g.port}", "--model", "slow", "--chunks", str(a.stream_seconds),
                                    "--conns", str(n), "--seconds", "0", "--ramp-s", str(a.ramp_s), "--auth",
                                    "--once"], stdout=subprocess.PIPE))
    time.sleep(a.ramp_s + a.stream_seconds / 2)
    rss = g.rss_mib()
    outs = [json.loads(p.communicate()[0]) for p in ps]
    wall, cpu = time.perf_counter() - t0, g.cpu_s() - cpu0
    if spy is not None:
        spy.wait()
    ttft = [x for o in outs for x in o["ttft"]]
    return {"streams": a.open_streams, "completed": len(ttft), "errors": sum(o["errors"] for o in outs),
            "statuses": sorted({s for o in outs for s in o["statuses"]}), "ttft_p50": _pct(ttft, 0.5),
            "ttft_p99": _pct(ttft, 0.99), "cpu_pct": 100 * cpu / wall, "rss_mib": rss}


def start_gateways(a: argparse.Namespace, ports: dict[str, int], logdir: str) -> list[Gateway]:
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    gws = []
    if a.before_src:
        gws.append(Gateway("before", os.path.abspath(a.before_src), gateway_config(ports, {}), [], a.gateway_core,
                           logdir))
    for n in names:
        gws.append(Gateway(n, ROOT, gateway_config(ports, VARIANTS[n]), [], a.gateway_core, logdir))
    if a.workers > 1:  # the worker processes share their state in Redis (on the load core: it runs elsewhere)
        extra = {**VARIANTS[names[-1]], "redis_url": f"redis://127.0.0.1:{a.redis_port}/0"}
        gws.append(Gateway(f"{names[-1]}, --workers {a.workers}", ROOT, gateway_config(ports, extra),
                           ["--workers", str(a.workers)], a.gateway_core, logdir))
    return gws


def start_redis(core: int | None) -> tuple[subprocess.Popen, int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("error: --workers needs redis-server on PATH")
    port = free_port()
    proc = subprocess.Popen([*_pinned(core), server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc, port


def report(a: argparse.Namespace, tput: list[dict], lat: list[dict], streams: dict | None) -> None:
    pin = f"gateway on core {a.gateway_core}, upstream and load on core {a.load_core}" \
        if a.gateway_core is not None else "not pinned"
    print(f"# gateway overhead: {a.rounds} rounds of {a.seconds:g} s windows per target, interleaved; {a.conns} "
          f"connections from {a.procs} load processes; {a.chunks} SSE events per response; {pin}")
    print("| path | req/s | errors | gateway CPU ms/req | req/s per gateway core | e2e p50 ms | e2e p99 ms | "
          "TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, la in zip(tput, lat):
        cpu = f"{t['cpu_ms']:.3f}" if t["cpu_ms"] else ""
        core = f"{t['per_core']:.0f}" if t["per_core"] else ""
        print(f"| {t['path']} | {t['rps']:.0f} | {t['errors']} | {cpu} | {core} | {la['p50']:.2f} | "
              f"{la['p99']:.2f} | {la['ttft50']:.2f} | {la['ttft99']:.2f} |")
    if streams:
        print(f"\n# {streams['streams']} open streams, one event a second for {a.stream_seconds} s, arrivals over "
              f"{a.ramp_s:g} s, through {a.variants.split(',')[-1]}")
        print("| streams | completed | errors | TTFT p50 ms | TTFT p99 ms | gateway CPU % | gateway RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {streams['streams']} | {streams['completed']} | {streams['errors']} {streams['statuses'] or ''} | "
              f"{streams['ttft_p50']:.1f} | {streams['ttft_p99']:.1f} | {streams['cpu_pct']:.0f} | "
              f"{streams['rss_mib']:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="length of one throughput window")
    p.add_argument("--latency-seconds", type=float, default=1.0, help="length of one latency window")
    p.add_argument("--rounds", type=int, default=3, help="windows per target, interleaved")
    p.add_argument("--conns", type=int, default=64, help="client connections of a throughput window")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--chunks", type=int, default=16, help="SSE events per fake response (besides usage, [DONE])")
    p.add_argument("--variants", default="asyncio+h11,uvloop+h11,uvloop+httptools",
                   help=f"gateway variants, comma-separated ({', '.join(VARIANTS)}); the last one is the default "
                        "for --workers and --open-streams")
    p.add_argument("--before-src", default=None, help="also run the gateway of this checkout (a `git worktree`)")
    p.add_argument("--workers", type=int, default=1, help="also run the last variant with `--workers N`")
    p.add_argument("--gateway-core", type=int, default=0, help="the core the gateways are pinned to; -1: no pinning")
    p.add_argument("--load-core", type=int, default=1, help="the core of the upstream and the load; -1: no pinning")
    p.add_argument("--open-streams", type=int, default=0, help="also hold this many slow streams open at once")
    p.add_argument("--stream-seconds", type=int, default=15, help="events (one a second) of each slow stream")
    p.add_argument("--ramp-s", type=float, default=10.0, help="slow streams' arrivals are spread over this")
    p.add_argument("--profile-dir", default=None, help="py-spy flame graph of the gateway under the open streams")
    for hidden in ("--fake-upstream", "--load"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="fake", help=argparse.SUPPRESS)
    p.add_argument("--auth", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.fake_upstream:
        serve_fake(int(a.fake_upstream), a.chunks, a.interval)
        return 0
    if a.load:
        load_main(a)
        return 0
    a.gateway_core = None if a.gateway_core < 0 else a.gateway_core
    a.load_core = None if a.load_core < 0 else a.load_core
    logdir = tempfile.mkdtemp(prefix="gw-bench-")
    procs, gws = [], []
    try:
        fake, port = start_fake(a.chunks, 0.0, a.load_core, logdir)
        procs.append(fake)
        ports = {"fake": port}
        if a.open_streams:
            slow, ports["slow"] = start_fake(a.stream_seconds, 1.0, a.load_core, logdir)
            procs.append(slow)
        if a.workers > 1:
            redis, a.redis_port = start_redis(a.load_core)
            procs.append(redis)
        gws = start_gateways(a, ports, logdir)
        time.sleep(1.5)  # the gateways' first health checks
        tput = throughput(gws, port, a)
        lat = latency(gws, port, a)
        streams = open_streams(gws[-1] if a.workers <= 1 else gws[-2], ports["slow"], a) if a.open_streams else None
    finally:
        for g in gws:
            g.stop()
        for proc in procs:
            proc.terminate()
    report(a, tput, lat, streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
