"""Soak: steady open-loop load through a real `conveyor gateway` into two real `conveyor serve --model demo`
replicas for --duration seconds (default 30 minutes; not part of CI).

Requests arrive as a Poisson process at --rate per second, whatever the stack's speed (open loop), from three
tenants (interactive, interactive, batch) with keys generated per run: completions and chat, streaming or not, most
sharing one of a few long system prompts (prefix caching and affinity), some unique, some identical and
deterministic (coalescing), some with an Idempotency-Key (and a few replays of one). Every minute one line: requests
sent, finished ok, errors by status, p50/p99 latency (and time to first token of streams), RSS and CPU of every
process. At the end: RSS of each process at the end of warm-up and at the end of the run, its growth (the bound:
under 5 %), CPU utilization, the stack's state once idle (in-flight and queued requests, KV usage, errors in the
logs, whether a secret reached a log), and everything in a JSON file. Exit status 0 when every check passes.

    .venv/bin/python bench/soak.py                                  # 30 minutes, 2 min warm-up
    .venv/bin/python bench/soak.py --duration 120 --warmup 30 --output /tmp/soak.json    # smoke run

API keys never appear on a command line: the gateway's YAML holds only their sha256, and the replicas' key (which
the gateway sends upstream) travels in environment variables.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import GatewayProcess, ServerProcess  # noqa: E402

from conveyor.bench.client import sse_chunks  # noqa: E402

MODEL = "demo"
REPLICA_KEY_ENV = "SOAK_REPLICA_API_KEY"  # the gateway's environment: the key it sends to the replicas
TENANTS = (("alpha", "interactive", 0.5), ("beta", "interactive", 0.3), ("gamma", "batch", 0.2))  # name, class, share
RSS_BOUND_PCT = 5.0
WORDS = ("request replica gateway token cache prefix stream tenant latency budget queue engine block batch decode "
         "prefill sample window metric health drain scale shard route model prompt answer system user").split()


# ---- /proc -------------------------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    """Resident set size (VmRSS) of a live process in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: dict[str, float | None]
    cpu_s: dict[str, float | None]


def sample(pids: dict[str, int], t: float) -> Sample:
    return Sample(t, {n: rss_mib(p) for n, p in pids.items()}, {n: cpu_seconds(p) for n, p in pids.items()})


def cpu_pct(a: Sample, b: Sample) -> dict[str, float | None]:
    """Each process's CPU use between two samples, in % of one core."""
    dt = max(b.t - a.t, 1e-9)
    return {n: None if a.cpu_s[n] is None or b.cpu_s[n] is None else 100 * (b.cpu_s[n] - a.cpu_s[n]) / dt
            for n in a.cpu_s}


# ---- the workload ------------------------------------------------------------------------------------------------
@dataclass
class Shot:
    tenant: str
    path: str  # /v1/completions | /v1/chat/completions
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


class Workload:
    """Seeded request mix: 70 % share one of 8 long system prompts, 20 % are unique, 10 % are one of 4 identical
    greedy requests; half stream, half are chat; 10 % carry an Idempotency-Key, 1 % replay a tenant's last one."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.systems = [self.text(300 + 40 * i) for i in range(8)]  # >= the gateway's affinity_prefix_chars
        self.popular = [self.text(120) for _ in range(4)]
        self.last_idempotent: dict[str, Shot] = {}

    def text(self, chars: int) -> str:
        """Random words, exactly `chars` characters (one demo token each)."""
        words, n = [], 0
        while n < chars:
            words.append(self.rng.choice(WORDS))
            n += len(words[-1]) + 1
        return " ".join(words)[:chars]

    def next(self) -> Shot:
        r = self.rng
        tenant = r.choices([t[0] for t in TENANTS], [t[2] for t in TENANTS])[0]
        if tenant in self.last_idempotent and r.random() < 0.01:
            return self.last_idempotent.pop(tenant)
        kind = r.random()
        if kind < 0.1:  # identical and deterministic: may be coalesced with a concurrent twin
            system, user, params = None, r.choice(self.popular), {"temperature": 0.0, "max_tokens": 32}
        else:
            system = r.choice(self.systems) if kind < 0.8 else self.text(r.randint(300, 600))
            user = self.text(r.randint(20, 80))
            params = {"temperature": 0.8, "max_tokens": r.randint(16, 64)}
        shot = Shot(tenant, "", {"model": MODEL, "ignore_eos": True, **params})
        if r.random() < 0.5:
            shot.path = "/v1/chat/completions"
            shot.body["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": user}]
        else:
            shot.path = "/v1/completions"
            shot.body["prompt"] = f"{system}\n\n{user}" if system else user
        if r.random() < 0.5:
            shot.body |= {"stream": True, "stream_options": {"include_usage": True}}
        if r.random() < 0.1:
            shot.headers["idempotency-key"] = secrets.token_hex(8)
            self.last_idempotent[tenant] = shot
        return shot


# ---- one request -------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # "ok", an HTTP status, or what went wrong: timeout, connect, stream_error, wrong_length, ...
    latency_s: float
    ttft_s: float | None = None


async def send(client: httpx.AsyncClient, url: str, shot: Shot, key: str) -> Outcome:
    """Send one request and check its answer; never raises (every failure is an Outcome)."""
    t0 = time.perf_counter()
    headers = {"authorization": f"Bearer {key}", **shot.headers}
    try:
        async with client.stream("POST", url + shot.path, json=shot.body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(str(r.status_code), time.perf_counter() - t0)
            if shot.body.get("stream"):
                status, ttft, usage = await read_stream(r, t0)
            else:
                status, ttft, usage = "ok", None, json.loads(await r.aread()).get("usage")
            return Outcome(check_usage(usage, shot) if status == "ok" else status, time.perf_counter() - t0, ttft)
    except httpx.TimeoutException:
        return Outcome("timeout", time.perf_counter() - t0)
    except httpx.ConnectError:
        return Outcome("connect", time.perf_counter() - t0)
    except (httpx.HTTPError, ValueError) as e:
        return Outcome(type(e).__name__, time.perf_counter() - t0)


async def read_stream(r: httpx.Response, t0: float) -> tuple[str, float | None, dict | None]:
    """(status, time to first token, usage) of an SSE response."""
    ttft, usage, done = None, None, False
    async for chunk in sse_chunks(r):
        if chunk is None:
            done = True
            break
        if "error" in chunk:
            return "stream_error", ttft, usage
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or []:
            if ttft is None and (c.get("text") or (c.get("delta") or {}).get("content")):
                ttft = time.perf_counter() - t0
    if not done:
        return "no_done", ttft, usage
    return ("no_tokens" if ttft is None else "ok"), ttft, usage


def check_usage(usage: dict | None, shot: Shot) -> str:
    """"ok" when usage says max_tokens tokens were generated: with ignore_eos every answer has exactly that many."""
    if not isinstance(usage, dict):
        return "no_usage"
    return "ok" if usage.get("completion_tokens") == shot.body["max_tokens"] else "wrong_length"


# ---- minutes -----------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of xs, in ms; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class Minute:
    minute: int  # 1-based
    warmup: bool
    sent: int
    ok: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    rss_mib: dict[str, float | None]
    cpu_pct: dict[str, float | None]

    def line(self) -> str:
        f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        errs = " ".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "none"
        rss = " ".join(f"{n} {v:.1f}" if v is not None else f"{n} gone" for n, v in self.rss_mib.items())
        cpu = " ".join(f"{n} {f(v)}%" for n, v in self.cpu_pct.items())
        return (f"min {self.minute:3d}{' (warm-up)' if self.warmup else ''} | sent {self.sent} ok {self.ok} "
                f"errors {errs} | e2e p50 {f(self.p50_ms)} p99 {f(self.p99_ms)} ms | ttft p50 {f(self.ttft_p50_ms)} "
                f"p99 {f(self.ttft_p99_ms)} ms | RSS MiB {rss} | CPU {cpu}")


class Tally:
    """Outcomes of the current minute, folded into a Minute line when it ends."""

    def __init__(self) -> None:
        self.sent, self.outcomes = 0, []

    def close(self, minute: int, warmup: bool, prev: Sample, now: Sample) -> Minute:
        ok = [o for o in self.outcomes if o.status == "ok"]
        errors: dict[str, int] = {}
        for o in self.outcomes:
            if o.status != "ok":
                errors[o.status] = errors.get(o.status, 0) + 1
        lat, ttft = [o.latency_s for o in ok], [o.ttft_s for o in ok if o.ttft_s is not None]
        m = Minute(minute, warmup, self.sent, len(ok), errors, pct(lat, 50), pct(lat, 99), pct(ttft, 50),
                   pct(ttft, 99), now.rss_mib, cpu_pct(prev, now))
        self.sent, self.outcomes = 0, []
        return m


# ---- the run -----------------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    replicas: list[ServerProcess]
    gateway: GatewayProcess
    keys: dict[str, str]  # tenant -> API key
    replica_key: str  # what the replicas require and the gateway sends them
    replica_auth: bool  # whether the replicas refuse requests without it

    def all_secrets(self) -> list[str]:
        return [self.replica_key, *self.keys.values()]

    def pids(self) -> dict[str, int]:
        return {"gateway": self.gateway.proc.pid,
                **{f"replica{i + 1}": r.proc.pid for i, r in enumerate(self.replicas)}, "client": os.getpid()}

    def procs(self) -> list[tuple[str, ServerProcess]]:
        return [("gateway", self.gateway), *((f"replica{i + 1}", r) for i, r in enumerate(self.replicas))]


def start_fleet(a: argparse.Namespace, run_dir: str, started: list) -> Fleet:
    """Two replicas, then the gateway in front of them; every process is appended to `started` as soon as it runs,
    so the caller can stop it whatever fails next."""
    replica_key = secrets.token_urlsafe(24)
    keys = {name: f"sk-soak-{name}-{secrets.token_urlsafe(24)}" for name, _, _ in TENANTS}
    replica_args = ("--model", "demo", "--max-num-seqs", str(a.max_num_seqs), "--num-kv-blocks",
                    str(a.num_kv_blocks), "--max-waiting-requests", "512")
    replicas = []
    for _ in range(2):
        replicas.append(ServerProcess(*replica_args, env={"CONVEYOR_API_KEY": replica_key}))
        started.append(replicas[-1])
    cfg = {"models": [{"name": MODEL, "replicas": [r.base_url for r in replicas], "tokenizer": "demo",
                       "upstream_api_key_env": REPLICA_KEY_ENV, "max_in_flight_per_replica": a.max_num_seqs}],
           "tenants": [{"name": n, "api_key_sha256": hashlib.sha256(keys[n].encode()).hexdigest(), "class": c,
                        "requests_per_minute": 1_000_000, "tokens_per_minute": 1e10, "max_concurrent": 1000}
                       for n, c, _ in TENANTS],
           # replays are remembered for less than the warm-up, so the cache is full before RSS is first measured
           "idempotency_window_s": max(1.0, a.warmup / 2)}
    cfg_path = os.path.join(run_dir, "gateway.yaml")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)  # JSON is YAML
    gateway = GatewayProcess(cfg_path, env={REPLICA_KEY_ENV: replica_key})
    started.append(gateway)
    wait_replicas_healthy(gateway.base_url, len(replicas))
    open_replica = httpx.get(f"{replicas[0].base_url}/v1/models", timeout=10).status_code == 200
    return Fleet(replicas, gateway, keys, replica_key, not open_replica)


def wait_replicas_healthy(gateway_url: str, n: int, timeout: float = 60.0) -> None:
    """Until the gateway's health checks have passed on all n replicas."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = httpx.get(f"{gateway_url}/health", timeout=5).json()["models"][MODEL]
        if states.get("healthy", 0) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not see {n} healthy replicas: {states}")


async def drive(a: argparse.Namespace, fleet: Fleet, minutes: list[Minute], marks: dict[str, Sample]) -> None:
    """Open-loop load for a.duration seconds, one Minute per minute (the last may be partial), then wait for the
    requests still in flight. marks gets the samples at the end of warm-up ("start") and of the run ("end")."""
    pids, wl, tally = fleet.pids(), Workload(a.seed), Tally()
    limits = httpx.Limits(max_connections=a.max_in_flight, max_keepalive_connections=a.max_in_flight)
    timeout = httpx.Timeout(connect=10, read=a.request_timeout, write=30, pool=a.request_timeout)
    in_flight: set[asyncio.Task] = set()
    t0 = time.perf_counter()
    prev = sample(pids, 0.0)
    marks["load_start"] = prev

    async def one(shot: Shot) -> None:
        try:
            outcome = await send(client, fleet.gateway.base_url, shot, fleet.keys[shot.tenant])
        except asyncio.CancelledError:
            tally.outcomes.append(Outcome("cancelled", 0.0))
            raise
        except Exception as e:  # a bug of this script: counted, shown, and the run goes on
            print(f"!! client error {e!r} on {shot}", flush=True)
            outcome = Outcome(f"client_{type(e).__name__}", 0.0)
        tally.outcomes.append(outcome)

    def close_minute(n: int, end_s: float) -> None:
        nonlocal prev
        now = sample(pids, end_s)
        m = tally.close(n, end_s <= a.warmup, prev, now)
        prev = now
        minutes.append(m)
        print(m.line(), flush=True)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        # the warm-up opens with a burst that fills every replica's batch (and queue) once, so that memory reaches
        # the high-water marks a full batch sets (allocator pools, gather buffers, touched KV pages) before RSS is
        # first measured: growth after that is what a leak would show, not the first busy minute
        for _ in range(a.warmup_burst):
            tally.sent += 1
            task = asyncio.create_task(one(wl.next()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        rng, next_at, minute = random.Random(a.seed + 1), 0.0, 1
        while (now := time.perf_counter() - t0) < a.duration:
            if now >= 60 * minute:
                close_minute(minute, now)
                minute += 1
            if "start" not in marks and now >= a.warmup:
                marks["start"] = sample(pids, now)
            if dead := [n for n, p in fleet.procs() if p.proc.poll() is not None]:
                print(f"!! {', '.join(dead)} exited; stopping the load", flush=True)
                break
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.5))
                continue
            next_at += rng.expovariate(a.rate)
            tally.sent += 1
            if len(in_flight) >= a.max_in_flight:  # the stack is far behind: count it, keep the client bounded
                tally.outcomes.append(Outcome("client_backlog", 0.0))
                continue
            task = asyncio.create_task(one(wl.next()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:  # each is bounded by the request timeout
            await asyncio.wait(in_flight, timeout=a.request_timeout + 30)
        end = time.perf_counter() - t0
        if tally.sent or tally.outcomes:
            close_minute(minute, end)
        marks["end"] = sample(pids, end)
        marks.setdefault("start", marks["load_start"])


# ---- after the run -----------------------------------------------------------------------------------------------
def gauges(url: str, names: tuple[str, ...], headers: dict[str, str] | None = None) -> dict[str, float]:
    """Sum over labels of each named gauge in url/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10, headers=headers).text
    out = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in out:
                out[s.name] += s.value
    return out


def log_findings(path: str, secret_values: list[str]) -> dict:
    """Error lines (level ERROR/CRITICAL or a traceback) and whether any of this run's secrets is in the log."""
    with open(path, errors="replace") as f:
        text = f.read()
    errors = [ln for ln in text.splitlines()
              if '"level": "ERROR"' in ln or '"level": "CRITICAL"' in ln or "Traceback" in ln]
    return {"path": path, "error_lines": len(errors), "first_errors": [e[:300] for e in errors[:3]],
            "secret_found": any(s in text for s in secret_values)}


def after_run(fleet: Fleet) -> dict:
    """The stack's state once idle: nothing in flight or queued anywhere, every process healthy."""
    time.sleep(2)  # one scrape and health interval
    names = {"gateway": ("conveyor_gateway_in_flight_requests", "conveyor_gateway_queued_requests")}
    headers = {"authorization": f"Bearer {fleet.replica_key}"}
    state = {}
    for name, p in fleet.procs():
        try:
            state[name] = {"health": httpx.get(f"{p.base_url}/health", timeout=10).status_code,
                           **gauges(p.base_url, names.get(name, ("vllm:num_requests_running",
                                                                 "vllm:num_requests_waiting",
                                                                 "vllm:kv_cache_usage_perc")), headers)}
        except httpx.HTTPError as e:
            state[name] = {"health": None, "unreachable": type(e).__name__}
        state[name]["log"] = log_findings(p.log_path, fleet.all_secrets())
    return state


def summarize(a: argparse.Namespace, fleet: Fleet, minutes: list[Minute], marks: dict[str, Sample],
              state: dict) -> dict:
    start, end = marks["start"], marks["end"]
    servers = [n for n, _ in fleet.procs()]
    growth = {n: None if not start.rss_mib[n] or end.rss_mib[n] is None
              else 100 * (end.rss_mib[n] - start.rss_mib[n]) / start.rss_mib[n] for n in start.rss_mib}
    errors: dict[str, int] = {}
    for m in minutes:
        for k, v in m.errors.items():
            errors[k] = errors.get(k, 0) + v
    sent, ok = sum(m.sent for m in minutes), sum(m.ok for m in minutes)
    if unaccounted := sent - ok - sum(errors.values()):  # sent but never finished: the client's books must close
        errors["unaccounted"] = unaccounted
    checks = {
        "no errors": not errors,
        f"RSS growth after warm-up < {RSS_BOUND_PCT:g} % (gateway, replicas)":
            all(growth[n] is not None and growth[n] < RSS_BOUND_PCT for n in servers),
        "every process healthy, nothing in flight or queued": all(
            state[n]["health"] == 200 and not any(v for k, v in state[n].items()
                                                  if k.endswith(("in_flight_requests", "queued_requests",
                                                                 "requests_running", "requests_waiting")))
            for n in servers),
        "no error lines in the logs": not any(state[n]["log"]["error_lines"] for n in servers),
        "no secret in the logs": not any(state[n]["log"]["secret_found"] for n in servers),
    }
    return {"args": vars(a), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "replica_auth": fleet.replica_auth,
            "load_avg_at_end": os.getloadavg(), "sent": sent, "ok": ok, "errors": errors,
            "p99_ms_per_minute": [m.p99_ms for m in minutes],
            "rss_mib": {"start": start.rss_mib, "end": end.rss_mib, "start_t_s": start.t, "end_t_s": end.t},
            "rss_growth_pct": growth, "cpu_pct_after_warmup": cpu_pct(start, end), "after_run": state,
            "checks": checks, "passed": all(checks.values()), "minutes": [asdict(m) for m in minutes]}


def print_summary(s: dict) -> None:
    print(f"\n# soak: {s['sent']} requests sent, {s['ok']} ok, errors: {s['errors'] or 'none'}; "
          f"replicas require the key: {s['replica_auth']}")
    print("p99 ms per minute: " + " ".join("-" if v is None else f"{v:.0f}" for v in s["p99_ms_per_minute"]))
    print(f"| process | RSS MiB at {s['rss_mib']['start_t_s']:.0f} s | RSS MiB at {s['rss_mib']['end_t_s']:.0f} s "
          "| growth | CPU after warm-up |")
    print("|---|---|---|---|---|")
    for n, start in s["rss_mib"]["start"].items():
        end, g, cpu = s["rss_mib"]["end"][n], s["rss_growth_pct"][n], s["cpu_pct_after_warmup"][n]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"| {n} | {fmt(start, '.1f')} | {fmt(end, '.1f')} | {fmt(g, '+.2f')} % | {fmt(cpu, '.0f')} % |")
    for name, ok in s["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for name, st in s["after_run"].items():
        for e in st["log"]["first_errors"]:
            print(f"  {name} log: {e}")
    print("PASSED" if s["passed"] else "FAILED")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800, help="seconds of load")
    p.add_argument("--warmup", type=float, default=120, help="seconds before RSS is first measured")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32, help="each replica's")
    p.add_argument("--warmup-burst", type=int, default=None,
                   help="requests sent at once when the warm-up starts (default: 2 x max-num-seqs per replica)")
    p.add_argument("--num-kv-blocks", type=int, default=1024, help="each replica's (all touched during warm-up)")
    p.add_argument("--max-in-flight", type=int, default=256, help="client-side bound; beyond it: client_backlog")
    p.add_argument("--request-timeout", type=float, default=120, help="seconds before a request counts as timeout")
    p.add_argument("--output", default=None, help="JSON of everything (default bench/results/soak-<date>.json)")
    a = p.parse_args()
    assert 0 <= a.warmup < a.duration and a.rate > 0
    a.warmup_burst = 2 * a.max_num_seqs * 2 if a.warmup_burst is None else a.warmup_burst
    output = a.output or os.path.join(os.path.dirname(__file__), "results",
                                      f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the fleet like Ctrl-C does
    run_dir = tempfile.mkdtemp(prefix="conveyor-soak-")
    started: list[ServerProcess] = []
    minutes: list[Minute] = []
    marks: dict[str, Sample] = {}
    try:
        fleet = start_fleet(a, run_dir, started)
        print(f"# soak: {a.rate:g} req/s for {a.duration:g} s (warm-up {a.warmup:g} s) through {fleet.gateway.base_url}"
              f" into {', '.join(r.base_url for r in fleet.replicas)}; logs: "
              f"{', '.join(p.log_path for _, p in fleet.procs())}", flush=True)
        if not fleet.replica_auth:
            print("# note: the replicas answer without the API key (serve does not read CONVEYOR_API_KEY)", flush=True)
        asyncio.run(drive(a, fleet, minutes, marks))
        summary = summarize(a, fleet, minutes, marks, after_run(fleet))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the minutes so far
        write(output, {"args": vars(a), "interrupted": True, "minutes": [asdict(m) for m in minutes]})
        print(f"# interrupted after {len(minutes)} minute(s); they are in {output}", flush=True)
        return 130
    finally:
        for proc in started:
            proc.stop()
    write(output, summary)
    print_summary(summary)
    print(f"# written to {output}")
    return 0 if summary["passed"] else 1


def write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)

if __name__ == "__main__":
    sys.exit(main())
