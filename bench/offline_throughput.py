"""Offline throughput: conveyor's continuous batching against transformers' static-batch `generate`, in one run,
on the same weights and the same workload.

The model is a dummy-weight Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, intermediate 2048, vocab 32000).
Its weights are drawn once by transformers and saved with save_pretrained; both sides load that checkpoint, so their
weights are identical. The workload is a fixed-seed mix of random-token prompts with prompt and output lengths from
long-tailed (lognormal) distributions; every request is greedy and runs to its own output length (ignore_eos).

Useful output = the output tokens each request asked for. transformers runs the workload in arrival order in static
batches (left padding, every batch generates its longest output); padding and tokens past a request's own length are
work, not output. Conveyor gets the whole workload at once.

KV utilization = slots holding a token / slots allocated, summed over every step (a time average). Conveyor: tokens
in the cache / (KV blocks in use * block_size), sampled after each engine step. transformers: at decode step t a
batch's cache holds batch * (padded prompt + t) slots, of which each request's own prompt and wanted outputs count.

"others' CPU" is the share of the machine's CPU time that other processes took during a measurement (from
/proc/stat): on a shared 2-core machine, anything above a few percent makes that number unreliable (both sides use
every core, and a stolen core stalls each parallel op); --wait-idle waits for a quiet machine before each one.

    .venv/bin/python bench/offline_throughput.py                     # bfloat16, 64 requests, float32 check
    .venv/bin/python bench/offline_throughput.py --dtype both        # adds a float32 throughput run
    .venv/bin/python bench/offline_throughput.py --quick             # tiny model and workload, seconds
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conveyor import LLM, SamplingParams
from conveyor.engine.engine import Engine

MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
QUICK_MODEL = dict(MODEL, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256)
PAD = 0


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])


@dataclass
class Result:
    dtype: str
    system: str
    batch: int  # static batch size, or conveyor's max_num_seqs
    output_tokens: int
    seconds: float
    kv_utilization: float
    others_cpu: float  # share of the machine's CPU other processes used meanwhile
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(n: int, seed: int, vocab: int, prompt_median: int, prompt_cap: int, output_median: int,
                  output_cap: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(prompt_median), 0.8, n).astype(int), 4, prompt_cap)
    output_lens = np.clip(rng.lognormal(np.log(output_median), 0.8, n).astype(int), 1, output_cap)
    # ids 0..2 are pad/bos/eos; the prompts avoid them
    prompts = [rng.integers(3, vocab, size=int(p)).tolist() for p in prompt_lens]
    return Workload(prompts, [int(o) for o in output_lens])


class CpuMonitor:
    """Measures wall time, and the share of all CPUs' time that other processes were busy meanwhile."""

    def __enter__(self) -> CpuMonitor:
        self._busy, self._own, self._start = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        others = (_machine_busy_s() - self._busy) - (_own_cpu_s() - self._own)
        self.others = max(0.0, others) / (self.seconds * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float, window_s: float = 2.0) -> None:
    """Wait (at most max_wait_s) until other processes leave the CPU alone for a whole window."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        with CpuMonitor() as mon:
            time.sleep(window_s)
        if mon.others < 0.03:
            return
    print(f"  (the machine did not go idle within {max_wait_s:.0f} s)", flush=True)


def _machine_busy_s() -> float:
    """CPU seconds all processes were busy since boot (user, nice, system, irq, softirq, steal); nan off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """One word per id, so every token id decodes to text (detokenization costs what it would with a real one)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2")


def write_checkpoint(path: Path, model_kwargs: dict, seed: int) -> None:
    """Random float32 weights (transformers' own init), saved where both sides load them."""
    torch.manual_seed(seed)
    config = LlamaConfig(**model_kwargs)
    LlamaForCausalLM(config).save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)


def load_transformers(path: Path, dtype: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # outputs run to their length, as with ignore_eos
    return model


# ---- transformers: static batches -------------------------------------------------------------------------------
def hf_generate_batch(model: LlamaForCausalLM, prompts: list[list[int]], max_new: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=PAD, eos_token_id=None)
    return out[:, width:]


def static_kv_utilization(prompt_lens: list[int], output_lens: list[int]) -> tuple[int, int]:
    """(used, allocated) slot-steps of one static batch: at decode step t the cache holds batch * (width + t)
    slots, of which request i uses its prompt plus min(t, output_i) tokens."""
    width, steps, b = max(prompt_lens), max(output_lens), len(prompt_lens)
    t = np.arange(1, steps + 1)
    allocated = int((b * (width + t)).sum())
    used = int(sum(p * steps + np.minimum(t, o).sum() for p, o in zip(prompt_lens, output_lens)))
    return used, allocated


def run_transformers(model: LlamaForCausalLM, work: Workload, batch: int, dtype: str, wait_idle: float) -> Result:
    used = allocated = 0
    wait_for_idle(wait_idle)
    with CpuMonitor() as mon:
        for i in range(0, len(work.prompts), batch):
            prompts, outs = work.prompts[i:i + batch], work.output_lens[i:i + batch]
            hf_generate_batch(model, prompts, max(outs))
            u, a = static_kv_utilization([len(p) for p in prompts], outs)
            used, allocated = used + u, allocated + a
    return Result(dtype, "transformers static", batch, work.num_output_tokens, mon.seconds, used / allocated,
                  mon.others)


# ---- conveyor: the whole workload at once -----------------------------------------------------------------------
class KVMeter:
    """Samples the engine's KV cache after every step: tokens held vs slots of the blocks in use."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.used = self.allocated = self.steps = self.peak_blocks = 0
        inner = engine.step

        def step():
            outputs = inner()
            self.sample()
            return outputs

        engine.step = step

    def sample(self) -> None:
        e = self.engine
        blocks = e.kv.pool.num_in_use
        self.used += sum(s.num_computed_tokens for s in e.scheduler.running)
        self.allocated += blocks * e.kv.block_size
        self.peak_blocks = max(self.peak_blocks, blocks)
        self.steps += 1

    @property
    def utilization(self) -> float:
        return self.used / max(1, self.allocated)


def make_llm(path: Path, dtype: str, args: argparse.Namespace) -> LLM:
    llm = LLM(str(path), dtype=dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    # first calls pay for kernel selection and allocator growth; the measured run should not
    llm.generate([{"prompt_token_ids": list(range(3, 40))}] * 2,
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return llm


def run_conveyor(llm: LLM, work: Workload, dtype: str, wait_idle: float = 0) -> tuple[Result, list[list[int]]]:
    meter = KVMeter(llm.engine)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in work.output_lens]
    wait_for_idle(wait_idle)
    with CpuMonitor() as mon:
        outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)
    tokens = [o.outputs[0].token_ids for o in outs]
    assert [len(t) for t in tokens] == work.output_lens
    sched = llm.engine.config.scheduler
    extra = {"steps": meter.steps, "peak_kv_blocks": meter.peak_blocks, "kv_blocks_total": llm.engine.kv.num_blocks,
             "max_num_batched_tokens": sched.max_num_batched_tokens,
             "preemptions": llm.engine.scheduler.num_preemptions}
    return Result(dtype, "conveyor continuous", sched.max_num_seqs, work.num_output_tokens, mon.seconds,
                  meter.utilization, mon.others, extra), tokens


def bench_dtype(path: Path, work: Workload, dtype: str, args: argparse.Namespace) -> list[Result]:
    model = load_transformers(path, dtype)
    hf_generate_batch(model, [list(range(3, 40)), list(range(3, 20))], 4)  # warm-up, as for conveyor
    results = []
    for b in args.batch_sizes:
        results.append(run_transformers(model, work, b, dtype, args.wait_idle))
        print(f"  transformers batch {b}: {results[-1].tokens_per_s:.1f} tok/s", flush=True)
    del model
    conveyor, _ = run_conveyor(make_llm(path, dtype, args), work, dtype, args.wait_idle)
    print(f"  conveyor: {conveyor.tokens_per_s:.1f} tok/s", flush=True)
    return results + [conveyor]


def check_identical(path: Path, work: Workload, args: argparse.Namespace) -> bool:
    """float32: conveyor's greedy outputs for the first requests (batched together) against transformers' for each
    request alone (no padding)."""
    _, tokens = run_conveyor(make_llm(path, "float32", args), work, "float32")
    model = load_transformers(path, "float32")
    same = True
    for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
        hf = hf_generate_batch(model, [prompt], n)[0].tolist()
        if hf != tokens[i]:
            first = next(j for j, (a, b) in enumerate(zip(hf, tokens[i])) if a != b)
            print(f"  request {i}: conveyor's output differs from transformers' at token {first} of {n}")
            same = False
    return same


def print_table(results: list[Result], identical: bool | None, work: Workload) -> None:
    print(f"\n{len(work.prompts)} requests, {sum(map(len, work.prompts))} prompt tokens, "
          f"{work.num_output_tokens} output tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':<9} {'system':<20} {'batch':>5} {'out tok/s':>10} {'seconds':>8} {'kv util':>8} "
          f"{'others CPU':>10}")
    for r in results:
        print(f"{r.dtype:<9} {r.system:<20} {r.batch:>5} {r.tokens_per_s:>10.1f} {r.seconds:>8.1f} "
              f"{r.kv_utilization:>8.1%} {r.others_cpu:>10.0%}")
    for dtype in dict.fromkeys(r.dtype for r in results):
        hf = [r for r in results if r.dtype == dtype and r.system.startswith("transformers")]
        conv = next(r for r in results if r.dtype == dtype and r.system.startswith("conveyor"))
        best = max(hf, key=lambda r: r.tokens_per_s)
        print(f"{dtype}: conveyor / best transformers (batch {best.batch}) = "
              f"{conv.tokens_per_s / best.tokens_per_s:.2f}x; conveyor {conv.extra}")
    if identical is not None:
        print(f"float32 greedy outputs identical to transformers: {'yes' if identical else 'no'}")
    if any(r.others_cpu > 0.05 for r in results):
        print("warning: other processes used the CPU during a measurement; its numbers are low and noisy")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bfloat16", "float32", "both"], default="bfloat16",
                   help="dtype(s) of the throughput runs")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32], help="transformers static batches")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--check-requests", type=int, default=3,
                   help="requests whose float32 greedy outputs are compared with transformers' (0: no check)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes to leave the CPU idle")
    p.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run in seconds")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model_kwargs = QUICK_MODEL if args.quick else MODEL
    if args.quick:
        args.num_requests, args.batch_sizes = min(args.num_requests, 12), [4, 8]
        work = make_workload(args.num_requests, args.seed, model_kwargs["vocab_size"], 24, 96, 12, 48)
    else:
        work = make_workload(args.num_requests, args.seed, model_kwargs["vocab_size"], 150, 1024, 100, 512)
    dtypes = ["bfloat16", "float32"] if args.dtype == "both" else [args.dtype]
    results: list[Result] = []
    identical = None
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        path = Path(tmp)
        write_checkpoint(path, model_kwargs, args.seed)
        for dtype in dtypes:
            print(f"{dtype}:", flush=True)
            results += bench_dtype(path, work, dtype, args)
        if args.check_requests:
            identical = check_identical(path, work.head(args.check_requests), args)
    print_table(results, identical, work)
    if args.output:
        out = {"results": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
               "float32_identical": identical,
               "workload": {"num_requests": len(work.prompts), "prompt_tokens": sum(map(len, work.prompts)),
                            "output_tokens": work.num_output_tokens, "seed": args.seed}}
        args.output.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
