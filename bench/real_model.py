"""SmolLM2-135M-Instruct served four ways on the same GGUF file, interleaved in one run:

  * conveyor-q4_1: `conveyor serve smollm2-135m-instruct` (the default: the file's Q4_1 weights stay low-bit),
  * conveyor-bf16: the same with `--quantization none --dtype bfloat16` (dequantized at load),
  * conveyor-f32:  the same with `--quantization none --dtype float32`,
  * llama-server:  llama.cpp's server on the file, started as ../shared/peers/run_llama_server.sh does.

Each round starts every system in turn (A B C D A B C D ...; one server at a time) and measures: start-up time
(process start -> first streamed token of one request), resident memory after load (before any request), after the
traffic and at its peak, then a chat workload streamed at concurrency 1 and at concurrency 32: output tokens/s, TTFT
and ITL (gaps between streamed chunks) p50/p99, and the CPU the server, this client and every other process used
meanwhile.

The workload is real chat questions (bench/data/chat_questions.json: every 9th question at concurrency 1, the other
64 at 32) rendered with the model's chat template into token ids, greedy, exactly --max-tokens output tokens each
(ignore_eos), sent by conveyor's own streaming client (conveyor.bench.client) to /v1/completions.

    .venv/bin/python bench/real_model.py --wait-idle 120 --output bench/results/real_model.json   # ~40 min idle
    .venv/bin/python bench/real_model.py --quick                                                   # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conveyor.bench.client import run_requests, sse_chunks  # noqa: E402
from conveyor.bench.metrics import summarize  # noqa: E402
from conveyor.bench.workloads import BenchRequest  # noqa: E402

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "data" / "chat_questions.json"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/tmp/peers"))
SLOTS = 32  # llama-server's -np, conveyor's --max-num-seqs
SLOT_CTX = 1024  # llama-server's context per slot (run_llama_server.sh)
BLOCK = 16  # conveyor's KV block size: SLOTS * SLOT_CTX / BLOCK blocks hold what llama-server's -c holds
STARTUP_QUESTION = "What is the capital of France?"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the systems ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    name: str
    kind: str  # conveyor | llama-server
    args: tuple[str, ...] = ()  # conveyor serve flags beyond the model


SYSTEMS = {s.name: s for s in (
    System("conveyor-q4_1", "conveyor"),
    System("conveyor-bf16", "conveyor", ("--quantization", "none", "--dtype", "bfloat16")),
    System("conveyor-f32", "conveyor", ("--quantization", "none", "--dtype", "float32")),
    System("llama-server", "llama-server"),
)}
# conveyor-f32 is there because a CPU without AVX-512 (bf16) runs bfloat16 matmuls several times slower than float32
DEFAULT_SYSTEMS = ("conveyor-q4_1", "conveyor-bf16", "conveyor-f32", "llama-server")


def server_command(s: System, model: str, gguf: Path, port: int, llama_server: Path) -> list[str]:
    """The command line of one server on 127.0.0.1:port; both sides get the same slots and KV capacity."""
    if s.kind == "llama-server":  # the flags of ../shared/peers/run_llama_server.sh
        return [str(llama_server), "-m", str(gguf), "-c", str(SLOTS * SLOT_CTX), "-np", str(SLOTS), "-t", "2",
                "-tb", "2", "-b", "2048", "-ub", "512", "--host", "127.0.0.1", "--port", str(port),
                "--cache-ram", "0", "--no-webui"]
    return [sys.executable, "-m", "conveyor.cli", "serve", model, *s.args, "--host", "127.0.0.1", "--port",
            str(port), "--max-num-seqs", str(SLOTS), "--num-kv-blocks", str(SLOTS * SLOT_CTX // BLOCK),
            "--block-size", str(BLOCK), "--log-level", "info"]


# ---- /proc ---------------------------------------------------------------------------------------------------------
def proc_status_mib(pid: int, key: str) -> float | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds all processes were busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class CpuUse:
    """CPU used during a window, in % of one core (the machine has os.cpu_count() cores, 100 % each)."""
    server: float
    client: float  # this process: the load generator
    others: float  # everything else on the machine


class CpuWindow:
    """Measures CpuUse over a `with` block; a server started inside the block (pid None on entry, set later)
    counts from zero."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid

    def __enter__(self) -> CpuWindow:
        self._t, self._all, self._own = time.perf_counter(), machine_busy_s(), own_cpu_s()
        self._srv = 0.0 if self.pid is None else proc_cpu_s(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.perf_counter() - self._t, 1e-9)
        srv, own = proc_cpu_s(self.pid) - self._srv, own_cpu_s() - self._own
        others = max(0.0, machine_busy_s() - self._all - srv - own)
        self.use = CpuUse(100 * srv / wall, 100 * own / wall, 100 * others / wall)


def wait_for_idle(max_wait_s: float, server_pid: int | None, threshold_pct: float, window_s: float = 2.0) -> dict:
    """Wait (at most max_wait_s) until other processes use under threshold_pct of one core for a whole window.
    Returns how long it waited and what the others used in the last window."""
    t0 = time.monotonic()
    others = None
    while max_wait_s > 0:
        with CpuWindow(server_pid) as w:
            time.sleep(window_s)
        others = w.use.others
        if others < threshold_pct or time.monotonic() - t0 >= max_wait_s:
            break
    waited = time.monotonic() - t0
    if others is not None and others >= threshold_pct:
        print(f"    (not idle after {waited:.0f} s: others use {others:.0f} % of a core)", flush=True)
    return {"waited_s": round(waited, 1), "others_before_pct": None if others is None else round(others, 1)}


# ---- one server's life ---------------------------------------------------------------------------------------------
@dataclass
class Server:
    system: System
    proc: subprocess.Popen
    base_url: str
    log_path: str
    started: float  # perf_counter at Popen

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(s: System, model: str, gguf: Path, llama_server: Path, log_dir: str, tag: str) -> Server:
    port = free_port()
    log_path = os.path.join(log_dir, f"{tag}-{s.name}.log")
    cmd = server_command(s, model, gguf, port, llama_server)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            cwd=HERE.parent, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return Server(s, proc, f"http://127.0.0.1:{port}", log_path, started)


def wait_ready(srv: Server, timeout_s: float) -> float:
    """Poll /health every 20 ms until 200 (llama-server answers 503 while loading): seconds since process start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.system.name} exited with {srv.proc.returncode}:\n{srv.log()[-3000:]}")
        try:
            if httpx.get(f"{srv.base_url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - srv.started
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{srv.system.name} not ready after {timeout_s:.0f} s:\n{srv.log()[-3000:]}")


async def first_answer(base_url: str, prompt_ids: list[int], max_tokens: int) -> tuple[float, str]:
    """One greedy streamed completion: (perf_counter of its first non-empty text chunk, the whole text)."""
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    first, text = None, []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as c:
        async with c.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"start-up request: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for chunk in sse_chunks(r):
                if chunk is None:
                    break
                piece = (chunk.get("choices") or [{}])[0].get("text") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text.append(piece)
    if first is None:
        raise RuntimeError("start-up request: no text streamed")
    return first, "".join(text)


def logged_weights_mib(kind: str, log: str) -> float | None:
    """Conveyor's resident weights as its loader logs them (llama-server logs no such line at its default verbosity)."""
    found = re.search(r"([\d.]+) MiB resident", log) if kind == "conveyor" else None
    return float(found.group(1)) if found else None


def measure(srv: Server, reqs: list[BenchRequest], concurrency: int, a: argparse.Namespace) -> dict:
    idle = wait_for_idle(a.wait_idle, srv.proc.pid, a.idle_threshold)
    with CpuWindow(srv.proc.pid) as w:
        res = asyncio.run(run_requests(srv.base_url, reqs, None, max_concurrency=concurrency, progress=False,
                                       scrape_interval_s=3600.0))
    summary = summarize(res.records, res.duration_s)
    short = sum(1 for r in res.records if r.ok and r.output_tokens != r.output_len)
    row = {"concurrency": concurrency, "requests": len(reqs), "summary": summary, "short_outputs": short,
           "cpu_pct": vars(w.use), **idle}
    print(f"    c={concurrency:<3} {summary['output_throughput']:7.1f} tok/s  "
          f"TTFT p50 {summary['ttft_ms']['p50'] or 0:7.1f} ms  ITL p50 {summary['itl_ms']['p50'] or 0:6.1f} ms  "
          f"server {w.use.server:4.0f} %  client {w.use.client:3.0f} %  others {w.use.others:3.0f} %  "
          f"failed {summary['failed']}  short {short}", flush=True)
    return row


def boot(s: System, a: argparse.Namespace, gguf: Path, work: dict, log_dir: str, tag: str) -> tuple[Server, dict]:
    """Start one server and time it from process start to the first streamed token of one request; its RSS is
    read once it is ready, before that request. The server is stopped again if any of this fails."""
    idle = wait_for_idle(a.wait_idle, None, a.idle_threshold)
    with CpuWindow(None) as w:
        srv = start_server(s, a.model, gguf, a.llama_server, log_dir, tag)
        w.pid = srv.proc.pid
        try:
            ready_s = wait_ready(srv, a.startup_timeout)
            rss = proc_status_mib(srv.proc.pid, "VmRSS")
            first, answer = asyncio.run(first_answer(srv.base_url, work["startup"], 24))
        except BaseException:
            srv.stop()
            raise
    startup_s = first - srv.started
    print(f"  {s.name}: ready {ready_s:.1f} s, first token {startup_s:.1f} s (others {w.use.others:.0f} %), RSS "
          f"{rss:.0f} MiB; {STARTUP_QUESTION!r} -> {answer.strip()!r}", flush=True)
    return srv, {"startup_to_first_token_s": startup_s, "ready_s": ready_s, "startup_cpu_pct": vars(w.use),
                 "startup_idle_wait": idle, "rss_after_load_mib": rss, "answer": answer}


def run_system(s: System, a: argparse.Namespace, gguf: Path, work: dict, log_dir: str, tag: str) -> dict:
    """One server's life: boot, warm-up (one full batch of short requests), each concurrency, memory, stop."""
    srv, info = boot(s, a, gguf, work, log_dir, tag)
    try:
        warm = [BenchRequest(work["startup"], 8) for _ in range(SLOTS)]
        asyncio.run(run_requests(srv.base_url, warm, None, progress=False, scrape_interval_s=3600.0))
        runs = [measure(srv, work[c], c, a) for c in a.concurrency]
        rss_after = proc_status_mib(srv.proc.pid, "VmRSS")
        peak = proc_status_mib(srv.proc.pid, "VmHWM")  # loading included
        log = srv.log()
    finally:
        srv.stop()
    return {"system": s.name, "command": server_command(s, a.model, gguf, 0, a.llama_server)[1:], **info,
            "rss_after_traffic_mib": rss_after, "peak_rss_mib": peak,
            "weights_mib_logged": logged_weights_mib(s.kind, log),
            "runs": runs}


# ---- workload ------------------------------------------------------------------------------------------------------
def chat_ids(tokenizer, question: str) -> list[int]:
    msgs = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def build_workload(gguf: Path, max_tokens: int, concurrency: list[int], n_c1: int, n_many: int) -> dict:
    """Token ids of the questions through the model's own chat template (transformers reads the tokenizer from the
    GGUF). Concurrency 1 gets every 9th question, higher concurrencies the rest; the sets do not overlap, so one
    run's prompts are never in the prefix cache of the next."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    questions = json.loads(QUESTIONS.read_text())
    solo, many = questions[::9], [q for i, q in enumerate(questions) if i % 9]
    assert n_c1 <= len(solo) and n_many <= len(many), "more requests than questions"
    work: dict = {"startup": chat_ids(tok, STARTUP_QUESTION)}
    for c in concurrency:
        qs = solo[:n_c1] if c == 1 else many[:n_many]
        work[c] = [BenchRequest(chat_ids(tok, q), max_tokens, 0.0) for q in qs]
    return work


def resolve_gguf(a: argparse.Namespace) -> Path:
    if a.gguf:
        return Path(a.gguf)
    if a.model.endswith(".gguf"):
        return Path(a.model)
    from conveyor.model.builtin import resolve_builtin

    return resolve_builtin(a.model)


# ---- report --------------------------------------------------------------------------------------------------------
def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(rounds: list[list[dict]], systems: list[str], concurrency: list[int]) -> dict:
    """Per system: the median over rounds of every figure (and the range of output tok/s)."""
    out = {}
    for name in systems:
        lives = [life for r in rounds for life in r if life["system"] == name]
        agg = {k: median([life[k] for life in lives]) for k in ("startup_to_first_token_s", "rss_after_load_mib",
                                                                 "rss_after_traffic_mib", "peak_rss_mib")}
        agg["startup_cpu_others_pct"] = median([life["startup_cpu_pct"]["others"] for life in lives])
        for c in concurrency:
            runs = [run for life in lives for run in life["runs"] if run["concurrency"] == c]
            tps = [run["summary"]["output_throughput"] for run in runs]
            agg[f"c{c}"] = {
                "output_tok_s": median(tps), "output_tok_s_min": min(tps), "output_tok_s_max": max(tps),
                **{f"{m}_{p}_ms": median([run["summary"][f"{m}_ms"][p] for run in runs])
                   for m in ("ttft", "itl") for p in ("p50", "p99")},
                **{f"cpu_{k}_pct": median([run["cpu_pct"][k] for run in runs]) for k in ("server", "client",
                                                                                         "others")},
                "cpu_others_max_pct": max(run["cpu_pct"]["others"] for run in runs),
                "failed": sum(run["summary"]["failed"] for run in runs),
                "short_outputs": sum(run["short_outputs"] for run in runs)}
        out[name] = agg
    return out


def format_tables(agg: dict, concurrency: list[int], rounds: int) -> str:
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"median of {rounds} interleaved round(s); CPU in % of one core (the machine has {os.cpu_count()})",
             "", "| system | c | output tok/s (range) | TTFT p50 / p99 ms | ITL p50 / p99 ms | server CPU | "
             "client CPU | others' CPU | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for c in concurrency:
        for name, a in agg.items():
            r = a[f"c{c}"]
            lines.append(f"| {name} | {c} | {f(r['output_tok_s'])} ({f(r['output_tok_s_min'])}-"
                         f"{f(r['output_tok_s_max'])}) | {f(r['ttft_p50_ms'], 0)} / {f(r['ttft_p99_ms'], 0)} | "
                         f"{f(r['itl_p50_ms'])} / {f(r['itl_p99_ms'])} | {f(r['cpu_server_pct'], 0)} % | "
                         f"{f(r['cpu_client_pct'], 0)} % | {f(r['cpu_others_pct'], 0)} % "
                         f"(max {f(r['cpu_others_max_pct'], 0)} %) | "
                         f"{r['failed'] + r['short_outputs']} |")
    lines += ["", "| system | start-up to first token s (others' CPU) | RSS after load MiB | RSS after traffic MiB | "
              "peak RSS (loading included) MiB |", "|---|---|---|---|---|"]
    for name, a in agg.items():
        lines.append(f"| {name} | {f(a['startup_to_first_token_s'])} ({f(a['startup_cpu_others_pct'], 0)} %) | "
                     f"{f(a['rss_after_load_mib'], 0)} | {f(a['rss_after_traffic_mib'], 0)} | "
                     f"{f(a['peak_rss_mib'], 0)} |")
    return "\n".join(lines)


def cpu_info() -> dict:
    """The CPU's model name and the vector extensions that decide which matmul kernels run."""
    info = {"cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(found.group(1).split()) if found else set()
    return {**info, "model": model.group(1) if model else None,
            "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})}


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="what conveyor serves (a name or a .gguf)")
    p.add_argument("--gguf", default=None, help="the file llama-server serves (default: the model's GGUF file)")
    p.add_argument("--llama-server", type=Path, default=PEERS_DIR / "llama.cpp-build" / "bin" / "llama-server")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--requests-c1", type=int, default=8, help="requests of the concurrency-1 run")
    p.add_argument("--requests", type=int, default=64, help="requests of each higher-concurrency run")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens of every request (ignore_eos)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for the other processes to go quiet")
    p.add_argument("--idle-threshold", type=float, default=6.0, metavar="PCT",
                   help="'quiet': the others use under this %% of one core (over 2 s)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 + 8 requests of 16 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.requests_c1, a.requests, a.max_tokens = 1, 2, 8, 16
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    if unknown := [s for s in a.systems if s not in SYSTEMS]:
        p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if "llama-server" in a.systems and not a.llama_server.exists():
        p.error(f"{a.llama_server} not found: build it with ../shared/peers/setup_llama_server.sh "
                f"(or leave it out: --systems conveyor-q4_1,conveyor-bf16)")
    return a


def main() -> int:
    a = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the running server is stopped
    gguf = resolve_gguf(a)
    work = build_workload(gguf, a.max_tokens, a.concurrency, a.requests_c1, a.requests)
    log_dir = tempfile.mkdtemp(prefix="real-model-bench-")
    print(f"# {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB); systems {', '.join(a.systems)}; {a.rounds} round(s); "
          f"server logs in {log_dir}\n# CPU: {cpu_info()}", flush=True)
    t0 = time.monotonic()
    rounds = []
    for i in range(a.rounds):
        print(f"round {i + 1}/{a.rounds}", flush=True)
        rounds.append([run_system(SYSTEMS[name], a, gguf, work, log_dir, f"r{i + 1}") for name in a.systems])
    agg = aggregate(rounds, a.systems, a.concurrency)
    table = format_tables(agg, a.concurrency, a.rounds)
    print(table)
    print(f"(whole run {(time.monotonic() - t0) / 60:.1f} min)")
    if a.output:
        result = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "model": a.model,
                  "max_tokens": a.max_tokens, "concurrency": a.concurrency, "rounds": a.rounds,
                  "prompt_tokens": {str(c): [len(r.prompt_ids) for r in work[c]] for c in a.concurrency},
                  "machine": cpu_info(),
                  "date": time.strftime("%Y-%m-%d"), "summary": agg, "table": table, "rounds_detail": rounds}
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
