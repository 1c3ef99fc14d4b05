"""`conveyor bench serve`, `plan` and `compare`: their flags and commands (wired into conveyor/cli.py)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0 (or inf)")
    return value


# ---- bench serve -----------------------------------------------------------------------------------------------
def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", default="chat",
                   help="chat | long-context | mixed | shared-prefix | bursty, or a JSONL trace file")
    p.add_argument("--num-requests", type=_positive_int, default=None, help="default: 100, or every line of a trace")
    p.add_argument("--request-rate", type=_positive_float, default=math.inf, help="requests/s, or inf: all at once")
    p.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, smaller = burstier")
    p.add_argument("--max-concurrency", type=_positive_int, default=None, help="cap on requests in flight")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs a request must all meet to count for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots and report.md here")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="demo", help="'demo' or a checkpoint directory: prompts are token ids")
    p.add_argument("--prompt-len", type=_positive_int, default=None, help="override the workload's mean prompt tokens")
    p.add_argument("--output-len", type=_positive_int, default=None, help="override the workload's mean output tokens")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="clip prompt + output to this (default: the server's max_model_len from /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, which keeps it out of `ps`)")
    p.add_argument("--metrics-interval", type=_positive_float, default=1.0, help="seconds between /metrics scrapes")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def build_requests(a: argparse.Namespace, max_model_len: int | None) -> list:
    from conveyor.bench import workloads as wl

    text = wl.TextTokens(wl.load_tokenizer(a.tokenizer))
    if wl.is_trace(a.workload):
        reqs = wl.load_trace(a.workload, text, a.seed)[:a.num_requests]
    else:
        lengths = wl.lengths_for(a.workload, a.prompt_len, a.output_len)
        reqs = wl.make_workload(a.workload, a.num_requests or 100, text, a.seed, lengths, a.request_rate)
    clipped = wl.fit_to_model_len(reqs, max_model_len)
    if clipped:
        print(f"# {clipped} requests clipped to max_model_len {max_model_len}", file=sys.stderr)
    if wl.assign_arrivals(reqs, a.request_rate, a.burstiness, a.seed):
        print("# arrivals: the workload's own offsets (--request-rate/--burstiness do not apply)", file=sys.stderr)
    return reqs


def run_serve(a: argparse.Namespace) -> dict:
    """Run the benchmark and return the full result (summary, config, time series, per-request records)."""
    from conveyor.bench.client import run_requests, server_info
    from conveyor.bench.metrics import parse_goodput, summarize, throughput_series

    slos = parse_goodput(a.goodput)
    base_url = a.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    info = asyncio.run(server_info(base_url, headers))
    max_model_len = a.max_model_len or info.max_model_len
    reqs = build_requests(a, max_model_len)
    model = a.model or info.model
    run = asyncio.run(run_requests(base_url, reqs, model, a.max_concurrency, not a.disable_tqdm, headers,
                                   a.metrics_interval))
    res = summarize(run.records, run.duration_s, slos)
    res["config"] = {"base_url": base_url, "model": model, "workload": a.workload, "num_requests": len(reqs),
                     "request_rate": a.request_rate if math.isfinite(a.request_rate) else "inf",
                     "burstiness": a.burstiness, "max_concurrency": a.max_concurrency, "seed": a.seed,
                     "tokenizer": a.tokenizer, "max_model_len": max_model_len}
    res["throughput_series"] = {"bucket_s": 1.0,
                                "output_tokens_per_s": throughput_series(run.records, run.duration_s)}
    res["server_metrics"] = run.series.to_json()
    res["requests"] = [r.to_json() for r in run.records]
    return res


def cmd_serve(a: argparse.Namespace) -> int:
    from conveyor.bench.report import format_summary, write_report

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the progress bar
    try:
        check_outputs(a)
        res = run_serve(a)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(res))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        write_report(res, a.plot)
        print(f"# plots and report.md in {a.plot}", file=sys.stderr)
    return 0


# ---- bench plan ------------------------------------------------------------------------------------------------
def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_result", default=None, metavar="RESULT.json",
                   help="a `bench serve` result: mean lengths, latency and per-replica throughput")
    p.add_argument("--prompt-tokens", type=_positive_float, default=None, help="mean prompt tokens")
    p.add_argument("--output-tokens", type=_positive_float, default=None, help="mean output tokens")
    p.add_argument("--arrival-rate", type=_positive_float, required=True, help="requests/s to serve")
    p.add_argument("--e2el-ms", type=_positive_float, default=None, help="end-to-end latency SLO (mean)")
    p.add_argument("--tpot-ms", type=_positive_float, default=None, help="time-per-output-token SLO (mean)")
    p.add_argument("--replica-throughput", type=_positive_float, default=None, help="output tokens/s of one replica")
    p.add_argument("--model", default="demo", help="'demo' or a checkpoint directory (reads config.json)")
    p.add_argument("--layers", type=_positive_int, default=None)
    p.add_argument("--kv-heads", type=_positive_int, default=None)
    p.add_argument("--head-dim", type=_positive_int, default=None)
    p.add_argument("--dtype-bytes", type=_positive_int, default=None)
    p.add_argument("--headroom", type=float, default=0.3, help="spare capacity: 0.3 provisions 30%% more")
    p.add_argument("--replica-kv-gib", type=_positive_float, default=None, help="KV cache memory of one replica")
    p.add_argument("--max-num-seqs", type=_positive_int, default=None, help="batch slots of one replica")
    p.add_argument("--profile", default=None, metavar="PROFILE.json",
                   help="a replica's latency at several concurrencies (bench/autoscale_profile.py writes it; "
                        "`autoscale simulate --profile` reads it): each fleet size's latency is checked with it")
    p.add_argument("--output", default=None, help="write plan.json here")


def plan_inputs(a: argparse.Namespace):
    from conveyor.bench.plan import ModelShape, PlanInputs, choose_latency, inputs_from_result, load_shape

    measured = res = None
    if a.from_result:
        with open(a.from_result) as f:
            res = json.load(f)
        measured = inputs_from_result(res)
    prompt = a.prompt_tokens if a.prompt_tokens is not None else (measured or {}).get("prompt_tokens")
    output = a.output_tokens if a.output_tokens is not None else (measured or {}).get("output_tokens")
    tput = a.replica_throughput or (measured or {}).get("replica_throughput")
    if prompt is None or output is None or not tput:
        raise ValueError("need --from RESULT.json, or --prompt-tokens, --output-tokens and --replica-throughput")
    latency, source, notes = choose_latency(output, measured, a.e2el_ms, a.tpot_ms)
    if measured and not a.replica_throughput:
        notes.append("note: R is the bench result's measured output throughput, a replica's capacity only if that "
                     "run saturated the server (rate inf or a high --max-concurrency)")
    given = (a.layers, a.kv_heads, a.head_dim, a.dtype_bytes)
    base = ModelShape(*given) if all(given) else load_shape(a.model)
    shape = ModelShape(*(x or y for x, y in zip(given, (base.layers, base.kv_heads, base.head_dim,
                                                          base.dtype_bytes))))
    if not 0 <= a.headroom < 10:
        raise ValueError("--headroom must be in [0, 10)")
    replica_kv = a.replica_kv_gib * 2**30 if a.replica_kv_gib else None
    return PlanInputs(a.arrival_rate, prompt, output, latency, source, tput, shape, a.headroom, replica_kv,
                      a.max_num_seqs), notes, latency_curve(a, res, prompt, output)


def latency_curve(a: argparse.Namespace, res: dict | None, prompt: float, output: float):
    """A replica's latency by load: from --profile, else the bench result's one point, else None (unknown)."""
    from conveyor.bench.plan_latency import curve_from_profile, curve_from_result

    if a.profile:
        return curve_from_profile(a.profile, prompt, output)
    return curve_from_result(res) if res is not None else None


def cmd_plan(a: argparse.Namespace) -> int:
    """Prints the capacity arithmetic, then, when the latency is known by load, each fleet size against the
    objective. Exit 0 with a recommendation; 1 when no fleet size meets the objective (none is recommended);
    2 for bad input."""
    from conveyor.bench.plan import make_plan
    from conveyor.bench.plan_latency import Objective, fleet_sizes, format_sizes, none_meets

    try:
        if a.output:
            check_outputs(a)
        inputs, notes, curve = plan_inputs(a)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(inputs)
    objective = Objective(a.e2el_ms / 1e3 if a.e2el_ms else None, a.tpot_ms / 1e3 if a.tpot_ms else None)
    rows, n = [], plan.replicas
    if curve is not None:
        rows, n = fleet_sizes(plan.replicas, inputs.arrival_rate, plan.output_demand, inputs.replica_throughput,
                              curve, objective)
    print("Capacity plan")
    for line in plan.steps[:-1] + notes:
        print(f"  {line}")
    if rows:
        print(f"Latency by fleet size (each replica's latency at its load, from {curve.source}):")
        for line in format_sizes(rows):
            print(f"  {line}")
    unchecked = curve is None and (objective.e2el_s is not None or objective.tpot_s is not None)
    if n is None:
        print(f"  {none_meets(curve, objective, rows)}")
    elif unchecked:
        print(f"  {plan.steps[-1]}: capacity only, the latency objective is NOT checked (no replica latency is known; "
              f"give --profile P.json or --from a bench serve result)")
    elif n > plan.replicas:
        print(f"  {plan.conclusion(n, inputs)} (the latency objective's; capacity alone needs {plan.replicas})")
    else:
        print(f"  {plan.steps[-1]}")
    if a.output:
        from dataclasses import asdict

        with open(a.output, "w") as f:
            json.dump({**plan.to_json(inputs), "replicas": n, "replicas_for_capacity": plan.replicas,
                       "meets_objective": None if unchecked else n is not None,
                       "fleet_sizes": [asdict(r) for r in rows], "notes": notes},
                      f, indent=1, ensure_ascii=False)
    return 0 if n is not None else 1


# ---- bench compare ---------------------------------------------------------------------------------------------
def add_compare_args(p: argparse.ArgumentParser) -> None:
    from conveyor.bench.compare import MODES
    from conveyor.bench.workloads import WORKLOADS

    p.add_argument("--model", default="demo", help="'demo' or a checkpoint directory (see --load-format)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--workload", default="mixed", choices=WORKLOADS)  # a trace file is not supported here
    p.add_argument("--num-requests", type=_positive_int, default=64)
    p.add_argument("--request-rate", type=_positive_float, default=math.inf, help="requests/s, or inf: all at once")
    p.add_argument("--burstiness", type=_positive_float, default=1.0)
    p.add_argument("--prompt-len", type=_positive_int, default=None, help="override the workload's mean prompt tokens")
    p.add_argument("--output-len", type=_positive_int, default=None, help="override the workload's mean output tokens")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="the clients' max_tokens cap (default: the workload's longest output)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=32)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    p.add_argument("--block-size", type=_positive_int, default=16)
    p.add_argument("--num-kv-blocks", type=_positive_int, default=None,
                   help="the KV budget every mode gets (default: max_num_seqs average-length sequences)")
    p.add_argument("--batch-window-s", type=float, default=0.05, help="dynamic batching's window")
    p.add_argument("--batch-timeout-s", type=float, default=2.0, help="static batching's flush timeout")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--repeat", type=_positive_int, default=1,
                   help="run every mode this many times, round robin, and report medians (for noisy machines)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write compare.png here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar (or progress lines off a terminal)")


def compare_requests(a: argparse.Namespace, max_model_len: int) -> list:
    from conveyor.bench import workloads as wl
    from conveyor.bench.compare import CompareRequest

    text = wl.TextTokens(wl.load_tokenizer("demo" if a.model == "demo" else a.model))
    lengths = wl.lengths_for(a.workload, a.prompt_len, a.output_len)
    reqs = wl.make_workload(a.workload, a.num_requests, text, a.seed, lengths, a.request_rate)
    cap = a.max_tokens or max(r.output_len for r in reqs)
    wl.fit_to_model_len(reqs, max_model_len - max(0, cap - min(r.output_len for r in reqs)))
    wl.assign_arrivals(reqs, a.request_rate, a.burstiness, a.seed)
    return [CompareRequest(r.arrival_s, r.prompt_ids, min(r.output_len, cap),
                           max(1, min(cap, max_model_len - len(r.prompt_ids)))) for r in reqs]


def check_outputs(a: argparse.Namespace) -> None:
    """--output (a file) and --plot (a folder, created if missing) can be written: ValueError (one line) if not,
    before the run rather than after."""
    from conveyor.output_files import check_output_file, prepare_output_dir

    if a.output:
        check_output_file(a.output, "--output")
    if getattr(a, "plot", None):
        prepare_output_dir(a.plot, "--plot")


def cmd_compare(a: argparse.Namespace) -> int:
    try:
        check_outputs(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_compare(a)


def run_compare(a: argparse.Namespace) -> int:
    from pathlib import Path

    from conveyor.bench.compare import compare, format_table, plot, write_json
    from conveyor.engine.kv_cache_manager import cdiv
    from conveyor.llm import LLM

    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    probe = LLM(a.model, load_format=a.load_format, dtype=a.dtype, num_kv_blocks=1)
    max_model_len = probe.engine.max_model_len
    del probe
    reqs = compare_requests(a, max_model_len)
    mean_len = sum(len(r.prompt_token_ids) + r.output_len for r in reqs) / len(reqs)
    blocks = a.num_kv_blocks or cdiv(int(a.max_num_seqs * mean_len), a.block_size)
    need = max(cdiv(len(r.prompt_token_ids) + r.max_tokens, a.block_size) for r in reqs)
    blocks = max(blocks, need)  # every request must fit alone, or the engine rejects it
    print(f"# {len(reqs)} requests ({a.workload}), mean prompt+output {mean_len:.0f} tokens, max_tokens cap "
          f"{max(r.max_tokens for r in reqs)}; KV budget {blocks} blocks x {a.block_size} = {blocks * a.block_size} "
          f"token slots for every mode", file=sys.stderr)
    with compare_progress(len(a.modes) * a.repeat * len(reqs), a.disable_tqdm) as bar:
        modes = compare(a.model, reqs, blocks, a.block_size, a.max_num_seqs, a.max_num_batched_tokens, a.dtype,
                        a.load_format, a.batch_window_s, a.batch_timeout_s, a.modes, a.repeat, bar)
    print(format_table(modes))
    result = {"modes": modes, "config": {
        "model": a.model, "load_format": a.load_format, "dtype": a.dtype, "workload": a.workload,
        "num_requests": len(reqs), "request_rate": a.request_rate if math.isfinite(a.request_rate) else "inf",
        "max_num_seqs": a.max_num_seqs, "block_size": a.block_size, "num_kv_blocks": blocks, "seed": a.seed,
        "repeat": a.repeat, "threads": a.threads,
        "command": "conveyor " + " ".join(sys.argv[1:])}}
    if a.output:
        write_json(result, Path(a.output))
    if a.plot:
        plot(modes, Path(a.plot))
    return 0


@contextlib.contextmanager
def compare_progress(total: int, disable: bool):
    """The requests of every run on one bar (ETA over the whole experiment); on a terminal, log lines go above it.
    Off a terminal: a line as each run starts and every 10 s."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from conveyor.progress import Progress

    with Progress(total, "compare", "req", every_s=10.0, disable=disable) as bar:
        with logging_redirect_tqdm() if bar.tty and not disable else contextlib.nullcontext():
            yield bar
