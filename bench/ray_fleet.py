"""A Conveyor fleet on a two-node Ray cluster on this machine, and one node lost under steady streaming load.

* The cluster: a head and a worker node, each its own `ray start --block` process (own resources: the head
  `--head-cpus`, the worker `--worker-cpus`), token authentication with a token file of the run's own (nothing in
  `ps`), every port chosen free. Each `ray start` leads a new session, and its raylet, workers and the replicas'
  servers stay in it, so cleanup kills exactly those sessions (`ray stop` would stop every Ray on the machine).
* The fleet: a gateway with one empty model, and `conveyor autoscale --actuator ray` (min = max = --replicas,
  SPREAD placement) registering the replicas through the gateway's admin API. Where each replica landed is read
  twice: the Ray node id the actuator logs, and which node's session holds its `conveyor serve`.
* The load: --concurrency closed-loop clients streaming completions of --max-tokens through the gateway. After
  --warmup-s the worker's raylet is SIGKILLed; the run waits until the gateway has --replicas healthy replicas again
  (none of them the lost ones), keeps the load --after-s longer, then lets the clients finish.
* --loss freeze-node instead SIGSTOPs every process of the worker node (a power cut or partition: its sockets stay
  open, nothing is reset), which shows what a gateway does with streams whose replica went silent.
* Every request is classified: `completed` (200, `data: [DONE]`, no error event), `cut` (200, events, then an
  error event: it had started streaming when its replica died), `shed` (a 503 + Retry-After from the gateway's own
  overload limit, --max-event-loop-lag-s: this machine's cores are shared), `lost` (anything else: another
  refusal, a broken or hung stream, a transport error). `retried`: the gateway's conveyor_gateway_retries_total
  over the run (attempts repeated on another replica before the first event).

    .venv/bin/python bench/ray_fleet.py [--replicas 2 --concurrency 8 --warmup-s 10 --after-s 20]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import free_port, wait_healthy  # noqa: E402

from conveyor.prometheus_text import sum_by_name  # noqa: E402

ADMIN_KEY, TENANT_KEY, MODEL = "fleet-admin-key", "fleet-tenant-key", "fleet"
RETRIES = "conveyor_gateway_retries_total"
PLACED = re.compile(r"replica (\S+) placed on node (\w+) at (http://[^\s\"]+)")


# ---- the cluster -------------------------------------------------------------------------------------------------
class RayNode:
    """One `ray start --block` process, leader of a new session (which its raylet, workers and their children keep)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        ports = {"--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port", "--node-manager-port", "--object-manager-port"}
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
               "--disable-usage-stats", "--object-store-memory", str(100 << 20), *args,
               *(x for p in sorted(ports) for x in (p, str(free_port())))]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def processes(self) -> list[Proc]:
        """Every live process of this node's session (the `ray start` leader may already be gone)."""
        return [p for p in all_processes() if p.sid == self.proc.pid and p.state != "Z"]

    def raylet(self) -> Proc:
        found = [p for p in self.processes() if p.comm == "raylet"]
        assert len(found) == 1, found
        return found[0]

    def server_ports(self) -> dict[int, int]:
        """{port: pid} of the `conveyor serve` processes in this node's session."""
        out = {}
        for p in self.processes():
            cmd = p.cmdline
            if "conveyor.cli" in cmd and "serve" in cmd and "--port" in cmd:
                out[int(cmd[cmd.index("--port") + 1])] = p.pid
        return out

    def stop(self) -> None:
        """SIGKILL every process of its session (again, should one have forked meanwhile): a throwaway cluster
        needs no graceful stop."""
        for _ in range(10):
            left = self.processes()
            if not left:
                break
            for p in left:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.proc.wait()


@dataclass
class Proc:
    pid: int
    sid: int  # the session: a node's `ray start` leads one, and its raylet, workers and servers stay in it
    comm: str
    state: str
    cmdline: list[str]


def all_processes() -> list[Proc]:
    """Every process on this machine, from /proc (those that exit while it is read are left out)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                cmdline = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            out.append(Proc(int(d), int(fields[3]), comm, fields[0], cmdline))
    return out


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class LocalRayCluster:
    """A head and a worker node on this machine, real enough that placement and node loss are Ray's own."""

    def __init__(self, root: Path, head_cpus: int, worker_cpus: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                        RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = tempfile.mkdtemp(prefix="rf-")  # short: Ray's socket paths must fit in 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []
        self.root, self.head_cpus, self.worker_cpus = root, head_cpus, worker_cpus

    def start(self, timeout_s: float = 90.0) -> None:
        head = RayNode("head", ["--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                                "--resources", '{"fleet_head": 1}', "--temp-dir", self.temp_dir,
                                "--include-dashboard", "false", "--dashboard-port", str(free_port())],
                       self.env, self.root / "head.log")
        self.nodes.append(head)
        # at once: the worker waits for the head's GCS to answer
        worker = RayNode("worker", ["--address", self.address, "--num-cpus", str(self.worker_cpus),
                                    "--resources", '{"fleet_worker": 1}'], self.env, self.root / "worker.log")
        self.nodes.append(worker)
        head.wait_started(timeout_s)
        worker.wait_started(timeout_s)

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def worker(self) -> RayNode:
        return self.nodes[1]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ---- gateway and autoscaler --------------------------------------------------------------------------------------
def start_gateway(root: Path, health_interval_s: float, max_lag_s: float) -> tuple[subprocess.Popen, str]:
    """The gateway process and its URL, at once (wait_gateway waits until it answers)."""
    sha = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    cfg = {"models": [{"name": MODEL, "upstream_model": "demo", "replicas": []}],
           "tenants": [{"name": "load", "api_key_sha256": sha(TENANT_KEY), "class": "interactive",
                        "requests_per_minute": 1_000_000, "max_concurrent": 10_000}],
           "admin_api_key_sha256": sha(ADMIN_KEY), "cold_start_timeout_s": 120,
           "health_interval_s": health_interval_s, "overload": {"max_event_loop_lag_s": max_lag_s}}
    path = root / "gateway.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    with open(root / "gateway.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "gateway", "--config", str(path), "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_gateway(root: Path, proc: subprocess.Popen, url: str) -> None:
    wait_healthy(proc, url, 60, (root / "gateway.log").read_text, ok=lambda status: status < 500)


def start_autoscaler(root: Path, cluster: LocalRayCluster, gateway: str, replicas: int) -> subprocess.Popen:
    serve = ["--model", "demo", "--max-num-seqs", "4", "--kv-cache-memory", str(64 << 20)]
    cmd = [sys.executable, "-m", "conveyor.cli", "autoscale", "--gateway", gateway, "--model", MODEL,
           "--actuator", "ray", "--ray-address", cluster.address, "--num-cpus", "1",
           "--serve-args", shlex.join(serve), "--interval", "0.5", "--startup-timeout", "120",
           "--min-replicas", str(replicas), "--max-replicas", str(replicas)]
    env = dict(cluster.env, CONVEYOR_ADMIN_KEY=ADMIN_KEY)
    with open(root / "autoscale.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def placements(root: Path) -> dict[str, dict]:
    """{url: {replica, node_id}} from the autoscaler's log lines."""
    out = {}
    for m in PLACED.finditer((root / "autoscale.log").read_text()):
        out[m.group(3)] = {"replica": m.group(1), "node_id": m.group(2)}
    return out


def healthy(admin: httpx.Client, gateway: str) -> list[str]:
    r = admin.get(gateway + "/admin/replicas")
    r.raise_for_status()
    return [x["url"] for x in r.json().get("models", {}).get(MODEL, []) if x["state"] == "healthy"]


def retries(gateway: str) -> float:
    return sum_by_name(httpx.get(gateway + "/metrics", timeout=5).text, [RETRIES]).get(RETRIES, 0.0)


# ---- the load ----------------------------------------------------------------------------------------------------
@dataclass
class Outcomes:
    completed: int = 0
    cut: int = 0
    shed: int = 0  # refused at once by the gateway's own overload limit (503, code gateway_overloaded)
    lost: list[str] = field(default_factory=list)  # why, one entry per lost request

    @property
    def sent(self) -> int:
        return self.completed + self.cut + self.shed + len(self.lost)


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int, out: Outcomes) -> None:
    body = {"model": MODEL, "prompt": "the fleet", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    events, error, done = 0, None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread())[:300]
                if r.status_code == 503 and b'"gateway_overloaded"' in text and "retry-after" in r.headers:
                    out.shed += 1
                else:
                    out.lost.append(f"{r.status_code} {text!r}")
                return
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith('data: {"error"'):
                    error = line
                elif line.startswith("data: "):
                    events += 1
    except httpx.HTTPError as e:
        out.lost.append(f"{type(e).__name__} after {events} events")
        return
    if done and error is None:
        out.completed += 1
    elif done and events > 0:
        out.cut += 1
    else:
        out.lost.append(f"stream ended: events={events} done={done} error={error}")


async def load(url: str, concurrency: int, max_tokens: int, stop: threading.Event, out: Outcomes) -> None:
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(60.0, connect=5.0),
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def loop() -> None:
            while not stop.is_set():
                await one_request(client, url, max_tokens, out)

        await asyncio.gather(*(loop() for _ in range(concurrency)))


# ---- the scenario ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    replicas: int = 2
    concurrency: int = 8
    max_tokens: int = 32
    warmup_s: float = 10.0
    after_s: float = 20.0
    head_cpus: int = 3  # room on the surviving node for the lost replicas
    worker_cpus: int = 1
    health_interval_s: float = 0.5
    # the gateway's own overload limit: the replicas, clients and the gateway share this machine's cores, so the
    # default 0.5 s would shed for reasons that have nothing to do with the lost node (sheds are counted apart)
    max_event_loop_lag_s: float = 5.0
    loss: str = "kill-raylet"  # or freeze-node: SIGSTOP every process of the worker node
    restore_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.replicas < 2 or self.concurrency < 1 or self.max_tokens < 1 or self.worker_cpus < 1:
            raise ValueError("--replicas must be at least 2, --concurrency, --max-tokens and --worker-cpus at least 1")
        if self.loss not in ("kill-raylet", "freeze-node"):
            raise ValueError("--loss must be kill-raylet or freeze-node")
        if self.head_cpus < self.replicas:
            raise ValueError("--head-cpus must be at least --replicas: the head needs room for the whole fleet "
                             "once the worker is lost")
        if min(self.warmup_s, self.after_s) < 0 or \
                min(self.health_interval_s, self.restore_timeout_s, self.max_event_loop_lag_s) <= 0:
            raise ValueError("durations must not be negative (--health-interval-s, --restore-timeout-s, "
                             "--max-event-loop-lag-s: positive)")


def wait_for(cond, timeout_s: float, what: str, logs=lambda: "") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out waiting for {what}\n{logs()}")
        time.sleep(0.1)
    return time.monotonic()


def run(cfg: Config, root: Path) -> dict:
    """The whole scenario; every process it started is gone when it returns or raises."""
    cluster = LocalRayCluster(root, cfg.head_cpus, cfg.worker_cpus)
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        gw, gateway = start_gateway(root, cfg.health_interval_s, cfg.max_event_loop_lag_s)  # while the cluster starts
        procs.append(gw)
        cluster.start()
        wait_gateway(root, gw, gateway)
        procs.append(start_autoscaler(root, cluster, gateway, cfg.replicas))
        with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            return scenario(cfg, root, cluster, gateway, admin, procs[-1], t0)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        cluster.stop()


def scenario(cfg: Config, root: Path, cluster: LocalRayCluster, gateway: str, admin: httpx.Client,
             autoscaler: subprocess.Popen, t0: float) -> dict:
    logs = lambda: (root / "autoscale.log").read_text()[-4000:]  # noqa: E731
    wait_for(lambda: len(healthy(admin, gateway)) == cfg.replicas and autoscaler.poll() is None, 240,
             "the first replicas", logs)
    setup_s = time.monotonic() - t0
    before = where(cluster, root, healthy(admin, gateway))
    on_worker = [u for u, p in before.items() if p["node"] == "worker"]
    worker_pids = list(cluster.worker.server_ports().values())
    retries0 = retries(gateway)
    out, stop = Outcomes(), threading.Event()
    loader = threading.Thread(target=asyncio.run, args=(load(gateway, cfg.concurrency, cfg.max_tokens, stop, out),))
    loader.start()
    t_load, cpu0 = time.monotonic(), cpu_times()
    try:
        time.sleep(cfg.warmup_s)
        sent_before_kill = out.sent
        t_kill = time.monotonic()
        if cfg.loss == "kill-raylet":
            os.kill(cluster.worker.raylet().pid, signal.SIGKILL)
            t_servers_gone = wait_for(lambda: not any(running(p) for p in worker_pids), 60,
                                      "the lost node's servers to exit")
        else:  # freeze-node: every process of the node stops at once, its sockets open (no RST, as a power cut)
            for p in cluster.worker.processes():
                os.kill(p.pid, signal.SIGSTOP)
            t_servers_gone = None  # they do not exit: they hang
        t_dropped = wait_for(lambda: not set(on_worker) & set(healthy(admin, gateway)), cfg.restore_timeout_s,
                             "the gateway to drop the lost replicas", logs)
        t_restored = wait_for(lambda: len(healthy(admin, gateway)) == cfg.replicas, cfg.restore_timeout_s,
                              "capacity restored", logs)
        time.sleep(cfg.after_s)
    finally:
        stop.set()
        loader.join(120)
    load_s, cpu1 = time.monotonic() - t_load, cpu_times()
    after = where(cluster, root, healthy(admin, gateway))
    return {"config": cfg.__dict__, "setup_s": round(setup_s, 1), "before": before, "after": after,
            "lost_replicas": on_worker, "sent": out.sent, "sent_before_kill": sent_before_kill,
            "load_s": round(load_s, 1), "completed_per_s": round(out.completed / load_s, 1),
            "cpu_busy": round((cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1.0), 3), "cpus": os.cpu_count(),
            "completed": out.completed, "cut": out.cut, "shed": out.shed, "lost": len(out.lost),
            "lost_why": out.lost[:10],
            "retried": int(retries(gateway) - retries0),
            "servers_gone_s": None if t_servers_gone is None else round(t_servers_gone - t_kill, 2),
            "dropped_s": round(t_dropped - t_kill, 2),
            "restored_s": round(t_restored - t_kill, 2), "autoscaler_alive": autoscaler.poll() is None,
            "sessions": [node.proc.pid for node in cluster.nodes]}


def where(cluster: LocalRayCluster, root: Path, urls: list[str]) -> dict[str, dict]:
    """{url: {node: head|worker (whose session holds its server), node_id (Ray's, as the actuator logged)}}"""
    nodes = {port: node.name for node in cluster.nodes for port in node.server_ports()}
    logged = placements(root)
    return {u: {"node": nodes.get(int(u.rsplit(":", 1)[1])), "node_id": logged.get(u, {}).get("node_id")}
            for u in urls}


def format_table(r: dict) -> str:
    rows = [("replicas before", ", ".join(f"{u} on {p['node']} ({(p['node_id'] or '?')[:8]})"
                                          for u, p in r["before"].items())),
            ("replicas after", ", ".join(f"{u} on {p['node']} ({(p['node_id'] or '?')[:8]})"
                                         for u, p in r["after"].items())),
            ("load", f"{r['load_s']} s, {r['completed_per_s']} completed/s, machine CPU "
                     f"{r['cpu_busy']:.0%} busy of {r['cpus']} cores"),
            ("requests sent", r["sent"]), ("  completed", r["completed"]),
            ("  cut after their first event", r["cut"]), ("  shed by the gateway's overload limit", r["shed"]),
            ("  lost", r["lost"]),
            ("  retried on another replica", r["retried"]),
            ("loss", r["config"]["loss"]),
            ("kill → lost servers exited", "never (frozen)" if r["servers_gone_s"] is None
             else f"{r['servers_gone_s']} s"),
            ("kill → gateway dropped them", f"{r['dropped_s']} s"),
            ("kill → capacity restored", f"{r['restored_s']} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    defaults = Config()
    for name, value in defaults.__dict__.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default: {value}")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--keep", default=None, metavar="DIR", help="run in DIR and keep its logs (default: a temp dir)")
    a = p.parse_args(argv)
    try:
        cfg = Config(**{k: getattr(a, k) for k in defaults.__dict__})
    except ValueError as e:
        p.error(str(e))
    if a.keep:
        result = run(cfg, Path(a.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="ray-fleet-") as d:
            result = run(cfg, Path(d))
    print(format_table(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
