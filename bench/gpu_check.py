"""One command for a CUDA machine (torch, triton, transformers; no network, no FastAPI): the GPU path of issue 15.

    bash bench/gpu_check.sh                       # this script, then the other gpu_check_*.py if time is left
    python bench/gpu_check.py                     # this script only: a few minutes on one H100/H200
    python bench/gpu_check.py --smoke             # tiny sizes on CPU (Triton's interpreter): a dry run of the script

Prints, in order:
1. parity: conveyor/kernels/triton_attention.py against conveyor.model.attention's reference of the contract (in
   fp32) on the device, over random block tables, contexts up to 4k, block sizes 1..256, GQA ratios, sliding windows
   and the three dtypes; within the dtype's rounding bound (as tests/test_triton_attention.py). A failure exits 1.
2. kernel: the kernel's device time (replayed in a CUDA graph, K/V write included) on decode batches (KV bytes read
   per second against the measured device-to-device copy bandwidth) and on a 2048-token prefill (against SDPA on
   contiguous K/V).
3. decode throughput of Conveyor (`LLM(device="cuda")` with attention_backend "triton", its default there, decode
   batches replayed from CUDA graphs; then the same with enforce_eager, and with async_scheduling, whose greedy
   tokens must be the same; then attention_backend "torch") at batch 1, 64 and 256 on a random ~1B Llama in
   bfloat16 (hidden 2048, 16 layers, 32/8 heads, intermediate 5632, vocab 32000), written once with transformers'
   save_pretrained so both sides load the same weights, against the HBM roofline: a decode step must read every
   weight but the embedding table and every sequence's K/V, so tok/s <= batch * bandwidth / those bytes.
4. the same workload through transformers' `generate` (SDPA attention, greedy) on the same GPU.
Decode throughput = batch * (output - 1) / (time to generate `output` tokens - time to generate 1): prefill and
set-up cancel. Every request is a random-token prompt of `prompt` tokens, greedy, ignore_eos.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from conveyor.kernels import triton_attention
from conveyor.kernels.triton_attention import triton_paged_attention
from conveyor.model.attention import reference_paged_attention

UNIT = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
failures: list[str] = []


@dataclass(frozen=True)
class Sizes:
    model: dict
    batches: tuple[int, ...]
    prompt: int
    output: int
    parity: tuple[tuple, ...]  # (q_lens, cached, hq, hk, head_dim, block_size, dtype, window)
    kernel: bool  # time the kernel (meaningless in the interpreter)
    repeats: int  # runs of each (output, 1) pair; the last one is timed


FULL = Sizes(
    model=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632, vocab_size=32000),
    batches=(1, 64, 256), prompt=128, output=128,
    parity=(([1] * 40, list(range(0, 4000, 100)), 32, 8, 64, 16, BF16, 0),
            ([1] * 8 + [5] * 4 + [300, 64], [4095, 1, 17, 999, 3000, 2, 64, 700, 33, 0, 129, 2047, 0, 1000],
             32, 8, 128, 16, F32, 0),
            ([1, 1, 200, 37], [4000, 50, 0, 3000], 16, 2, 64, 1, F16, 0),
            ([1, 4, 512], [3900, 2000, 1000], 8, 8, 128, 256, BF16, 1024),
            ([1, 1, 9, 100], [102, 3000, 40, 0], 12, 4, 64, 8, F32, 40),
            ([1, 1, 64], [1000, 63, 800], 28, 4, 128, 32, BF16, 0),
            ([1, 3, 700], [2500, 10, 0], 8, 1, 80, 64, F16, 256),
            ([2048], [0], 32, 8, 64, 16, BF16, 0)),
    kernel=True, repeats=2)
SMOKE = Sizes(
    model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=256, vocab_size=512),
    batches=(1, 2, 4), prompt=8, output=4,
    parity=(([1, 1, 1], [0, 17, 90], 8, 2, 64, 16, BF16, 0), ([1, 4, 30], [200, 7, 0], 4, 4, 128, 4, F32, 9),
            ([1, 20], [64, 50], 6, 2, 64, 1, F16, 0)),
    kernel=False, repeats=1)


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


# ---- 1. parity ----------------------------------------------------------------------------------------------------
def make_case(seed: int, q_lens: list[int], cached: list[int], hq: int, hk: int, d: int, bs: int,
              dtype: torch.dtype, device: str) -> tuple:
    """Arguments of triton_paged_attention (less scale and window): blocks scattered at random over the cache."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in zip(cached, q_lens)]
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(lens), max(need)), generator=g, dtype=torch.int32)
    slots, used = [], 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used:used + n].int()
        used += n
        pos = torch.arange(cached[s], lens[s])
        slots.append(tables[s, pos // bs].long() * bs + pos % bs)
    t = sum(q_lens)
    x = [torch.randn(*shape, generator=g).to(dtype) for shape in
         ((t, hq, d), (t, hk, d), (t, hk, d), (2, hk, num_blocks, bs, d))]
    meta = [torch.cat(slots), tables, torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32)]
    return tuple(a.to(device) for a in x + meta)


def reference(q, k, v, cache, slots, tables, qs, lens, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """conveyor.model.attention's reference on fp32 copies: (out, P @ |V| for the error bound)."""
    args = (slots, tables, qs, lens, q.shape[-1] ** -0.5, window)
    q, k, v, cache = (x.float() for x in (q, k, v, cache))
    out = reference_paged_attention(q, k, v, cache.clone(), *args)
    cache = cache.clone()  # float() of a float32 tensor is the tensor itself
    cache[1] = cache[1].abs()
    return out, reference_paged_attention(q, k, v.abs(), cache, *args)


def parity(sizes: Sizes, device: str) -> None:
    for i, (q_lens, cached, hq, hk, d, bs, dtype, window) in enumerate(sizes.parity):
        name = (f"parity {len(q_lens)} seqs, q {max(q_lens)}, ctx {max(c + n for c, n in zip(cached, q_lens))}, "
                f"{hq}/{hk} heads, d {d}, bs {bs}, {str(dtype)[6:]}, window {window}")
        q, k, v, cache, slots, tables, qs, lens = make_case(i, q_lens, cached, hq, hk, d, bs, dtype, device)
        want, mag = reference(q, k, v, cache, slots, tables, qs, lens, window)
        try:
            out = triton_paged_attention(q, k, v, cache, slots, tables, qs, lens, d ** -0.5, window)
        except Exception as e:  # a compile or launch failure: one line, the other cases still run
            check(name, False, f"{type(e).__name__}: {str(e)[:400]}")
            continue
        ratio = float(((out.float() - want).abs() / (3 * UNIT[dtype] * (want.abs() + mag) + 1e-6)).max())
        check(name, ratio <= 1.0, f"(worst error / bound {ratio:.2f})")


# ---- 2. kernel timing --------------------------------------------------------------------------------------------
def cuda_time(fn, reps: int = 20) -> float:
    """Median seconds of fn() between CUDA events (the host's launch time included)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gpu_time(fn) -> float:
    """Median seconds of fn() replayed in a CUDA graph (device time only); between events if capture fails."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, return_mode="median") / 1e3
    except Exception as e:
        print(f"  (CUDA graph capture failed, {type(e).__name__}: timing between events)")
        return cuda_time(fn)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write); 64 MiB of host memory on CPU."""
    src = torch.empty(1 << 29 if device == "cuda" else 1 << 25, dtype=BF16, device=device)
    dst = torch.empty_like(src)
    if device == "cpu":
        start = time.perf_counter()
        dst.copy_(src)
        return 2 * src.numel() * 2 / (time.perf_counter() - start)
    return 2 * src.numel() * 2 / cuda_time(lambda: dst.copy_(src), reps=10)


def kernel_timing(bandwidth: float) -> None:
    hq, hk, d, bs = 32, 8, 64, 16
    for batch, ctx in ((1, 4096), (64, 2048), (256, 512), (256, 2048)):
        q, k, v, cache, slots, tables, qs, lens = make_case(0, [1] * batch, [ctx - 1] * batch, hq, hk, d, bs, BF16,
                                                            "cuda")
        sec = gpu_time(lambda: triton_paged_attention(q, k, v, cache, slots, tables, qs, lens, d ** -0.5, 0))
        kv_bytes = batch * ctx * 2 * hk * d * 2
        print(f"kernel decode batch {batch:3d} ctx {ctx:4d}: {sec * 1e6:7.1f} us, KV read at "
              f"{kv_bytes / sec / 1e9:6.0f} GB/s = {kv_bytes / sec / bandwidth:4.0%} of copy bandwidth", flush=True)
    n = 2048
    q, k, v, cache, slots, tables, qs, lens = make_case(0, [n], [0], hq, hk, d, bs, BF16, "cuda")
    sec = gpu_time(lambda: triton_paged_attention(q, k, v, cache, slots, tables, qs, lens, d ** -0.5, 0))
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    sdpa = gpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                             enable_gqa=True))
    flops = 4 * hq * d * n * n / 2
    print(f"kernel prefill {n} tokens: {sec * 1e6:7.1f} us ({flops / sec / 1e12:5.1f} TFLOP/s, with the K/V write); "
          f"SDPA on contiguous K/V {sdpa * 1e6:7.1f} us", flush=True)


# ---- 3 and 4. decode throughput -------------------------------------------------------------------------------------
def write_model(path: Path, model_kwargs: dict, device: str) -> int:
    """A random Llama saved in bfloat16 with a word-level tokenizer; returns the bytes a decode step reads of it
    (every parameter but the embedding table, of which it gathers only the batch's rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from offline_throughput import word_tokenizer  # imports the engine (and with it xgrammar)

    hf_logging.disable_progress_bar()
    config = LlamaConfig(**model_kwargs, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(BF16)
    model.save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    print(f"model: {(n + model.model.embed_tokens.weight.numel()) / 1e6:.0f} M parameters, bfloat16", flush=True)
    return n * 2


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def conveyor_times(path: Path, sizes: Sizes, device: str, backend: str, eager: bool = False,
                   overlap: bool = False) -> dict[int, tuple[float, float, list[int]]]:
    """Per batch: (seconds for `output` tokens, seconds for 1 token, greedy tokens of the first prompt). eager:
    no CUDA graphs (else decode batches replay them, with the triton backend on CUDA); overlap: asynchronous
    scheduling."""
    from conveyor import LLM, SamplingParams

    blocks = max(sizes.batches) * -(-(sizes.prompt + sizes.output) // 16) + 64
    start = time.perf_counter()
    llm = LLM(str(path), dtype="bfloat16", device=device, num_kv_blocks=blocks, max_num_seqs=max(sizes.batches),
              enable_prefix_caching=False, attention_backend=backend, enforce_eager=eager,
              async_scheduling=overlap)
    graphs = llm.engine.runner.graphs
    mode = (", eager" if eager else "") + (", async scheduling" if overlap else "")
    print(f"Conveyor ({backend}{mode}) loaded in {time.perf_counter() - start:.1f} s; "
          f"decode graphs: {graphs.mode + ' ' + str(graphs.sizes) if graphs else 'none'}", flush=True)
    result = {}
    for batch in sizes.batches:
        ps = prompts(batch, sizes.prompt, sizes.model["vocab_size"])
        timed = []
        for n in (sizes.output, 1) * sizes.repeats:  # all but the last pair warm up (Triton compiles, allocator)
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            sync(device)
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in ps], params)
            sync(device)
            timed.append(time.perf_counter() - start)
            got = {len(o.outputs[0].token_ids) for o in outs}
            if got != {n}:
                reasons = sorted({str(o.outputs[0].finish_reason) for o in outs})
                raise RuntimeError(f"Conveyor at batch {batch} generated {sorted(got)} tokens, not {n} ({reasons})")
            tokens = outs[0].outputs[0].token_ids if n > 1 else tokens
        result[batch] = (timed[-2], timed[-1], tokens)
    del llm
    release(device)
    return result


def hf_times(path: Path, sizes: Sizes, device: str) -> dict[int, tuple[float, float, list[int]]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device=device, dtype=BF16).eval()
    model.generation_config.eos_token_id = None
    result = {}
    for batch in sizes.batches:
        ids = torch.tensor(prompts(batch, sizes.prompt, sizes.model["vocab_size"]), device=device)
        timed = []
        for n in (sizes.output, 1) * sizes.repeats:
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
            sync(device)
            timed.append(time.perf_counter() - start)
            tokens = out[0, sizes.prompt:].tolist() if n > 1 else tokens
        result[batch] = (timed[-2], timed[-1], tokens)
    del model
    release(device)
    return result


def release(device: str) -> None:
    """Free what a finished engine or model held (the engine has reference cycles), before the next one loads."""
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def throughput(path: Path, sizes: Sizes, device: str, weight_bytes: int, bandwidth: float) -> None:
    """Conveyor with the Triton attention backend (its default on CUDA; the interpreter on CPU) and with the torch
    one, and transformers."""
    m = sizes.model
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    kv_token = m["num_hidden_layers"] * 2 * m["num_key_value_heads"] * head_dim * 2
    mean_ctx = sizes.prompt + sizes.output / 2
    launches = []
    for kernel in (triton_attention._compiled, triton_attention._interpreted):
        kernel.add_pre_run_hook(lambda *a, **k: launches.append(1))
    runs = {"conveyor": conveyor_times(path, sizes, device, "triton")}
    print(f"Triton attention launches from Python during Conveyor's runs: {len(launches)} (graph replays "
          f"launch none)", flush=True)
    runs["conveyor, eager"] = conveyor_times(path, sizes, device, "triton", eager=True)
    for batch in sizes.batches:  # a batch of a captured size replays the same kernels the eager forward runs
        a, b = runs["conveyor"][batch][2], runs["conveyor, eager"][batch][2]
        check(f"CUDA graph greedy tokens = eager at batch {batch}", a == b,
              "" if a == b else f"first difference at token {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}")
    runs["conveyor, async sched"] = conveyor_times(path, sizes, device, "triton", overlap=True)
    for batch in sizes.batches:
        a, b = runs["conveyor"][batch][2], runs["conveyor, async sched"][batch][2]
        check(f"async scheduling greedy tokens = synchronous at batch {batch}", a == b)
    runs["conveyor, torch attn"] = conveyor_times(path, sizes, device, "torch")
    runs["transformers"] = hf_times(path, sizes, device)
    print(f"decode tok/s and % of the roofline; prompt {sizes.prompt}, output {sizes.output} (roofline: weights "
          f"{weight_bytes / 1e9:.2f} GB + KV {kv_token} B/token at mean context {mean_ctx:.0f}, per step, at "
          f"{bandwidth / 1e9:.0f} GB/s); 'same': leading greedy tokens equal to transformers'")
    names = "".join(f" {name:>21}" for name in runs)
    print(f"{'batch':>6} {'roofline':>9}{names} {'conveyor/hf':>11} {'same':>6}")
    for batch in sizes.batches:
        roof = batch * bandwidth / (weight_bytes + batch * mean_ctx * kv_token)
        # nan where noise made the longer run the faster one (a busy CPU in --smoke)
        tps = {name: batch * (sizes.output - 1) / (r[batch][0] - r[batch][1]) if r[batch][0] > r[batch][1] else
               math.nan for name, r in runs.items()}
        a, b = runs["conveyor"][batch][2], runs["transformers"][batch][2]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        cells = "".join(f" {t:>13.1f} {t / roof:>7.1%}" for t in tps.values())
        print(f"{batch:>6} {roof:>9.0f}{cells} {tps['conveyor'] / tps['transformers']:>10.2f}x {same:>3}/{len(a)}",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU with Triton's interpreter")
    parser.add_argument("--skip-throughput", action="store_true", help="parity and kernel timing only")
    args = parser.parse_args()
    sizes, device = (SMOKE, "cpu") if args.smoke else (FULL, "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --smoke for a dry run on CPU)")
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; triton {__import__('triton').__version__}", flush=True)
    start = time.perf_counter()
    parity(sizes, device)
    print(f"parity done in {time.perf_counter() - start:.0f} s", flush=True)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    if sizes.kernel and not failures:
        kernel_timing(bandwidth)
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                weight_bytes = write_model(Path(tmp), sizes.model, device)
                throughput(Path(tmp), sizes, device, weight_bytes, bandwidth)
            except Exception as e:  # one line, then the summary: parity results still count
                check("throughput", False, f"{type(e).__name__}: {e}")
    print(f"{len(failures)} failures" if failures else "all checks passed", f"({time.perf_counter() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
