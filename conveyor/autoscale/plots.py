"""Timeline plots of a simulation: load, replicas and TTFT p95 over time, one line per policy."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_timelines(runs: dict, sim, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    fig, (load, reps, lat) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    first = next(iter(runs.values()))["timeline"]
    load.plot([r["t"] / 60 for r in first], [r["request_rate"] for r in first], color="gray", lw=0.8)
    load.set_ylabel("arrivals (req/s)")
    load.set_title("Load, replicas and TTFT p95 per policy (simulated)")
    for name, run in runs.items():
        tl = run["timeline"]
        t = [r["t"] / 60 for r in tl]
        reps.plot(t, [r["replicas"] for r in tl], label=f"{name} ({run['replica_hours']:.2f} replica-h)", lw=1)
        lat.plot(t, [(r["ttft_p95_s"] or 0) * 1e3 for r in tl],
                 label=f"{name} ({run['slo_violation_ratio']:.2%} over SLO)", lw=0.8)
    lat.axhline(sim.slo_ttft_s * 1e3, color="red", ls="--", lw=0.8, label="TTFT objective")
    lat.set_yscale("log")
    reps.set_ylabel("replicas")
    lat.set_ylabel("TTFT p95 per interval (ms)")
    lat.set_xlabel("minutes")
    reps.legend(loc="upper left", fontsize=8)
    lat.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "timeline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
