"""The batching experiment: one engine and one workload under each batching mode and KV layout, side by side.

Each mode is a real engine policy (SchedulerConfig.batching, CacheConfig.kv_layout) run in-process at the same KV
memory budget (num_kv_blocks). Requests are added when their arrival time comes; latency is arrival to last token.

A request carries the client's `max_tokens` cap and the length its answer actually has (`output_len`). The engine
only knows the cap, as with a real model that stops at an end-of-sequence token the scheduler cannot foresee; the
driver ends the request when the answer is complete (the stand-in for that token). This is what makes reserving
`prompt + max_tokens` up front (the contiguous layout) costly.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.progress import Progress, format_duration
from conveyor.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine (torch) is imported where a run needs it: `conveyor --help` and the gateway never do
    from conveyor.llm import LLM

log = logging.getLogger("conveyor.bench.compare")

MODES = {  # name -> (batching, kv_layout)
    "none": ("none", "paged"),
    "static": ("static", "paged"),
    "dynamic": ("dynamic", "paged"),
    "continuous-contiguous": ("continuous", "contiguous"),
    "continuous-paged": ("continuous", "paged"),
}


@dataclass
class CompareRequest:
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int  # the answer's real length
    max_tokens: int  # the client's cap; >= output_len


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_mode(llm: LLM, requests: list[CompareRequest], progress: Progress | None = None) -> dict:
    """Replay the workload against the engine in real time; returns the mode's measurements. progress, if given,
    advances by one for each request that ends."""
    eng = llm.engine
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    arrival: dict[str, float] = {}
    latency: dict[str, float] = {}
    out_tokens = 0
    nxt = 0
    t0 = time.monotonic()
    while len(latency) < len(requests):
        now = time.monotonic() - t0
        while nxt < len(order) and requests[order[nxt]].arrival_s <= now:
            i = order[nxt]
            r = requests[i]
            eng.add_request(f"{i}", {"prompt_token_ids": r.prompt_token_ids},
                            SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True))
            arrival[f"{i}"] = t0 + r.arrival_s
            nxt += 1
        for out in eng.step():
            n = len(out.outputs[0].token_ids)
            if n >= requests[int(out.request_id)].output_len and not out.finished:
                eng.abort_request(out.request_id)  # the answer is complete: its end-of-sequence token
            elif not out.finished:
                continue
            latency[out.request_id] = time.monotonic() - arrival[out.request_id]
            out_tokens += n
            if progress is not None:
                progress.update()
        if not eng.last_step_num_seqs:
            time.sleep(0.001)  # nothing arrived yet, or a batch is still forming
    duration = time.monotonic() - t0
    stats = llm.stats()
    lat_ms = [v * 1e3 for v in latency.values()]
    return {"output_throughput": out_tokens / duration, "duration_s": duration, "output_tokens": out_tokens,
            "p50_latency_ms": percentile(lat_ms, 50), "p95_latency_ms": percentile(lat_ms, 95),
            "mean_latency_ms": statistics.fmean(lat_ms), "peak_running": stats["peak_running"],
            "kv_slots_reserved": stats["kv_slots_reserved"], "kv_slots_used": stats["kv_slots_used"],
            "kv_waste_ratio": stats["kv_waste_ratio"], "preemptions": stats["num_preemptions"]}


def compare(model: str, requests: list[CompareRequest], num_kv_blocks: int, block_size: int = 16,
            max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, dtype: str = "auto",
            load_format: str = "auto", batch_window_s: float = 0.05, batch_timeout_s: float = 2.0,
            modes: list[str] | None = None, repeat: int = 1, progress: Progress | None = None) -> dict:
    """Runs every mode `repeat` times, round robin (so a noisy neighbour hurts all modes alike); each metric is the
    median over the runs, and `runs` keeps them all. progress, if given, counts requests ended: its total should be
    len(modes) × repeat × len(requests); each run's start is a note on it."""
    runs: dict[str, list[dict]] = {name: [] for name in modes or list(MODES)}
    total = len(runs) * repeat
    for r in range(repeat):
        for k, name in enumerate(runs):
            if progress is None:
                log.info("mode %s, run %d/%d ...", name, r + 1, repeat)
            else:
                progress.set_description(f"compare {name}")
                progress.note(f"run {r * len(runs) + k + 1}/{total}: {name}"
                              + (f" (round {r + 1}/{repeat})" if repeat > 1 else "") + _eta_note(progress))
            runs[name].append(run_once(model, name, requests, num_kv_blocks, block_size, max_num_seqs,
                                       max_num_batched_tokens, dtype, load_format, batch_window_s, batch_timeout_s,
                                       progress))
    return {name: {**{k: _median(rs, k) for k in rs[0]}, "runs": rs} for name, rs in runs.items()}


def _eta_note(progress: Progress) -> str:
    eta = progress.eta_s()
    return "" if eta is None else f"; {progress.n:g}/{progress.total:g} requests done, ~{format_duration(eta)} left"


def _median(runs: list[dict], key: str):
    vals = sorted(r[key] for r in runs)
    mid = vals[len(vals) // 2]
    return type(mid)(statistics.median(vals)) if isinstance(mid, int) else statistics.median(vals)


def run_once(model: str, name: str, requests: list[CompareRequest], num_kv_blocks: int, block_size: int,
             max_num_seqs: int, max_num_batched_tokens: int, dtype: str, load_format: str, batch_window_s: float,
             batch_timeout_s: float, progress: Progress | None = None) -> dict:
    from conveyor.llm import LLM

    batching, layout = MODES[name]
    llm = LLM(model, dtype=dtype, load_format=load_format, block_size=block_size, num_kv_blocks=num_kv_blocks,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, batching=batching,
              kv_layout=layout, batch_window_s=batch_window_s, batch_timeout_s=batch_timeout_s)
    warm = requests[0]
    llm.generate({"prompt_token_ids": warm.prompt_token_ids}, SamplingParams(max_tokens=2))
    llm.engine.kv_slots_reserved = llm.engine.kv_slots_used = llm.engine.peak_running = 0
    result = run_mode(llm, requests, progress)
    assert llm.stats()["kv_blocks_in_use"] == 0
    return result


def format_table(modes: dict) -> str:
    head = f"{'mode':<24}{'out tok/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'peak run':>10}{'KV waste':>10}"
    rows = [head, "-" * len(head)]
    for name, m in modes.items():
        rows.append(f"{name:<24}{m['output_throughput']:>10.1f}{m['p50_latency_ms']:>10.0f}"
                    f"{m['p95_latency_ms']:>10.0f}{m['peak_running']:>10d}{m['kv_waste_ratio']:>10.1%}")
    return "\n".join(rows)


def plot(modes: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(modes)
    panels = [("output_throughput", "output tokens/s"), ("p95_latency_ms", "p95 latency (ms)"),
              ("peak_running", "peak concurrent sequences"), ("kv_waste_ratio", "KV slots wasted (share)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        ax.bar(range(len(names)), [modes[n][key] for n in names],
               color=["#bbb", "#999", "#777", "#d88", "#3a7"][:len(names)])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    path = out_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
