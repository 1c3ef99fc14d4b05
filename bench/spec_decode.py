"""Speculative decoding on the built-in real model: the same engine with and without speculation, in one process,
interleaved per repetition (A B, then B A, ...), on two workloads at several concurrencies.

  * grounded: a paragraph of bench/data/perplexity_en.txt with an instruction to proofread it, quote its key
    sentences, rewrite it in the first person or summarize it (the output reuses the input, where n-gram proposals
    from the prompt can hit);
  * chat: the questions of bench/data/chat_questions.json (free answers).

Every prompt is one user message through the model's chat template, in token ids. Each configuration is an
`AsyncEngine` (the server's engine loop, on its own thread); requests are streamed closed-loop at the concurrency,
and TTFT / ITL / TPOT come from conveyor.bench.metrics as for `conveyor bench serve`. A "chunk" is one streamed output
that carries new tokens: with speculation one engine step can hand a sequence several tokens at once, so ITL is the
gap between chunks and TPOT the time per token. The acceptance rate is the delta of the engine's
spec_decode_* statistics over each measurement. CPU: this process (engine thread included) and everything else on
the machine, each in % of all its cores, and output tokens per CPU-second of this process (which other jobs' load
moves much less than tokens/s).

    .venv/bin/python bench/spec_decode.py --out bench/results/spec_decode.json        # ~15 min on 2 cores
    .venv/bin/python bench/spec_decode.py --speculative-config '{"model": "...", "num_speculative_tokens": 4}'
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import cpu_info  # noqa: E402
from conveyor.bench.metrics import RequestRecord, summarize  # noqa: E402
from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig  # noqa: E402
from conveyor.engine.async_engine import AsyncEngine  # noqa: E402
from conveyor.engine.engine import Engine  # noqa: E402
from conveyor.sampling_params import SamplingParams  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
WORKLOADS = ("grounded", "chat")
CONFIGS = ("no-spec", "spec")
GROUNDED_TASKS = (
    "Proofread the text below and give it back with any spelling or grammar mistakes corrected. Reply with the "
    "corrected text only.\n\n{text}",
    "Quote, word for word, the two sentences of the text below that matter most.\n\n{text}",
    "Rewrite the text below in the first person, as if you had been there yourself. Change as little else as "
    "you can.\n\n{text}",
    "Summarize the text below in two or three sentences.\n\n{text}",
)
MIN_PARAGRAPH_CHARS = 200  # leaves out titles, greetings and one-line paragraphs
STAT_KEYS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
PER_POS = "spec_decode_num_accepted_tokens_per_pos"


# ---- workloads -----------------------------------------------------------------------------------------------------
def grounded_texts(seed: int) -> list[str]:
    """Every (paragraph, task) pair of the grounded workload as one user message, shuffled with `seed`."""
    paragraphs = [p.strip() for p in (DATA / "perplexity_en.txt").read_text().split("\n\n")]
    pairs = [t.format(text=p) for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS for t in GROUNDED_TASKS]
    return [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]


def chat_texts() -> list[str]:
    return json.loads((DATA / "chat_questions.json").read_text())


def render(tokenizer, text: str) -> list[int]:
    """One user message through the model's chat template, as token ids."""
    msgs = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def build_prompts(tokenizer, workloads: list[str], concurrency: list[int], num_requests: list[int],
                  seed: int) -> dict[str, dict[int, list[list[int]]]]:
    """{workload: {concurrency: prompts}}; within a workload the concurrencies get disjoint prompts (the texts are
    reused in order when there are too few)."""
    out: dict[str, dict[int, list[list[int]]]] = {}
    for w in workloads:
        texts = grounded_texts(seed) if w == "grounded" else chat_texts()
        ids = [render(tokenizer, t) for t in texts[:sum(num_requests)]]
        at, out[w] = 0, {}
        for c, n in zip(concurrency, num_requests):
            out[w][c] = [ids[(at + i) % len(ids)] for i in range(n)]
            at += n
    return out


# ---- CPU -----------------------------------------------------------------------------------------------------------
def machine_busy_s() -> float:
    """CPU seconds all processes were busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """User + system CPU seconds of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_for_idle(max_wait_s: float, threshold_pct: float, window_s: float = 2.0) -> float | None:
    """Wait (at most max_wait_s) until other processes use under threshold_pct of all cores for a whole window.
    Returns what they used in the last window (None: no wait asked for)."""
    t0, others = time.monotonic(), None
    while max_wait_s > 0:
        with CpuWindow() as w:
            time.sleep(window_s)
        others = w.others
        if others < threshold_pct or time.monotonic() - t0 >= max_wait_s:
            break
    return others


class CpuWindow:
    """CPU used during a `with` block, in % of all the machine's cores: `own` (this process) and `others`."""

    def __enter__(self) -> CpuWindow:
        self._t, self._own, self._all = time.perf_counter(), own_cpu_s(), machine_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        cores = os.cpu_count() or 1
        wall = max(time.perf_counter() - self._t, 1e-9) * cores
        self.own_s = own_cpu_s() - self._own
        self.own = 100 * self.own_s / wall
        self.others = 100 * max(0.0, machine_busy_s() - self._all - self.own_s) / wall


# ---- one measurement -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    records: list[RequestRecord]
    duration_s: float
    token_ids: list[list[int]] = field(default_factory=list)  # per request, the generated tokens


async def stream_one(engine: AsyncEngine, request_id: str, ids: list[int], params: SamplingParams,
                     rec: RequestRecord, t0: float) -> list[int]:
    """Stream one request and fill `rec` (a chunk: an output with new tokens); failures go to rec.error."""
    start = last = time.perf_counter()
    rec.start_s = start - t0
    tokens: list[int] = []
    try:
        async for out in engine.generate(request_id, {"prompt_token_ids": ids}, params):
            c = out.outputs[0]
            if c.num_new_tokens:
                now = time.perf_counter()
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.itl_s.append(now - last)
                last = now
            tokens = c.token_ids
    except Exception as e:  # the run goes on; the summary counts it as failed
        rec.error = f"{type(e).__name__}: {e}"
    rec.latency_s = time.perf_counter() - start
    rec.output_tokens = len(tokens)
    return list(tokens)


async def run_closed_loop(engine: AsyncEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams,
                          tag: str) -> Run:
    """Every prompt, at most `concurrency` in flight (a freed slot takes the next prompt at once)."""
    records = [RequestRecord(i, len(p), params.max_tokens) for i, p in enumerate(prompts)]
    slots = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int) -> list[int]:
        async with slots:
            return await stream_one(engine, f"{tag}-{i}", prompts[i], params, records[i], t0)

    token_ids = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return Run(records, max(r.end_s for r in records), list(token_ids))


def spec_delta(before: dict, after: dict) -> dict | None:
    """The spec_decode_* statistics accrued between two Engine.stats(); None without speculation."""
    if STAT_KEYS[0] not in after:
        return None
    d = {k: after[k] - before[k] for k in STAT_KEYS}
    d[PER_POS] = [a - b for a, b in zip(after[PER_POS], before[PER_POS])]
    drafted = d["spec_decode_num_draft_tokens"]
    d["spec_decode_acceptance_rate"] = d["spec_decode_num_accepted_tokens"] / drafted if drafted else 0.0
    return d


async def measure(engine: AsyncEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams,
                  tag: str) -> tuple[dict, list[list[int]]]:
    """One closed-loop run: its summary row and the generated tokens of each request."""
    before = engine.engine.stats()
    with CpuWindow() as cpu:
        run = await run_closed_loop(engine, prompts, concurrency, params, tag)
    spec = spec_delta(before, engine.engine.stats())
    chunks = sum(len(r.itl_s) + 1 for r in run.records if r.ok and r.ttft_s is not None)
    summary = summarize(run.records, run.duration_s)
    row = {"summary": summary, "tokens_per_chunk": summary["total_output_tokens"] / chunks if chunks else None,
           "cpu_own_pct": cpu.own, "cpu_others_pct": cpu.others, "cpu_own_s": cpu.own_s,
           "tokens_per_cpu_s": summary["total_output_tokens"] / max(cpu.own_s, 1e-9), "spec_decode": spec}
    return row, run.token_ids


# ---- engines -------------------------------------------------------------------------------------------------------
def engine_config(a: argparse.Namespace, speculative: dict | None) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=a.model, dtype=a.dtype, quantization=a.quantization, seed=a.seed),
        cache=CacheConfig(num_kv_blocks=a.num_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max(a.concurrency)),
        speculative=speculative)


async def start_engines(a: argparse.Namespace) -> dict[str, AsyncEngine]:
    """One AsyncEngine per configuration, each warmed up by one short request."""
    engines = {}
    for name, spec in (("no-spec", None), ("spec", a.speculative_config)):
        t = time.perf_counter()
        eng = AsyncEngine(Engine(engine_config(a, spec)), max_waiting_requests=max(a.num_requests) + 8)
        eng.start()
        warm = SamplingParams(temperature=0.0, max_tokens=8)
        async for _ in eng.generate(f"warmup-{name}", "Hello", warm):
            pass
        print(f"# {name}: ready in {time.perf_counter() - t:.1f} s", flush=True)
        engines[name] = eng
    return engines


def mismatches(a: list[list[int]], b: list[list[int]]) -> int:
    """Requests whose generated tokens differ between two runs of the same prompts."""
    return sum(x != y for x, y in zip(a, b))


async def bench(a: argparse.Namespace) -> list[dict]:
    """Every repetition × workload × concurrency, both configurations back to back, their order alternating."""
    engines = await start_engines(a)
    try:
        prompts = build_prompts(engines["no-spec"].engine.tokenizer, a.workloads, a.concurrency, a.num_requests,
                                a.seed)
        params = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, ignore_eos=a.ignore_eos)
        rows = []
        for rep in range(a.repetitions):
            for w in a.workloads:
                for c in a.concurrency:
                    order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
                    tokens, pair = {}, []
                    idle = wait_for_idle(a.wait_idle, a.idle_threshold)
                    for name in order:
                        row, tokens[name] = await measure(engines[name], prompts[w][c], c, params,
                                                          f"{name}-{rep}-{w}-{c}")
                        pair.append({"repetition": rep, "workload": w, "concurrency": c, "config": name,
                                     "requests": len(prompts[w][c]), "others_before_pct": idle, **row})
                        print_row(pair[-1])
                    differ = mismatches(tokens["no-spec"], tokens["spec"]) if a.temperature == 0 else None
                    rows += [{**r, "greedy_mismatches": differ} for r in pair]
    finally:
        for eng in engines.values():
            eng.shutdown()
    return rows


def print_row(r: dict) -> None:
    s, sd = r["summary"], r["spec_decode"]
    acc = ("—" if sd is None else "no drafts" if not sd["spec_decode_num_draft_tokens"]
           else f"{sd['spec_decode_acceptance_rate']:.2f}")
    print(f"  rep {r['repetition']} {r['workload']:<8} c={r['concurrency']:<3} {r['config']:<7} "
          f"{s['output_throughput']:7.1f} tok/s  ITL p50 {s['itl_ms']['p50'] or 0:6.1f} ms  "
          f"acceptance {acc}  tokens/chunk {r['tokens_per_chunk'] or 0:.2f}  "
          f"{r['tokens_per_cpu_s']:5.1f} tok/CPU-s  CPU {r['cpu_own_pct']:3.0f} %  "
          f"others {r['cpu_others_pct']:3.0f} %  failed {s['failed']}", flush=True)


# ---- report --------------------------------------------------------------------------------------------------------
def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(rows: list[dict], a: argparse.Namespace) -> list[dict]:
    """Per workload × concurrency × configuration: medians over the repetitions; the acceptance rate pooled; the
    speed-up is the median of each repetition's spec / no-spec ratio (the pair ran back to back)."""
    cells = []
    for w in a.workloads:
        for c in a.concurrency:
            tps = {n: [r["summary"]["output_throughput"] for r in rows
                       if (r["workload"], r["concurrency"], r["config"]) == (w, c, n)] for n in CONFIGS}
            ratios = [s / b for s, b in zip(tps["spec"], tps["no-spec"]) if b > 0]
            eff = {n: [r["tokens_per_cpu_s"] for r in rows
                       if (r["workload"], r["concurrency"], r["config"]) == (w, c, n)] for n in CONFIGS}
            eff_ratios = [s / b for s, b in zip(eff["spec"], eff["no-spec"]) if b > 0]
            for n in CONFIGS:
                mine = [r for r in rows if (r["workload"], r["concurrency"], r["config"]) == (w, c, n)]
                cells.append(cell(w, c, n, mine, tps[n], ratios if n == "spec" else None))
                if n == "spec":
                    cells[-1]["tokens_per_cpu_s_ratio"] = median(eff_ratios)
    return cells


def cell(w: str, c: int, name: str, rows: list[dict], tps: list[float], ratios: list[float] | None) -> dict:
    sums = {k: sum(r["spec_decode"][k] for r in rows) for k in STAT_KEYS} if rows[0]["spec_decode"] else None
    return {
        "workload": w, "concurrency": c, "config": name,
        "output_tok_s": median(tps), "output_tok_s_min": min(tps), "output_tok_s_max": max(tps),
        "speedup": median(ratios) if ratios else None,
        "speedup_min": min(ratios) if ratios else None, "speedup_max": max(ratios) if ratios else None,
        **{f"{m}_{p}_ms": median([r["summary"][f"{m}_ms"][p] for r in rows])
           for m in ("itl", "tpot", "ttft") for p in ("p50", "p99")},
        "tokens_per_chunk": median([r["tokens_per_chunk"] for r in rows]),
        "tokens_per_cpu_s": median([r["tokens_per_cpu_s"] for r in rows]), "tokens_per_cpu_s_ratio": None,
        "acceptance_rate": (sums["spec_decode_num_accepted_tokens"] / sums["spec_decode_num_draft_tokens"]
                            if sums and sums["spec_decode_num_draft_tokens"] else None),
        "spec_decode": sums,
        "cpu_own_pct": median([r["cpu_own_pct"] for r in rows]),
        "cpu_others_pct": median([r["cpu_others_pct"] for r in rows]),
        "cpu_others_max_pct": max(r["cpu_others_pct"] for r in rows),
        "output_tokens": median([r["summary"]["total_output_tokens"] for r in rows]),
        "failed": sum(r["summary"]["failed"] for r in rows),
        "greedy_mismatches": (sum(r["greedy_mismatches"] for r in rows)
                              if rows[0]["greedy_mismatches"] is not None else None),
    }


def format_table(cells: list[dict], repetitions: int) -> str:
    f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"median of {repetitions} interleaved repetition(s); CPU in % of all {os.cpu_count()} cores", "",
             "| workload | c | config | output tok/s (range) | speed-up (range) | ITL p50 / p99 ms | TPOT p50 ms | "
             "TTFT p50 ms | acceptance | tokens/chunk | tok per CPU-s (ratio) | CPU | others' CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in cells:
        ratio = "" if x["tokens_per_cpu_s_ratio"] is None else f" ({f(x['tokens_per_cpu_s_ratio'], 2)}x)"
        speedup = "" if x["speedup"] is None else (f"{f(x['speedup'], 2)}x ({f(x['speedup_min'], 2)}-"
                                                   f"{f(x['speedup_max'], 2)})")
        lines.append(f"| {x['workload']} | {x['concurrency']} | {x['config']} | {f(x['output_tok_s'])} "
                     f"({f(x['output_tok_s_min'])}-{f(x['output_tok_s_max'])}) | {speedup} | "
                     f"{f(x['itl_p50_ms'])} / {f(x['itl_p99_ms'])} | {f(x['tpot_p50_ms'])} | "
                     f"{f(x['ttft_p50_ms'], 0)} | {f(x['acceptance_rate'], 2)} | {f(x['tokens_per_chunk'], 2)} | "
                     f"{f(x['tokens_per_cpu_s'])}{ratio} | {f(x['cpu_own_pct'], 0)} % | "
                     f"{f(x['cpu_others_pct'], 0)} % (max {f(x['cpu_others_max_pct'], 0)} %) |")
    return "\n".join(lines)


def targets(cells: list[dict]) -> list[str]:
    """The issue's targets: grounded c=1 at least 1.5x; c=32 (either workload) no more than 5 % slower."""
    out = []
    for x in cells:
        if x["config"] != "spec" or x["speedup"] is None:
            continue
        if x["workload"] == "grounded" and x["concurrency"] == 1:
            out.append(f"grounded c=1: {x['speedup']:.2f}x (target >= 1.5x): "
                       f"{'met' if x['speedup'] >= 1.5 else 'MISSED'}")
        if x["concurrency"] == 32:
            out.append(f"{x['workload']} c=32: {x['speedup']:.2f}x (target >= 0.95x): "
                       f"{'met' if x['speedup'] >= 0.95 else 'MISSED'}")
    return out


# ---- main ----------------------------------------------------------------------------------------------------------
def int_list(s: str) -> list[int]:
    try:
        xs = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not xs or min(xs) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return xs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 32])
    p.add_argument("--num-requests", type=int_list, default=[4, 8, 32], help="per concurrency, in order")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs are then compared)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="K of the default n-gram config")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="instead of the default n-gram config (e.g. a draft model)")
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each spec / no-spec pair, wait up to this long for the other processes to go quiet")
    p.add_argument("--idle-threshold", type=float, default=5.0, metavar="PCT",
                   help="'quiet': the others use under this %% of all cores (over 2 s)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    a = p.parse_args(argv)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if unknown := [w for w in a.workloads if w not in WORKLOADS]:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if len(a.num_requests) != len(a.concurrency):
        p.error("--num-requests needs one count per --concurrency")
    if a.repetitions < 1 or a.max_tokens < 1 or a.temperature < 0:
        p.error("--repetitions and --max-tokens must be positive, --temperature >= 0")
    a.speculative_config = speculative_dict(p, a)
    return a


def speculative_dict(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """The speculative config as a dict, checked by SpeculativeConfig (a bad one is one clear error line)."""
    d = {"method": "ngram", "num_speculative_tokens": a.num_speculative_tokens, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
    if a.speculative_config is not None:
        try:
            d = json.loads(a.speculative_config)
        except json.JSONDecodeError as e:
            p.error(f"--speculative-config is not valid JSON: {e}")
    try:
        SpeculativeConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        p.error(f"--speculative-config: {e}")
    return d


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    print(f"# {a.model}; speculative config {json.dumps(a.speculative_config)}; temperature {a.temperature}; "
          f"max_tokens {a.max_tokens}; CPU {cpu_info()}", flush=True)
    t0 = time.monotonic()
    rows = asyncio.run(bench(a))
    cells = aggregate(rows, a)
    table = format_table(cells, a.repetitions)
    checks = targets(cells)
    print(table, *checks, f"(whole run {(time.monotonic() - t0) / 60:.1f} min)", sep="\n")
    result = {"model": a.model, "date": time.strftime("%Y-%m-%d"), "machine": cpu_info(),
              "speculative_config": a.speculative_config, "temperature": a.temperature, "max_tokens": a.max_tokens,
              "ignore_eos": a.ignore_eos, "workloads": a.workloads, "concurrency": a.concurrency,
              "num_requests": a.num_requests, "repetitions": a.repetitions, "cells": cells, "targets": checks,
              "table": table, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
