"""Is the CPU share `conveyor serve` leaves idle spare capacity? Two checks on the peers' reference workload
(small-bf16), with serve_vs_llama.py's load client and CPU accounting:

  omp   the same Conveyor server with OpenMP's default wait policy and with OMP_WAIT_POLICY=ACTIVE (its worker
        threads spin instead of sleeping between parallel regions). Each server runs alone (an ACTIVE server spins
        one core even when idle), started fresh per run, alternating.
  poll  llama-server as the peers start it (--poll 50, its default) and with --poll 0 (no polling for new work),
        and Conveyor's default, all up at once, interleaved.

    .venv/bin/python bench/omp_wait_policy.py omp 2        # rounds; ~5 min
    .venv/bin/python bench/omp_wait_policy.py poll 3       # ~8 min
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_vs_llama as S  # noqa: E402

PEERS = S.PEERS_DIR
SPEC = S.MODELS["small-bf16"]


def client_args(wait_idle: float) -> argparse.Namespace:
    return argparse.Namespace(wait_idle=wait_idle, idle_threshold=5.0, concurrency=32, limit=0,
                              peers_python=PEERS / "venv" / "bin" / "python")


def start_llama(extra: list[str], name: str) -> S.Server:
    """llama-server with run_llama_server.sh's flags plus extra."""
    port = S.free_port()
    log = open(f"/tmp/{name}-{port}.log", "w")
    cmd = [str(PEERS / "llama.cpp-build" / "bin" / "llama-server"), "-m", str(PEERS / SPEC.gguf), "-c", "32768",
           "-np", "32", "-t", "2", "-tb", "2", "-b", "2048", "-ub", "512", "--host", "127.0.0.1", "--port",
           str(port), "--cache-ram", "0", "--no-webui", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return S.Server(name, proc.pid, f"http://127.0.0.1:{port}", log.name, proc)


def start_conveyor(name: str, policy: str | None, tmp: str) -> S.Server:
    env_before = os.environ.pop("OMP_WAIT_POLICY", None)
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy
    try:
        return S.start_conveyor(SPEC, PEERS, ["--no-enable-prefix-caching"], tmp, name)
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
        if env_before is not None:
            os.environ["OMP_WAIT_POLICY"] = env_before


def omp(rounds: int, tmp: str) -> list[dict]:
    runs = []
    for _ in range(rounds):
        for name, policy in (("conveyor", None), ("conveyor-active", "ACTIVE")):
            srv = start_conveyor(name, policy, tmp)
            try:
                S.wait_ready(srv, 300)
                runs.append(S.measure(srv, PEERS / SPEC.workload, client_args(0 if policy else 60.0),
                                      os.cpu_count(), tmp))
                print(S.format_run(runs[-1]), flush=True)
            finally:
                srv.stop()
    return runs


def poll(rounds: int, tmp: str) -> list[dict]:
    servers = {"llama-poll50": start_llama([], "llama-poll50"), "llama-poll0": start_llama(["--poll", "0"],
                                                                                          "llama-poll0"),
               "conveyor": start_conveyor("conveyor", None, tmp)}
    runs = []
    try:
        for srv in servers.values():
            S.wait_ready(srv, 300)
        for _ in range(rounds):
            for srv in servers.values():
                runs.append(S.measure(srv, PEERS / SPEC.workload, client_args(60.0), os.cpu_count(), tmp))
                print(S.format_run(runs[-1]), flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["omp", "poll"])
    p.add_argument("rounds", type=int, nargs="?", default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = (omp if a.check == "omp" else poll)(a.rounds, tmp)
    for name in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == name]
        print(f"{name:<16} median {S.median([r['output_tok_s'] for r in mine]):7.1f} tok/s, machine CPU "
              f"{S.median([r['cpu_pct']['machine'] for r in mine]):.0f} %, server CPU "
              f"{S.median([r['cpu_pct']['server'] for r in mine]):.0f} %")


if __name__ == "__main__":
    main()
