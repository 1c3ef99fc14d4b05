"""Sensitivity of the autoscaler's defaults, in the simulator (the built-in trace and measured demo profile).

Varies one policy setting at a time around the defaults and prints replica-hours and SLO violations, so the
defaults in conveyor/autoscale/policy.py can be read against their neighbours. Writes a JSON table.

    .venv/bin/python bench/autoscale_sweep.py --output bench/results/autoscale/sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from conveyor.autoscale import simulate as sim
from conveyor.autoscale import trace as tr
from conveyor.autoscale.policy import PolicyConfig
from conveyor.autoscale.profile import Profile

# (setting, values, other settings changed from the defaults for that row)
SWEEP = [("target_slots_used_ratio", [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], {}),
         ("target_waiting", [1.0, 2.0, 4.0, 8.0], {}),
         ("target_ttft_p95_s", [0.25, 0.5, 1.0, None], {}),
         ("scale_down_window_s", [30.0, 60.0, 120.0, 300.0], {}),
         ("scale_up_window_s", [0.0, 10.0, 20.0], {}),
         ("panic_threshold", [1.5, 2.0, 3.0, 100.0], {}),
         ("panic_threshold", [2.0, 100.0], {"scale_up_window_s": 10.0}),  # 100: never panics
         ("scale_down_max_ratio", [0.25, 0.5, 1.0], {}),
         ("scale_up_max_ratio", [1.5, 2.0, 3.0, 100.0], {})]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-replicas", type=int, default=20)
    p.add_argument("--output", default=None)
    a = p.parse_args()
    trace, profile, simcfg = tr.generate(tr.TraceConfig()), Profile.load(), sim.SimConfig()
    base = PolicyConfig(max_replicas=a.max_replicas)
    rows = []
    print(f"{'setting':<26} {'value':>7} {'replica-h':>9} {'peak':>5} {'SLO viol.':>9}")
    for name, values, extra in SWEEP:
        for v in values:
            r = sim.simulate(trace, profile, simcfg, replace(base, **extra, **{name: v}))
            label = name + "".join(f" ({k}={x})" for k, x in extra.items())
            rows.append({"setting": label, "value": v, "default": v == getattr(base, name) and not extra,
                         "replica_hours": round(r["replica_hours"], 3), "peak_replicas": r["peak_replicas"],
                         "slo_violation_ratio": round(r["slo_violation_ratio"], 5)})
            mark = "*" if rows[-1]["default"] else " "
            print(f"{label:<26} {str(v):>6}{mark} {r['replica_hours']:>9.2f} {r['peak_replicas']:>5d} "
                  f"{r['slo_violation_ratio']:>9.2%}", flush=True)
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
