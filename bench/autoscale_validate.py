"""Check the simulator's replica model against a real replica on the same requests.

Cuts a window out of a trace, replays it with `conveyor bench serve` against one real `conveyor serve` (the
profile's configuration), simulates the same window on one modeled replica, and prints both: TTFT and TPOT
percentiles and SLO violations. The simulator is only as honest as this comparison.

    OMP_NUM_THREADS=1 .venv/bin/python bench/autoscale_validate.py --trace bench/results/autoscale/trace.jsonl.gz \
        --start 360 --seconds 120 --output bench/results/autoscale/validate.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_process import ServerProcess  # noqa: E402

from conveyor.autoscale import simulate as sim  # noqa: E402
from conveyor.autoscale import trace as tr  # noqa: E402
from conveyor.autoscale.profile import DEFAULT_PROFILE, Profile  # noqa: E402


def pcts(xs: list[float]) -> dict:
    return {f"p{q}": round(float(np.percentile(xs, q)), 2) for q in (50, 95, 99)} if xs else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--profile", default=str(DEFAULT_PROFILE))
    p.add_argument("--start", type=float, default=360.0)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--output", default=None)
    a = p.parse_args()
    profile = Profile.load(a.profile)
    window = [tr.TraceRequest(round(r.arrival_s - a.start, 4), r.prompt_len, r.output_len)
              for r in tr.load(a.trace) if a.start <= r.arrival_s < a.start + a.seconds]
    simcfg = sim.SimConfig()
    modeled = sim.simulate(window, profile, simcfg, None, fixed=1)
    server = ServerProcess("--model", "demo", "--max-num-seqs", str(profile.max_num_seqs), "--kv-cache-memory",
                           str(64 << 20), "--max-waiting-requests", "4096")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path, out = os.path.join(tmp, "w.jsonl"), os.path.join(tmp, "r.json")
            tr.save(window, path)
            subprocess.run([sys.executable, "-m", "conveyor.cli", "bench", "serve", "--base-url", server.base_url,
                            "--workload", path, "--disable-tqdm", "--output", out], check=True,
                           stdout=subprocess.DEVNULL)
            with open(out) as f:
                real = json.load(f)
    finally:
        server.stop()
    ok = [r for r in real["requests"] if not r["error"]]
    ttft = [r["ttft_ms"] for r in ok]
    tpot = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
    over = sum(r["ttft_ms"] > simcfg.slo_ttft_s * 1e3 or (r["tpot_ms"] or 0) > simcfg.slo_tpot_s * 1e3 for r in ok)
    result = {"window": {"trace": a.trace, "start_s": a.start, "seconds": a.seconds, "requests": len(window),
                         "rate": len(window) / a.seconds},
              "real": {"ttft_ms": pcts(ttft), "tpot_ms": pcts(tpot), "failed": real["failed"],
                       "slo_violation_ratio": (over + real["failed"]) / max(1, len(window))},
              "simulated": {"ttft_ms": modeled["ttft_ms"], "tpot_ms": modeled["tpot_ms"],
                            "slo_violation_ratio": modeled["slo_violation_ratio"]},
              "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result, indent=1))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
