"""Is the CPU share `conveyor serve` leaves idle spare capacity? The same server with OpenMP's default wait policy
and with OMP_WAIT_POLICY=ACTIVE (its worker threads spin instead of sleeping between parallel regions), on the
peers' reference workload (small-bf16), with serve_vs_llama.py's load client and CPU accounting. Each server runs
alone (an ACTIVE server spins one core even when idle), started fresh per run, alternating.

    .venv/bin/python bench/omp_wait_policy.py 2        # rounds; ~5 min
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_vs_llama as S  # noqa: E402

peers = S.PEERS_DIR
spec = S.MODELS["small-bf16"]
a = argparse.Namespace(wait_idle=60.0, idle_threshold=5.0, concurrency=32, limit=0, peers_python=peers / "venv/bin/python")
ncpu = os.cpu_count()
runs = []
with tempfile.TemporaryDirectory() as tmp:
    for r in range(int(sys.argv[1])):
        for name, policy in (("conveyor", None), ("conveyor-active", "ACTIVE")):
            os.environ.pop("OMP_WAIT_POLICY", None)
            if policy:
                os.environ["OMP_WAIT_POLICY"] = policy
            s = S.start_conveyor(spec, peers, ["--no-enable-prefix-caching"], tmp, name)
            os.environ.pop("OMP_WAIT_POLICY", None)
            try:
                S.wait_ready(s, 300)
                a.wait_idle = 0 if policy else 60.0
                runs.append(S.measure(s, peers / spec.workload, a, ncpu, tmp))
                print(S.format_run(runs[-1]), flush=True)
            finally:
                s.stop()
for name in ("conveyor", "conveyor-active"):
    mine = [x for x in runs if x["system"] == name]
    print(name, "median tok/s", S.median([x["output_tok_s"] for x in mine]),
          "cpu machine", S.median([x["cpu_pct"]["machine"] for x in mine]),
          "server", S.median([x["cpu_pct"]["server"] for x in mine]))
