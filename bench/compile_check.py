"""Does `torch.compile` make the non-attention part of a decoder layer faster on CPU than the engine's eager path
with its fused C++ ops? (issue 15: "consider torch.compile for the non-attention part and keep it if it measures
faster").

One decoder layer of the peers' reference model (hidden 768, intermediate 2048, 12 heads / 4 KV heads, head_dim
64; random weights), run as the engine runs it but with attention taken out: input norm → qkv projection → rope →
o_projection of the rotated q → residual add + norm → gated MLP → residual add + norm, the residual stream in
float32 as the engine keeps it. Variants, timed in interleaved rounds at each token count T (decode batches and
prefill chunks):

* eager + fused: the engine's CPU path (conveyor/kernels/cpu/fused.cpp: add_rms_norm, rope, silu_mul);
* eager, torch ops: the same layer without the fused ops;
* compiled: `torch.compile(dynamic=True)` of the torch-ops variant (inductor fuses the elementwise ops itself; one
  graph for every T, as a serving engine's varying batch needs), compile time reported.

Prints µs per layer call (median over rounds) and each variant's ratio to eager + fused, with the process's CPU use
in % of the machine over the timed calls.

    .venv/bin/python bench/compile_check.py [--dtype bfloat16] [--tokens 1 16 64 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conveyor.kernels import cpu_ops  # noqa: E402
from conveyor.model.layers import add_rms_norm, apply_rotary  # noqa: E402
from conveyor.model.llama import ArchConfig, DecoderLayer, LlamaModel  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
          "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def layer_without_attention(layer: DecoderLayer, h: torch.Tensor, residual: torch.Tensor,
                            rope: tuple[torch.Tensor, torch.Tensor], fused: bool) -> torch.Tensor:
    """DecoderLayer.forward with paged attention replaced by the rotated q (same shapes): h [T, hidden] in the
    model's dtype, residual [T, hidden] float32 (updated in place). Returns the next layer's normed input."""
    a = layer.self_attn
    t = h.shape[0]
    qk, _v = a.qkv_proj(h).split([a.q_size + a.kv_size, a.kv_size], dim=-1)
    qk = qk.view(t, a.num_heads + a.num_kv_heads, a.head_dim)
    q, _k = apply_rotary(qk, *rope, fused=fused).split([a.num_heads, a.num_kv_heads], dim=1)
    o = a.o_proj(q.reshape(t, a.q_size))
    h = add_rms_norm(o, residual, layer.post_attention_layernorm, fused)
    return add_rms_norm(layer.mlp(h, fused), residual, layer.input_layernorm, fused)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def time_calls(fn, args: tuple, calls: int) -> tuple[float, float, float]:
    """(µs per call, wall s, CPU s) of `calls` calls after one warm-up call."""
    fn(*args)
    c0, t0 = _cpu_s(), time.perf_counter()
    for _ in range(calls):
        fn(*args)
    wall = time.perf_counter() - t0
    return wall / calls * 1e6, wall, _cpu_s() - c0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256], help="T: tokens per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=50, help="calls per variant per round (fewer for large T)")
    a = p.parse_args()
    if not cpu_ops.load():
        print(f"error: the C++ kernels did not load: {cpu_ops.error()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    c = ArchConfig.from_hf(CONFIG)
    layer = DecoderLayer(c).to(dtype).eval()
    rotary = LlamaModel(c, c.max_position_embeddings).rotary
    compiled = torch.compile(layer_without_attention, dynamic=True)
    variants = {"eager + fused": (layer_without_attention, True), "eager, torch ops": (layer_without_attention, False),
                "compiled (inductor)": (compiled, False)}
    print(f"# one decoder layer without attention, {a.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.rounds} interleaved rounds; µs per call (median), ratio to "
          f"eager + fused, process CPU % of the machine")
    print("| T | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    compile_s = None
    with torch.inference_mode():
        for t in a.tokens:
            h = torch.randn(t, c.hidden_size).to(dtype)
            residual = torch.randn(t, c.hidden_size)
            rope = rotary.tables(torch.arange(t), dtype)
            if compile_s is None:
                t0 = time.perf_counter()
                compiled(layer, h, residual.clone(), rope, False)
                compile_s = time.perf_counter() - t0
            calls = max(5, a.calls * 16 // max(16, t))
            runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in variants}
            for _ in range(a.rounds):
                for name, (fn, fused) in variants.items():
                    runs[name].append(time_calls(fn, (layer, h, residual.clone(), rope, fused), calls))
            base = statistics.median(r[0] for r in runs["eager + fused"])
            cells = []
            for name in variants:
                us = statistics.median(r[0] for r in runs[name])
                cpu = 100 * sum(r[2] for r in runs[name]) / sum(r[1] for r in runs[name]) / os.cpu_count()
                cells.append(f"{us:.0f} µs ({base / us:.2f}x, {cpu:.0f} %)")
            print(f"| {t} | " + " | ".join(cells) + " |")
    print(f"\ncompile: {compile_s:.1f} s for the first call (dynamic shapes: later T reuse the graph)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
