"""Summary table (in the style of vLLM's `bench serve`), PNG plots and a markdown report of a `bench serve` result."""
from __future__ import annotations

import os

import numpy as np

WIDTH = 50
LATENCIES = (("ttft_ms", "TTFT", "Time to First Token"), ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st)"),
             ("itl_ms", "ITL", "Inter-token Latency"), ("e2el_ms", "E2EL", "End-to-end Latency"))
STATS = (("mean", "Mean"), ("p50", "Median"), ("p95", "P95"), ("p99", "P99"))


def _fmt(x: float | int | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def summary_rows(res: dict) -> list[tuple[str, str] | str]:
    """(label, value) rows; a bare string starts a section."""
    rows: list[tuple[str, str] | str] = [
        ("Successful requests:", _fmt(res["completed"])),
        ("Failed requests:", _fmt(res["failed"])),
        ("Benchmark duration (s):", _fmt(res["duration_s"])),
        ("Total input tokens:", _fmt(res["total_input_tokens"])),
        ("Total generated tokens:", _fmt(res["total_output_tokens"])),
        ("Request throughput (req/s):", _fmt(res["request_throughput"])),
        ("Output token throughput (tok/s):", _fmt(res["output_throughput"])),
        ("Total token throughput (tok/s):", _fmt(res["total_token_throughput"])),
        ("Peak concurrent requests:", _fmt(res["peak_concurrency"])),
    ]
    if res.get("goodput") is not None:
        rows.append(("Request goodput (req/s):", _fmt(res["goodput"])))
        rows.append(("Goodput SLOs:", " ".join(f"{k}≤{v:g}ms" for k, v in res["goodput_slos_ms"].items())))
    for key, short, title in LATENCIES:
        rows.append(title)
        rows += [(f"{name} {short} (ms):", _fmt(res[key][stat])) for stat, name in STATS]
    return rows


def format_summary(res: dict) -> str:
    lines = [" Serving Benchmark Result ".center(WIDTH, "=")]
    for row in summary_rows(res):
        if isinstance(row, str):
            lines.append(row.center(WIDTH, "-"))
        else:
            label, value = row
            lines.append(f"{label:<{max(40, len(label) + 1)}}{value:>10}")
    lines.append("=" * WIDTH)
    if res.get("errors"):
        lines += [f"  {n} × {err}" for err, n in sorted(res["errors"].items(), key=lambda kv: -kv[1])[:5]]
    return "\n".join(lines)


def markdown_table(res: dict) -> str:
    lines = ["| metric | value |", "|---|---:|"]
    for row in summary_rows(res):
        lines.append(f"| **{row}** | |" if isinstance(row, str) else f"| {row[0].rstrip(':')} | {row[1]} |")
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(res: dict, path: str) -> None:
    plt = _pyplot()
    ok = [r for r in res["requests"] if r["error"] is None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        xs = np.sort([r[key] for r in ok if r[key] is not None])
        if len(xs):
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(res: dict, path: str) -> None:
    plt = _pyplot()
    tput, series = res["throughput_series"], res["server_metrics"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.bar(np.arange(len(tput["output_tokens_per_s"])) * tput["bucket_s"], tput["output_tokens_per_s"],
            width=tput["bucket_s"], align="edge", alpha=0.7)
    top.set(title="Output throughput (client side)", ylabel="tokens/s")
    _plot_gauges(bottom, series, {"conveyor_slots_used_ratio": "slots used", "vllm:kv_cache_usage_perc":
                                  "KV cache used"})
    bottom.set(title="Server utilization (/metrics)", xlabel="time since start (s)", ylabel="ratio", ylim=(0, 1.05))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_queue_depth(res: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    _plot_gauges(ax, res["server_metrics"], {"vllm:num_requests_running": "running",
                                             "vllm:num_requests_waiting": "waiting"})
    ax.set(title="Queue depth (/metrics)", xlabel="time since start (s)", ylabel="requests")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_gauges(ax, series: dict, names: dict[str, str]) -> None:
    drawn = False
    for name, label in names.items():
        pts = [(t, v) for t, v in zip(series["t"], series.get(name, [])) if v is not None]
        if pts:
            ax.step(*zip(*pts), where="post", label=label)
            drawn = True
    if drawn:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "the server exposed none of these metrics", ha="center", transform=ax.transAxes)


PLOTS = (("latency_cdf.png", "Latency CDFs", plot_latency_cdfs),
         ("throughput.png", "Throughput and slots used over time", plot_throughput),
         ("queue_depth.png", "Queue depth over time", plot_queue_depth))


def write_report(res: dict, out_dir: str) -> list[str]:
    """The plots and report.md (which embeds them next to the summary table) into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, _, plot in PLOTS:
        plot(res, os.path.join(out_dir, name))
        paths.append(os.path.join(out_dir, name))
    cfg = res.get("config", {})
    setup = ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None)
    md = ["# Serving benchmark", "", f"`{setup}`", "", markdown_table(res), ""]
    if res.get("errors"):
        md += ["## Errors", ""] + [f"- {n} × `{err}`" for err, n in res["errors"].items()] + [""]
    for name, title, _ in PLOTS:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(md))
    return paths + [report]
