"""Served throughput: `conveyor serve` against llama.cpp's `llama-server` on the same weights, interleaved.

For each chosen model both servers are started once (fresh per model, not per run) and stay up for its rounds; each
round runs the peers' load client (../shared/peers/bench_server.py) against llama-server, then against Conveyor
(A B A B ...), each run after waiting for an idle machine. The workload is the peers' reference workload (64
requests, prompts 16-512 tokens, outputs 8-256, all released at once, at most --concurrency in flight, greedy, each
forced to its exact output length, streaming). Servers are started as ../shared/peers/README.md does:
llama-server through run_llama_server.sh (32 slots of 1,024 tokens, 2 threads, prompt cache off), Conveyor with
`conveyor serve --model M --dtype D --served-model-name m` and its defaults, so the numbers compare with the peers
README's figures.

Per run: output tok/s, TTFT p50/p99, TPOT p50 (the client's figures), and CPU during the client's timed run (from
/proc, sampled every 0.2 s; the client's start-up and warm-up request excluded): the machine's busy share of all its
cores, the server's own share (its CPU seconds / (wall x cores)), the load client's, and what other processes used
(machine minus server minus client). Then medians over rounds per system and the ratios
Conveyor / llama-server.

Models (--models, comma-separated):
  small-bf16, small-fp32  the peers' reference random Llama ~100M (models/small, gguf/small-{bf16,f32}.gguf)
  smollm2-bf16            SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF into an HF checkpoint
                          (models/smollm2), which Conveyor serves in bf16 and llama-server as a bf16 GGUF
  smollm2-q4_1            the original Q4_1 GGUF on both sides (Conveyor keeps the Q4_1 weights low-bit)
The SmolLM2 checkpoint, its bf16 GGUF and its workload (the peers' workload.py on its tokenizer) are made under the
peers directory on first use, with the peers' venv.

    .venv/bin/python bench/serve_vs_llama.py --models small-bf16,small-fp32,smollm2-bf16,smollm2-q4_1 \
        --output bench/results/serve_vs_llama.json                     # idle machine, ~30 min
    .venv/bin/python bench/serve_vs_llama.py --rounds 1 --models small-bf16 --wait-idle 0   # one round
    .venv/bin/python bench/serve_vs_llama.py --rounds 1 --models smollm2-q4_1 --limit 8 --wait-idle 0  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_SCRIPTS = Path(os.environ.get("PEERS_SCRIPTS", ROOT.parent / "shared" / "peers"))
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/tmp/peers"))
LLAMA_SRC = "sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"  # as setup_llama_server.sh unpacks it
SMOLLM2_GGUF = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEMS = ("llama-server", "conveyor")  # the order within a round
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_EXIT_S = 0.3  # the load client's time from the end of its run to its exit, at most


@dataclass(frozen=True)
class ModelSpec:
    """One comparison: what each server loads (paths relative to the peers directory) and the workload."""
    name: str
    conveyor_model: str
    conveyor_args: tuple[str, ...]
    gguf: str
    workload: str
    needs_smollm2: bool = False  # made by prepare_smollm2 on first use


MODELS = {m.name: m for m in (
    ModelSpec("small-bf16", "models/small", ("--dtype", "bfloat16"), "gguf/small-bf16.gguf", "workload_n64.json"),
    ModelSpec("small-fp32", "models/small", ("--dtype", "float32"), "gguf/small-f32.gguf", "workload_n64.json"),
    ModelSpec("smollm2-bf16", "models/smollm2", ("--dtype", "bfloat16"), "gguf/smollm2-bf16.gguf",
              "workload_smollm2_n64.json", True),
    ModelSpec("smollm2-q4_1", SMOLLM2_GGUF, (), SMOLLM2_GGUF, "workload_smollm2_n64.json", True),
)}


# ---- CPU accounting from /proc ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative counters at one instant: wall seconds, machine busy and total CPU seconds (all cores), and the CPU
    seconds of each watched process tree."""
    wall_s: float
    busy_s: float
    total_s: float
    procs_s: dict[str, float]


def parse_proc_stat_line(line: str) -> tuple[float, float]:
    """The aggregate `cpu` line of /proc/stat -> (busy, total) in clock ticks; iowait counts as idle, steal as
    busy (another guest took the core)."""
    fields = [int(x) for x in line.split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return float(busy), float(busy + idle + iowait)


def tree_pids(pid: int) -> list[int]:
    """pid and all its live descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process tree (all threads, live descendants); 0 once it is gone."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
        except OSError:
            continue
        total += (int(rest[11]) + int(rest[12])) / CLK_TCK
    return total


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children: the load client's, read after it has exited."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def snapshot(pids: dict[str, int], counted: dict[str, float] | None = None) -> CpuSnapshot:
    """Counters now; pids: process trees to read from /proc; counted: CPU seconds already read elsewhere."""
    with open("/proc/stat") as f:
        busy, total = parse_proc_stat_line(f.readline())
    return CpuSnapshot(time.perf_counter(), busy / CLK_TCK, total / CLK_TCK,
                       {**{name: proc_cpu_s(pid) for name, pid in pids.items()}, **(counted or {})})


def cpu_usage(a: CpuSnapshot, b: CpuSnapshot, ncpu: int) -> dict[str, float]:
    """CPU use between two snapshots in % of the whole machine (100 = every core busy): `machine` from /proc/stat,
    one entry per watched process tree, and `others` = machine minus the watched trees (never below 0).
    Raises ValueError if the snapshots are out of order or watch different processes."""
    if b.wall_s <= a.wall_s or a.procs_s.keys() != b.procs_s.keys():
        raise ValueError("cpu_usage needs two snapshots of the same processes, in order")
    total = b.total_s - a.total_s
    total = total if total > 0 else (b.wall_s - a.wall_s) * ncpu
    out = {"machine": 100.0 * (b.busy_s - a.busy_s) / total}
    for name in a.procs_s:
        out[name] = 100.0 * (b.procs_s[name] - a.procs_s[name]) / ((b.wall_s - a.wall_s) * ncpu)
    out["others"] = max(0.0, out["machine"] - sum(out[n] for n in a.procs_s))
    return out


class CpuSampler:
    """Snapshots of the given process trees every period_s on a thread, while inside a `with` block."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.2) -> None:
        import threading

        self.pids, self.period_s, self.samples = pids, period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(snapshot(self.pids))
            self._stop.wait(self.period_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pick_window(samples: list[CpuSnapshot], start: float, end: float) -> tuple[CpuSnapshot, CpuSnapshot] | None:
    """The first sample at or after start and the last at or before end (perf_counter seconds); None when no two
    distinct samples lie in [start, end]."""
    inside = [s for s in samples if start <= s.wall_s <= end]
    return (inside[0], inside[-1]) if len(inside) >= 2 else None


def wait_idle(max_wait_s: float, threshold_pct: float, ncpu: int, window_s: float = 2.0) -> dict:
    """Wait (at most max_wait_s) until the machine is busier than threshold_pct (of all cores) for no whole window.
    Returns the seconds waited and the machine's busy share in the last window."""
    t0, busy = time.monotonic(), None
    while max_wait_s > 0:
        a = snapshot({})
        time.sleep(window_s)
        busy = cpu_usage(a, snapshot({}), ncpu)["machine"]
        if busy < threshold_pct or time.monotonic() - t0 >= max_wait_s:
            break
    waited = time.monotonic() - t0
    if busy is not None and busy >= threshold_pct:
        print(f"    (not idle after {waited:.0f} s: machine {busy:.0f} % busy)", flush=True)
    return {"idle_wait_s": round(waited, 1), "busy_before_pct": None if busy is None else round(busy, 1)}


# ---- servers ---------------------------------------------------------------------------------------------------------
@dataclass
class Server:
    system: str
    pid: int
    url: str
    log_path: str
    proc: subprocess.Popen | None = None  # None: started detached by run_llama_server.sh

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self.alive():
            return
        os.kill(self.pid, 15)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():
            os.kill(self.pid, 9)
        if self.proc is not None:
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(spec: ModelSpec, peers: Path) -> Server:
    port = free_port()
    out = subprocess.run([str(PEERS_SCRIPTS / "run_llama_server.sh"), str(peers / spec.gguf), str(port), "32"],
                         check=True, capture_output=True, text=True, env=dict(os.environ, PEERS_DIR=str(peers)))
    return Server("llama-server", int(out.stdout.split()[-1]), f"http://127.0.0.1:{port}",
                  str(peers / f"llama-server-{port}.log"))


def conveyor_command(spec: ModelSpec, peers: Path, port: int, extra: list[str]) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "conveyor"), "serve", "--model", str(peers / spec.conveyor_model),
            *spec.conveyor_args, "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), *extra]


def start_conveyor(spec: ModelSpec, peers: Path, extra: list[str], log_dir: str, system: str = "conveyor") -> Server:
    port = free_port()
    log_path = os.path.join(log_dir, f"{system}-{spec.name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(conveyor_command(spec, peers, port, extra), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    return Server(system, proc.pid, f"http://127.0.0.1:{port}", log_path, proc)


def wait_ready(srv: Server, timeout_s: float) -> float:
    """Poll /health until 200 (llama-server answers 503 while loading). Returns the seconds waited; raises
    RuntimeError with the log's tail if the server exits or is not ready in time."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not srv.alive():
            raise RuntimeError(f"{srv.system} exited:\n{Path(srv.log_path).read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{srv.url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{srv.system} not ready after {timeout_s:.0f} s:\n"
                       f"{Path(srv.log_path).read_text(errors='replace')[-3000:]}")


# ---- one measured run ------------------------------------------------------------------------------------------------
RUN_FIELDS = {"output_tok_s": "output_tok_per_s", "ttft_p50_s": "ttft_s_p50", "ttft_p99_s": "ttft_s_p99",
              "tpot_p50_s": "tpot_s_p50", "wall_s": "wall_s", "errors": "n_errors", "len_mismatch": "n_len_mismatch"}


def client_command(peers_python: Path, srv: Server, workload: Path, concurrency: int, limit: int,
                   out: str) -> list[str]:
    engine = "llama-server" if srv.system == "llama-server" else "openai"
    return [str(peers_python), str(PEERS_SCRIPTS / "bench_server.py"), "--url", srv.url, "--engine", engine,
            "--workload", str(workload), "--concurrency", str(concurrency), "--server-pid", str(srv.pid),
            "--limit", str(limit), "--out", out]


def measure(srv: Server, workload: Path, a: argparse.Namespace, ncpu: int, tmp: str) -> dict:
    """One client run against srv after waiting for an idle machine: the client's figures and the CPU use."""
    idle = wait_idle(a.wait_idle, a.idle_threshold, ncpu)
    out = os.path.join(tmp, f"{srv.system}-{time.monotonic_ns()}.json")
    before = snapshot({"server": srv.pid}, {"client": children_cpu_s()})
    client = subprocess.Popen(client_command(a.peers_python, srv, workload, a.concurrency, a.limit, out),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with CpuSampler({"server": srv.pid, "client": client.pid}) as sampler:
        _, err = client.communicate()
        done = time.perf_counter()
    after = snapshot({"server": srv.pid}, {"client": children_cpu_s()})  # the client has been reaped
    if client.returncode != 0:
        raise RuntimeError(f"load client against {srv.system} failed ({client.returncode}):\n{err[-2000:]}")
    res = json.loads(Path(out).read_text())
    # the client's timed run ends just before it exits (CLIENT_EXIT_S: writing its JSON, interpreter exit); its
    # start-up and warm-up request before that are not the run's, so CPU use is read over the run's window alone
    window = pick_window(sampler.samples, done - CLIENT_EXIT_S - res["wall_s"], done - CLIENT_EXIT_S)
    cpu = cpu_usage(*window, ncpu) if window else cpu_usage(before, after, ncpu)
    return {"system": srv.system, **{k: res.get(v) for k, v in RUN_FIELDS.items()}, "cpu_pct": cpu,
            "cpu_window": "run" if window else "client lifetime", **idle}


def format_run(r: dict) -> str:
    c = r["cpu_pct"]
    return (f"    {r['system']:<13} {r['output_tok_s']:7.1f} tok/s  TTFT p50/p99 {r['ttft_p50_s']:6.2f} / "
            f"{r['ttft_p99_s']:6.2f} s  TPOT p50 {1000 * r['tpot_p50_s']:6.1f} ms  CPU machine {c['machine']:4.0f} %"
            f"  server {c['server']:4.0f} %  client {c['client']:3.0f} %  others {c['others']:3.0f} %"
            f"  errors {r['errors']}  short {r['len_mismatch']}")


# ---- aggregation -----------------------------------------------------------------------------------------------------
def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def aggregate(runs: list[dict]) -> dict:
    """Per system the medians over its runs; then Conveyor / llama-server for throughput and TTFT p99 (below 1 is
    better for TTFT). runs: measure()'s dicts of one model."""
    med = {}
    for system in (*SYSTEMS, "conveyor-b"):
        mine = [r for r in runs if r["system"] == system]
        if not mine:
            continue
        med[system] = {k: median([r[k] for r in mine]) for k in ("output_tok_s", "ttft_p50_s", "ttft_p99_s",
                                                                  "tpot_p50_s")}
        med[system].update({f"cpu_{k}_pct": median([r["cpu_pct"][k] for r in mine])
                            for k in ("machine", "server", "client", "others")})
        med[system]["runs"] = len(mine)
        med[system]["errors"] = sum((r["errors"] or 0) + (r["len_mismatch"] or 0) for r in mine)
    c, b, l = med.get("conveyor", {}), med.get("conveyor-b", {}), med.get("llama-server", {})
    return {"medians": med,
            "ratio_output_tok_s": ratio(c.get("output_tok_s"), l.get("output_tok_s")),
            "ratio_ttft_p99": ratio(c.get("ttft_p99_s"), l.get("ttft_p99_s")),
            "ratio_b_output_tok_s": ratio(b.get("output_tok_s"), l.get("output_tok_s")),
            "ratio_b_ttft_p99": ratio(b.get("ttft_p99_s"), l.get("ttft_p99_s"))}


def format_table(results: dict[str, dict]) -> str:
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = ["| model | system | output tok/s | TTFT p50 / p99 s | TPOT p50 ms | machine CPU | server CPU | "
             "client CPU | others' CPU | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, agg in results.items():
        for system, m in agg["medians"].items():
            tpot = None if m["tpot_p50_s"] is None else 1000 * m["tpot_p50_s"]
            lines.append(f"| {model} | {system} | {f(m['output_tok_s'])} | {f(m['ttft_p50_s'], 2)} / "
                         f"{f(m['ttft_p99_s'], 2)} | {f(tpot)} | {f(m['cpu_machine_pct'], 0)} % | "
                         f"{f(m['cpu_server_pct'], 0)} % | {f(m['cpu_client_pct'], 0)} % | "
                         f"{f(m['cpu_others_pct'], 0)} % | {m['errors']} |")
        lines.append(f"| {model} | **Conveyor / llama-server** | **{f(agg['ratio_output_tok_s'], 2)}x** | "
                     f"TTFT p99 {f(agg['ratio_ttft_p99'], 2)}x | | | | | | |")
        if agg.get("ratio_b_output_tok_s") is not None:
            lines.append(f"| {model} | **conveyor-b / llama-server** | **{f(agg['ratio_b_output_tok_s'], 2)}x** | "
                         f"TTFT p99 {f(agg['ratio_b_ttft_p99'], 2)}x | | | | | | |")
    return "\n".join(lines)


# ---- preparation -----------------------------------------------------------------------------------------------------
HF_FROM_GGUF = """import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
d, name, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype="float32")
model.hf_quantizer = None  # the weights are dequantized already; transformers refuses to save "gguf-quantized" ones
model.config.__dict__.pop("quantization_config", None)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
"""


def run_step(cmd: list[str]) -> None:
    """Run one preparation command; raises RuntimeError with its output's tail if it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed ({done.returncode}):\n{tail}")


def prepare_smollm2(peers: Path, py: Path) -> None:
    """SmolLM2's dequantized HF checkpoint, its bf16 GGUF and its workload under peers, each step skipped when
    done. Raises RuntimeError if a step fails."""
    gguf, hf = peers / SMOLLM2_GGUF, peers / "models" / "smollm2"
    if not (hf / "config.json").exists():
        print(f"  making {hf} (dequantized from {gguf.name})", flush=True)
        run_step([str(py), "-c", HF_FROM_GGUF, str(gguf.parent), gguf.name, str(hf)])
    if not (peers / "gguf" / "smollm2-bf16.gguf").exists():
        print("  converting it to gguf/smollm2-bf16.gguf", flush=True)
        run_step([str(py), str(PEERS_SCRIPTS / "convert_gguf.py"), "--llama-cpp", str(peers / LLAMA_SRC),
                  "--model", str(hf), "--outtype", "bf16", "--outfile", str(peers / "gguf" / "smollm2-bf16.gguf")])
    if not (peers / "workload_smollm2_n64.json").exists():
        run_step([str(py), str(PEERS_SCRIPTS / "workload.py"), "--n", "64", "--seed", "0", "--model", str(hf),
                  "--out", str(peers / "workload_smollm2_n64.json")])


def check_inputs(spec: ModelSpec, peers: Path) -> None:
    """Raises FileNotFoundError naming what the peers set-up has not made."""
    need = [PEERS_SCRIPTS / "bench_server.py", peers / "llama.cpp-build" / "bin" / "llama-server",
            peers / spec.gguf, peers / spec.workload, peers / spec.conveyor_model]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{spec.name}: missing {', '.join(missing)} (run "
                                f"../shared/peers/setup_llama_server.sh first)")


def run_model(spec: ModelSpec, a: argparse.Namespace, ncpu: int, tmp: str) -> dict:
    """Both servers up for all rounds of one model; llama-server then Conveyor in each round."""
    if spec.needs_smollm2 and (a.peers_dir / SMOLLM2_GGUF).exists():
        prepare_smollm2(a.peers_dir, a.peers_python)
    check_inputs(spec, a.peers_dir)
    print(f"{spec.name}: starting both servers (fresh per model; they stay up for its {a.rounds} round(s))",
          flush=True)
    servers: dict[str, Server] = {}
    try:
        servers["llama-server"] = start_llama_server(spec, a.peers_dir)
        servers["conveyor"] = start_conveyor(spec, a.peers_dir, a.conveyor_args, tmp)
        if a.conveyor_b_args is not None:
            servers["conveyor-b"] = start_conveyor(spec, a.peers_dir, a.conveyor_b_args, tmp, "conveyor-b")
        ready = {name: wait_ready(s, a.startup_timeout) for name, s in servers.items()}
        runs = []
        for r in range(a.rounds):
            print(f"  round {r + 1}/{a.rounds}", flush=True)
            for system in servers:
                runs.append({"round": r, **measure(servers[system], a.peers_dir / spec.workload, a, ncpu, tmp)})
                print(format_run(runs[-1]), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return {"model": spec.name, "ready_s": ready, "runs": runs, **aggregate(runs),
            "conveyor_command": conveyor_command(spec, a.peers_dir, 0, a.conveyor_args)[1:],
            "conveyor_b_command": None if a.conveyor_b_args is None else
            conveyor_command(spec, a.peers_dir, 0, a.conveyor_b_args)[1:],
            "llama_server_gguf": spec.gguf, "workload": spec.workload}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; errors (unknown model, rounds < 1) exit with one line from argparse."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small-bf16",
                   help=f"comma-separated, any of {', '.join(MODELS)} (default small-bf16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (A B per round)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="only the workload's first N requests (0: all 64)")
    p.add_argument("--wait-idle", type=float, default=300.0,
                   help="most seconds to wait for an idle machine before each run (0: do not wait)")
    p.add_argument("--idle-threshold", type=float, default=5.0,
                   help="machine busy share (%% of all cores) under which it counts as idle")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--conveyor-args", default="", help="extra `conveyor serve` flags, one string")
    p.add_argument("--conveyor-b-args", default=None,
                   help="also run a second Conveyor server ('conveyor-b') with these extra flags, third in each "
                        "round (e.g. '--async-scheduling'); the same flags as --conveyor-args plus these")
    p.add_argument("--peers-dir", type=Path, default=PEERS_DIR)
    p.add_argument("--output", help="write every run and the medians as JSON here")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in a.models if m not in MODELS]
    if unknown or not a.models:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    if a.rounds < 1 or a.concurrency < 1 or a.limit < 0:
        p.error("--rounds and --concurrency must be at least 1, --limit at least 0")
    a.conveyor_args = a.conveyor_args.split()
    if a.conveyor_b_args is not None:
        a.conveyor_b_args = a.conveyor_args + a.conveyor_b_args.split()
    a.peers_python = a.peers_dir / "venv" / "bin" / "python"
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    ncpu = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve_vs_llama-") as tmp:
        for name in a.models:
            try:
                results[name] = run_model(MODELS[name], a, ncpu, tmp)
            except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
                sys.exit(f"serve_vs_llama: {e}")
    print(f"\nmedians of {a.rounds} interleaved round(s), concurrency {a.concurrency}"
          f"{f', first {a.limit} requests' if a.limit else ''}; CPU in % of the whole "
          f"machine ({ncpu} cores); servers started fresh per model\n")
    print(format_table({n: r for n, r in results.items()}))
    if a.output:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        doc = {"args": {k: str(v) for k, v in vars(a).items()}, "ncpu": ncpu, "commit": commit.strip(),
               "servers": "started fresh per model, up for all its rounds", "results": results}
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
