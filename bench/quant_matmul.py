"""Weight-only quantized matmuls on CPU: microseconds per call of y = x @ W^T for SmolLM2-135M's projections, at
M = 1, 8, 32, 256 rows of x, for

- bf16 / fp32: a plain torch matmul (F.linear) on float weights;
- int8 / int4: conveyor's QuantizedLinear (bfloat16 activations): per-channel int8 (aten._weight_int8pack_mm), int4
  with group 32 (aten._weight_int4pack_mm_for_cpu), and GGUF Q8_0 kept exact as two int4 halves (one int4 matmul
  over 2K);
- int8 fp32 / int4 fp32: the same kernels with float32 activations (M <= 8 only: they are slow);
- torchao int8 / int8 g32: torchao's Int8WeightOnlyConfig per row and per group of 32, when torchao imports
  (pass --torchao-path DIR for a copy installed with `pip install --no-deps --target DIR torchao`).

The variants of one (shape, M) cell are interleaved, in a rotated order, for --rounds rounds; each round times
calls for at least --min-ms, and the median round is reported. "others' CPU" is the share of the machine other
processes used while a cell was measured (as in offline_throughput.py).

    .venv/bin/python bench/quant_matmul.py [--torchao-path /tmp/torchao_pkg] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import gguf
import torch
import torch.nn.functional as F
from gguf import quants
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import CpuMonitor, wait_for_idle  # noqa: E402

from conveyor.model.quant import QuantizedLinear  # noqa: E402

# SmolLM2-135M's projections as conveyor runs them (q/k/v and gate/up fused): name -> (N, K)
SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}
ROWS = (1, 8, 32, 256)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def torchao_variants(w: torch.Tensor) -> dict:
    """torchao's int8 weight-only layers over w, or {} when torchao does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerGroup
    except ImportError:
        return {}
    out = {}
    for name, cfg in (("torchao int8", Int8WeightOnlyConfig()),
                      ("torchao int8 g32", Int8WeightOnlyConfig(granularity=PerGroup(32)))):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        quantize_(lin, cfg)
        out[name] = lin
    return out


def variants(n: int, k: int) -> dict[str, tuple]:
    """name -> (function of x, x's dtype, largest M to run)."""
    w = torch.randn(n, k) / k ** 0.5
    wb = w.bfloat16()
    q8_0 = QuantizedLinear.from_gguf(quants.quantize(w.numpy(), Q8_0), Q8_0, (n, k), None, torch.bfloat16)
    int8 = QuantizedLinear.from_float(w, None, "int8", dtype=torch.bfloat16)
    int4 = QuantizedLinear.from_float(w, None, "int4", 32, torch.bfloat16)
    int8_32 = QuantizedLinear.from_float(w, None, "int8", dtype=torch.float32)
    int4_32 = QuantizedLinear.from_float(w, None, "int4", 32, torch.float32)
    v = {"bf16": (lambda x: F.linear(x, wb), torch.bfloat16, 256),
         "fp32": (lambda x: F.linear(x, w), torch.float32, 256),
         "int8": (int8, torch.bfloat16, 256), "int4": (int4, torch.bfloat16, 256),
         "Q8_0 2xint4": (q8_0, torch.bfloat16, 256),
         "int8 fp32": (int8_32, torch.float32, 8), "int4 fp32": (int4_32, torch.float32, 8)}
    v.update({name: (lin, torch.bfloat16, 256) for name, lin in torchao_variants(wb).items()})
    return v


def time_call(fn, x: torch.Tensor, min_s: float) -> float:
    """Microseconds per call, over calls for at least min_s."""
    calls, start = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / calls * 1e6


@torch.inference_mode()
def measure_cell(vs: dict, k: int, m: int, rounds: int, min_s: float) -> tuple[dict[str, float], float]:
    """Median µs per call of each variant at m rows, and others' CPU share meanwhile."""
    run = {name: (fn, torch.randn(m, k).to(dt)) for name, (fn, dt, max_m) in vs.items() if m <= max_m}
    for fn, x in run.values():
        fn(x)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in run}
    names = list(run)
    with CpuMonitor() as mon:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(time_call(*run[name], min_s))
    return {name: statistics.median(ts) for name, ts in times.items()}, mon.others


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-ms", type=float, default=10.0)
    ap.add_argument("--torchao-path", default=None, help="a directory holding torchao (pip install --target)")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this long for a quiet machine first")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES to measure")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated values of M")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.torchao_path:
        sys.path.insert(0, a.torchao_path)
    torch.manual_seed(0)
    isa = torch.backends.cpu.get_cpu_capability()  # AVX2 has no bfloat16 arithmetic: bf16 matmuls are emulated
    print(f"torch {torch.__version__}, CPU {isa}, {torch.get_num_threads()} threads; microseconds per call (median "
          f"of {a.rounds} interleaved rounds)", flush=True)
    results = []
    t0 = time.perf_counter()
    for shape in a.shapes.split(","):
        n, k = SHAPES[shape]
        vs = variants(n, k)
        names = list(vs)
        print(f"\n{shape} N={n} K={k}\n{'M':>4} " + " ".join(f"{v:>16}" for v in names) + f" {'others CPU':>10}")
        for m in map(int, a.rows.split(",")):
            wait_for_idle(a.wait_idle)
            us, others = measure_cell(vs, k, m, a.rounds, a.min_ms / 1e3)
            results.append({"shape": shape, "n": n, "k": k, "m": m, "us": us, "others_cpu": others})
            print(f"{m:>4} " + " ".join(f"{us[v]:>16.1f}" if v in us else f"{'-':>16}" for v in names)
                  + f" {others:>10.0%}", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"torch": torch.__version__, "cpu_capability": isa, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
