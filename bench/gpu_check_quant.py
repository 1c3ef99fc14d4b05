"""One command for a CUDA machine (torch + transformers, no network, no gguf package): do the low-bit layers of
conveyor/model/quant.py compute what they should on CUDA? CI covers only their CPU paths.

    python bench/gpu_check_quant.py            # about a minute; prints one line per check, exits 1 on a failure
    python bench/gpu_check_quant.py cpu        # the same checks on CPU (a dry run of the script itself)

Checks, on `cuda`:
1. GGUF Q4_0 / Q4_1 / Q8_0 blocks (built here with numpy from the block layout, independently of quant.py):
   `dequantize()` equals the blocks' values up to bfloat16 rounding of the block scales, and `forward` matches x @ W^T within the
   3u bound of tests/test_quant.py, for M = 1, 7, 64 rows.
2. `from_float` int8 (per channel) and int4 (group 32): the same codes and scales as quantizing on CPU, and forward
   matches x @ dequantize()^T within the same bound.
3. The engine end to end: `LLM(model="demo", quantization=int8|int4, device="cuda")` greedy tokens equal the same
   run on CPU for most positions (kernels differ; the first tokens must agree).
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch

from conveyor.model.quant import QuantizedLinear

U = 2.0 ** -8  # bfloat16 unit roundoff
BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
failures: list[str] = []
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random raw blocks uint8 [n, k/32 * size] and their float32 values [n, k], from GGUF's block layout."""
    nb = k // 32
    d = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16)
    raw = np.zeros((n, nb, BLOCK[kind]), dtype=np.uint8)
    raw[..., :2] = d.view(np.uint8).reshape(n, nb, 2)
    if kind == "Q8_0":
        q = rng.integers(-128, 128, (n, nb, 32)).astype(np.int8)
        raw[..., 2:] = q.view(np.uint8)
        return raw.reshape(n, -1), (d.astype(np.float32)[..., None] * q).reshape(n, k)
    q = rng.integers(0, 16, (n, nb, 32)).astype(np.uint8)
    off = 2 if kind == "Q4_0" else 4
    raw[..., off:] = q[..., :16] | (q[..., 16:] << 4)  # low nibbles: elements 0..15, high: 16..31
    if kind == "Q4_0":
        return raw.reshape(n, -1), (d.astype(np.float32)[..., None] * (q.astype(np.float32) - 8)).reshape(n, k)
    m = (rng.random((n, nb)) * -0.1).astype(np.float16)
    raw[..., 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    w = d.astype(np.float32)[..., None] * q + m.astype(np.float32)[..., None]
    return raw.reshape(n, -1), w.reshape(n, k)


def forward_close(layer: QuantizedLinear, w: torch.Tensor, m: int) -> tuple[bool, float]:
    x = torch.randn(m, w.shape[1], device=DEVICE, dtype=torch.bfloat16)
    y = layer(x).float()
    ref = x.float() @ w.T
    bound = 3 * U * (x.float().abs() @ w.abs().T) + 1e-6
    return bool((y - ref).abs().le(bound).all()), float(((y - ref).abs() / bound).max())


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    rng = np.random.default_rng(0)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        raw, w = blocks(kind, 192, 576, rng)
        layer = QuantizedLinear.from_gguf(raw, SimpleNamespace(name=kind), (192, 576), None, torch.bfloat16, DEVICE)
        wt = torch.from_numpy(w).to(DEVICE)
        deq = layer.dequantize()
        # only the fp16 block scales round to bfloat16: |w' - w| <= U * (8 |d| + |m + 8d|) (quant.from_gguf)
        d = torch.from_numpy(raw.reshape(192, -1, BLOCK[kind])[..., :2].copy().view(np.float16)[..., 0]).float()
        bound = (U * 8 * 16 * d.abs()).repeat_interleave(32, dim=1).to(DEVICE) + 1e-6  # generous for every kind
        check(f"{kind} dequantize", bool((deq - wt).abs().le(bound).all()),
              f"max err / bound {float(((deq - wt).abs() / bound).max()):.2f}")
        for m in (1, 7, 64):
            ok, worst = forward_close(layer, wt, m)
            check(f"{kind} forward M={m}", ok, f"worst err / bound {worst:.2f}")
    for method in ("int8", "int4"):
        w = torch.randn(960, 576, device=DEVICE) * 0.05
        layer = QuantizedLinear.from_float(w, None, method, dtype=torch.bfloat16)
        deq = layer.dequantize()
        on_cpu = QuantizedLinear.from_float(w.cpu(), None, method, dtype=torch.bfloat16).dequantize()
        check(f"{method} quantized as on CPU", bool(torch.equal(deq.cpu(), on_cpu)),
              f"max diff {float((deq.cpu() - on_cpu).abs().max()):.2e}")
        for m in (1, 7, 64):
            ok, worst = forward_close(layer, deq, m)
            check(f"{method} forward M={m}", ok, f"worst err / bound {worst:.2f}")
    from conveyor import LLM, SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for method in ("int8", "int4"):
        outs = {}
        for device in ("cpu", DEVICE):
            llm = LLM(model="demo", quantization=method, dtype="bfloat16", device=device, num_kv_blocks=64)
            outs[device] = llm.generate(["Hello, world"], params)[0].outputs[0].token_ids
            del llm
        same = sum(a == b for a, b in zip(outs["cpu"], outs[DEVICE]))
        check(f"engine demo {method} {DEVICE} vs cpu", outs["cpu"][:4] == outs[DEVICE][:4] and same >= 12,
              f"{same}/16 tokens equal")
    print(f"{len(failures)} failures" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
