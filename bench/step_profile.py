"""Where an engine step's time goes, by the categories of issue 15: attention; decoder GEMMs; lm_head; other
elementwise ops; Python: input preparation, scheduler, sampler, outputs.

The engine runs in this process on the peers' reference workload (prompts and output lengths of
/tmp/peers/workload_n64.json, greedy, ignore_eos) with at most --concurrency requests in flight, as the load
client keeps them against a server: a finished request is replaced by the next one between steps. Every
engine.step() is timed by the wall clock and runs under torch.profiler (CPU, record_shapes off), in windows of
--window steps whose events are classified and dropped, so memory stays flat.

Classification: this script wraps the engine's parts in record_function ranges (instance attributes only; no
engine code changes): the step, Scheduler.schedule, ModelRunner.execute, the model's forward, every *Linear module
inside the decoder layers (decoder GEMMs), lm_head, Sampler.sample / logprobs, and the model module's attention
function(s). Each profiler event's self time goes to the category of its nearest enclosing range; a range or op
named `attention`, or whose name contains `attention` (the engine's own record_function("attention"), a
`conveyor::paged_attention`-style C++ op, SDPA), is attention wherever it sits. Inside the forward, what is in no
finer range is "other elementwise ops" (norms, rope, SiLU-mul, residual adds, embedding, and the forward's Python).
Inside ModelRunner.execute, ops before the forward are "input preparation", and ops after it (selecting the sampled
rows of the hidden states, the logits' float32 cast) count as "lm_head" with the lm_head GEMM itself. Inside the
step, outside every other range: "outputs" (the engine's bookkeeping, detokenization, output objects). Time between
steps (adding requests) is not step time and is reported apart. The profiler adds a few µs to every op, so the
profiled total runs a little above the wall clock an unprofiled step would take; the table gives the wall clock of
the profiled steps next to it.

CPU use is measured over the steps alone (the process's CPU seconds, all threads, and /proc/stat for the machine),
in % of the whole machine: a process keeping both cores busy for the whole step shows 100 %. The run starts once
the machine is idle (--wait-idle). The engine runs as `conveyor serve` does by default (max_num_seqs 128, 2048
batched tokens, prefix caching on) but without the server's HTTP and streaming around it.

    .venv/bin/python bench/step_profile.py                                 # small model, bf16, ~2-3 min
    .venv/bin/python bench/step_profile.py --attention-backend torch,cpp   # before / after in one run
    .venv/bin/python bench/step_profile.py --smoke                         # demo model, a few requests
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_vs_llama import PEERS_DIR, CpuSnapshot, cpu_usage, snapshot, wait_idle  # noqa: E402

from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from conveyor.engine.engine import Engine  # noqa: E402
from conveyor.sampling_params import SamplingParams  # noqa: E402

CATEGORIES = ("attention", "decoder GEMMs", "lm_head", "other elementwise ops", "Python: input preparation",
              "Python: scheduler", "Python: sampler", "Python: outputs")
OUTSIDE = "between steps"
RANGES = {  # the ranges this script opens -> their category
    "profile.step": "Python: outputs",
    "profile.scheduler": "Python: scheduler",
    "profile.runner": "Python: input preparation",
    "profile.forward": "other elementwise ops",
    "profile.gemm": "decoder GEMMs",
    "profile.lm_head": "lm_head",
    "profile.sampler": "Python: sampler",
}


def is_attention(name: str) -> bool:
    """An attention range or op: `attention` itself, or any name containing it but this script's own ranges
    (`conveyor::paged_attention`, `aten::scaled_dot_product_attention`, `_scaled_dot_product_flash_attention...`)."""
    return "attention" in name.lower() and not name.startswith("profile.")


def classify(chain: list[str]) -> str:
    """The category of an event from its name and its ancestors' (chain[0] the event, then its parent, ... the
    root): the first attention name or known range on the way up, OUTSIDE when there is none."""
    for name in chain:
        if is_attention(name):
            return "attention"
        if name in RANGES:
            return RANGES[name]
    return OUTSIDE


def after_forward(start_us: float, forward_ends_us: list[float]) -> bool:
    """Whether an op inside ModelRunner.execute started after its model forward(s) ended: then it works on the
    logits (selecting the rows that are sampled, the float32 cast), which counts as lm_head, not input preparation."""
    return bool(forward_ends_us) and start_us >= max(forward_ends_us)


# ---- instrumentation -------------------------------------------------------------------------------------------------
def ranged(fn, name: str):
    """fn wrapped in record_function(name)."""
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def instrument(engine: Engine) -> tuple[list[str], list[tuple[object, str, object]]]:
    """Open this script's ranges around the engine's parts (instance attributes; the classes are untouched).
    Returns what was wrapped, for the report, and the module globals replaced, for restore()."""
    runner, model = engine.runner, engine.runner.model
    engine.scheduler.schedule = ranged(engine.scheduler.schedule, "profile.scheduler")
    runner.execute = ranged(runner.execute, "profile.runner")
    model.forward = ranged(model.forward, "profile.forward")
    engine.sampler.sample = ranged(engine.sampler.sample, "profile.sampler")
    engine.sampler.logprobs = ranged(engine.sampler.logprobs, "profile.sampler")
    done = ["scheduler", "runner", "forward", "sampler"]
    if isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        model.lm_head.forward = ranged(model.lm_head.forward, "profile.lm_head")
        done.append("lm_head")
    gemms = [m for m in model.model.layers.modules() if type(m).__name__.endswith("Linear")]
    for m in gemms:
        m.forward = ranged(m.forward, "profile.gemm")
    done.append(f"{len(gemms)} decoder GEMMs")
    mod, replaced = sys.modules[type(model).__module__], []
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
        if is_attention(name):  # called through the module's globals, so the wrapper is what runs
            setattr(mod, name, ranged(fn, "attention"))
            replaced.append((mod, name, fn))
            done.append(f"{mod.__name__}.{name}")
    return done, replaced


def restore(replaced: list[tuple[object, str, object]]) -> None:
    """Put back the module globals instrument() replaced (the engine's wrapped attributes die with it)."""
    for mod, name, fn in replaced:
        setattr(mod, name, fn)


# ---- the profile ---------------------------------------------------------------------------------------------------
class Tally:
    """Self time per category (µs) and per op within it, summed over profiler windows."""

    def __init__(self) -> None:
        self.us: dict[str, float] = defaultdict(float)
        self.ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, events) -> None:
        """events: a profiler's FunctionEvents (cpu_parent links give each one's ancestors)."""
        for ev in events:
            chain, e = [], ev
            while e is not None:
                chain.append(e)
                e = e.cpu_parent
            cat = classify([x.name for x in chain])
            if cat == "Python: input preparation" and ev.name != "profile.runner":
                runner = next(x for x in chain if x.name == "profile.runner")
                ends = [c.time_range.end for c in runner.cpu_children if c.name == "profile.forward"]
                cat = "lm_head" if after_forward(ev.time_range.start, ends) else cat
            self.us[cat] += ev.self_cpu_time_total
            self.ops[cat][ev.name] += ev.self_cpu_time_total

    def top_ops(self, cat: str, n: int = 4) -> list[tuple[str, float]]:
        return sorted(self.ops[cat].items(), key=lambda kv: -kv[1])[:n]


def engine_config(a: argparse.Namespace, backend: str | None) -> EngineConfig:
    """The engine as `conveyor serve` runs it by default, with backend as its attention_backend when given.
    Raises ValueError if a backend is asked for and the engine has no such option."""
    model = ModelConfig(model=a.model, dtype=a.dtype)
    config = EngineConfig(model=model, cache=CacheConfig(), scheduler=SchedulerConfig(), device="cpu")
    if backend is None:
        return config
    for part in (config, model, config.cache, config.scheduler):
        if "attention_backend" in {f.name for f in dataclasses.fields(part)}:
            setattr(part, "attention_backend", backend)
            part.__post_init__()
            return config
    raise ValueError("this engine has no attention_backend option yet (grep -rn attention_backend conveyor/)")


def cpu_now() -> CpuSnapshot:
    """The machine's counters and this process's CPU seconds (all its threads)."""
    t = os.times()
    return snapshot({}, {"engine": t.user + t.system})


def steps_cpu(pairs: list[tuple[CpuSnapshot, CpuSnapshot]], ncpu: int) -> dict[str, float]:
    """CPU use over the steps alone (each pair: before and after one step), as cpu_usage() reports it."""
    zero = CpuSnapshot(0.0, 0.0, 0.0, {k: 0.0 for k in pairs[0][0].procs_s})
    total = CpuSnapshot(sum(b.wall_s - a.wall_s for a, b in pairs), sum(b.busy_s - a.busy_s for a, b in pairs),
                        sum(b.total_s - a.total_s for a, b in pairs),
                        {k: sum(b.procs_s[k] - a.procs_s[k] for a, b in pairs) for k in zero.procs_s})
    return cpu_usage(zero, total, ncpu)


def drive(engine: Engine, requests: list[dict], concurrency: int, window: int, tally: Tally) -> dict:
    """Run requests through engine with at most `concurrency` unfinished, profiling `window` steps at a time.
    Returns the step count, wall-clock step time, CPU use during the steps (not while adding requests or
    classifying profiler events) and output tokens."""
    pending, inflight = deque(requests), set()
    step_s, cpu, out_tokens, between_s = [], [], 0, 0.0

    def top_up() -> None:
        while pending and len(inflight) < concurrency:
            r = pending.popleft()
            engine.add_request(f"r{r['id']}", r["prompt_ids"],
                               SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"], ignore_eos=True))
            inflight.add(f"r{r['id']}")

    while pending or inflight:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(window):
                t0 = time.perf_counter()
                top_up()
                between_s += time.perf_counter() - t0
                if not inflight:
                    break
                with record_function("profile.step"):
                    c0, t0 = cpu_now(), time.perf_counter()
                    outs = engine.step()
                    step_s.append(time.perf_counter() - t0)
                    cpu.append((c0, cpu_now()))
                for o in outs:
                    if o.error:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                    if o.finished:
                        inflight.discard(o.request_id)
                        out_tokens += o.num_generated_tokens
        tally.add(prof.events())
    return {"steps": len(step_s), "step_wall_s": sum(step_s), "between_steps_s": between_s,
            "output_tokens": out_tokens, "cpu_pct": steps_cpu(cpu, os.cpu_count() or 1)}


def profile_once(a: argparse.Namespace, requests: list[dict], backend: str | None) -> dict:
    """Load the engine, instrument it, run the workload; the table's numbers and the process's CPU use."""
    engine = Engine(engine_config(a, backend))
    wrapped, replaced = instrument(engine)
    tally = Tally()
    idle = wait_idle(a.wait_idle, a.idle_threshold, os.cpu_count() or 1)
    try:
        run = drive(engine, requests, a.concurrency, a.window, tally)
    finally:
        restore(replaced)
    steps = max(run["steps"], 1)
    profiled = sum(tally.us[c] for c in CATEGORIES) / 1e3
    return {"attention_backend": backend or "default", "instrumented": wrapped, **run, **idle,
            "output_tok_s_under_profiler": run["output_tokens"] / run["step_wall_s"],
            "wall_ms_per_step": 1e3 * run["step_wall_s"] / steps, "profiled_ms_per_step": profiled / steps,
            "categories": {c: {"ms_per_step": tally.us[c] / 1e3 / steps,
                               "share_pct": 100 * tally.us[c] / 1e3 / profiled if profiled else 0.0,
                               "top_ops": [(n, round(us / 1e3 / steps, 3)) for n, us in tally.top_ops(c)]}
                           for c in CATEGORIES}}


def format_table(res: dict, ncpu: int) -> str:
    lines = [f"attention backend: {res['attention_backend']}; {res['steps']} steps, {res['output_tokens']} output "
             f"tokens in {res['step_wall_s']:.1f} s of steps ({res['output_tok_s_under_profiler']:.1f} tok/s under the "
             f"profiler)", "", "| category | ms/step | share | top ops (ms/step) |", "|---|---|---|---|"]
    for c, v in res["categories"].items():
        ops = ", ".join(f"{n} {ms:.2f}" for n, ms in v["top_ops"][:3])
        lines.append(f"| {c} | {v['ms_per_step']:.2f} | {v['share_pct']:.1f} % | {ops} |")
    cpu = res["cpu_pct"]
    lines += [f"| **profiled step** | **{res['profiled_ms_per_step']:.2f}** | 100 % | |",
              f"| wall clock of engine.step() | {res['wall_ms_per_step']:.2f} | | |", "",
              f"between steps (adding requests): {1e3 * res['between_steps_s']:.0f} ms in all; CPU during the steps in "
              f"% of the machine ({ncpu} cores): this process {cpu['engine']:.0f} %, machine {cpu['machine']:.0f} "
              f"%, others {cpu['others']:.0f} %"]
    return "\n".join(lines)


# ---- workloads -----------------------------------------------------------------------------------------------------
def load_workload(path: Path, limit: int) -> list[dict]:
    """The peers' workload file: requests with prompt_ids and max_new_tokens (the first `limit`; 0: all).
    Raises FileNotFoundError naming the set-up that makes it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (run ../shared/peers/setup_llama_server.sh)")
    reqs = json.loads(path.read_text())["requests"]
    return reqs[:limit] if limit else reqs


def smoke_workload(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """n short requests of random token ids (8-24 prompt tokens, 2-6 outputs) for the demo model."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 25, (n,), generator=g).tolist()
    outs = torch.randint(2, 7, (n,), generator=g).tolist()
    return [{"id": i, "prompt_ids": torch.randint(0, vocab, (p,), generator=g).tolist(), "max_new_tokens": o}
            for i, (p, o) in enumerate(zip(lens, outs))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a bad value exits with one line from argparse."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(PEERS_DIR / "models" / "small"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workload", type=Path, default=PEERS_DIR / "workload_n64.json")
    p.add_argument("--limit", type=int, default=0, help="only the first N requests (0: all)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--window", type=int, default=16, help="steps per profiler window")
    p.add_argument("--attention-backend", default="",
                   help="comma-separated backends to profile one after another (e.g. torch,cpp); default: the "
                        "engine's own choice")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--wait-idle", type=float, default=300.0,
                   help="most seconds to wait for an idle machine before the run (0: do not wait)")
    p.add_argument("--idle-threshold", type=float, default=5.0,
                   help="machine busy share (%% of all cores) under which it counts as idle")
    p.add_argument("--smoke", action="store_true", help="demo model, 6 short requests, concurrency 4")
    p.add_argument("--output", help="write the results as JSON here")
    a = p.parse_args(argv)
    if min(a.concurrency, a.window) < 1 or min(a.limit, a.threads) < 0:
        p.error("--concurrency and --window must be at least 1, --limit and --threads at least 0")
    a.backends = [b.strip() for b in a.attention_backend.split(",") if b.strip()] or [None]
    if a.smoke:
        a.model, a.dtype, a.concurrency, a.window, a.wait_idle = "demo", "float32", 4, 4, 0.0
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ncpu = os.cpu_count() or 1
    try:
        requests = smoke_workload(6, 256) if a.smoke else load_workload(a.workload, a.limit)
        results = []
        for backend in a.backends:
            results.append(profile_once(a, requests, backend))
            print(format_table(results[-1], ncpu) + "\n", flush=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"step_profile: {e}")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps({"model": a.model, "dtype": a.dtype, "concurrency": a.concurrency,
                                              "torch_threads": torch.get_num_threads(), "results": results},
                                             indent=1))
    return results


if __name__ == "__main__":
    main()
