"""Weight-only quantized layers (conveyor/model/quant.py) against references: the gguf package's own dequantization
for GGUF blocks, float matmuls on the dequantized weights for forward, a float model for quantize_model.

Forward tolerance (bfloat16 compute): the kernels multiply bfloat16 inputs by the dequantized weights and accumulate
in float32. At most three roundings to bfloat16 (unit roundoff u = 2^-8) separate the result from x @ W^T in exact
arithmetic: of each dequantized weight (some kernels dequantize to bfloat16), of the matmul's output, and of the
bias add; so |y - x @ W^T - b| <= 3u * (|x| @ |W|^T + |b|) per element (float32 accumulation error is ~K * 2^-24,
far below). float32 compute gets the same bound with u = 2^-20."""
from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conveyor.model.attention import kv_cache_shape, prompt_metadata, resolve_backend
from conveyor.model.llama import ArchConfig, LlamaForCausalLM
from conveyor.model.quant import QuantizedEmbedding, QuantizedLinear, quantize_model, resident_bytes

QT = gguf.GGMLQuantizationType
GGUF = [QT.Q4_0, QT.Q4_1, QT.Q8_0]
BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
U = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -20}


def gguf_weight(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw blocks from gguf.quants.quantize of weights whose rows span four orders of magnitude."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 10.0 ** rng.uniform(-3, 1, (n, 1)).astype(np.float32)
    return quants.quantize(w, qtype)


def random_blocks(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw blocks with every code value possible (Q8_0's -128 too, which quantize never writes) and random
    finite fp16 scales of either sign."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
    halves = 2 if qtype == QT.Q4_1 else 1
    scales = (rng.standard_normal((n, k // 32, halves)) * 10.0 ** rng.uniform(-4, 0, (n, k // 32, halves)))
    raw[..., :2 * halves] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def dequant_bound(raw: np.ndarray, qtype, dtype: torch.dtype) -> torch.Tensor:
    """The docstring's bound per weight: the rounding of the block scale d (and zero m + 8d) to dtype."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, BLOCK_BYTES[qtype])
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    if qtype == QT.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        per_block = 8 * np.abs(d) + np.abs(m + 8 * d)
    else:
        per_block = (128 if qtype == QT.Q8_0 else 8) * np.abs(d)
    return U[dtype] * torch.from_numpy(np.repeat(per_block[..., 0], 32, axis=1))


def assert_forward_close(layer: QuantizedLinear, x: torch.Tensor) -> None:
    w = layer.dequantize()
    b = layer.bias.float() if layer.bias is not None else torch.zeros(layer.out_features)
    y = layer(x)
    assert y.shape == (*x.shape[:-1], layer.out_features) and y.dtype == x.dtype
    x32 = x.to(layer.dtype).float()  # the layer computes in its own dtype
    ref = x32 @ w.T + b
    bound = 3 * U[layer.dtype] * (x32.abs() @ w.abs().T + b.abs()) + 1e-30
    if x.dtype != layer.dtype:
        bound += U[layer.dtype] * x.float().abs() @ w.abs().T  # x's own rounding to the layer's dtype
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"forward error exceeds the bound by {excess}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [gguf_weight, random_blocks])
@pytest.mark.parametrize("qtype", GGUF, ids=lambda q: q.name)
def test_gguf_dequantize_matches_gguf(qtype, make, dtype):
    n, k = 200, 96  # N is not a multiple of the 64-row padding
    raw = make(qtype, n, k)
    layer = QuantizedLinear.from_gguf(raw, qtype, (n, k), None, dtype)
    ref = torch.from_numpy(quants.dequantize(raw, qtype))
    err = (layer.dequantize() - ref).abs()
    assert (err <= dequant_bound(raw, qtype, dtype)).all(), err.max()


@pytest.mark.parametrize("qtype", GGUF, ids=lambda q: q.name)
def test_gguf_exact_in_float32(qtype):
    """In float32 the fp16 block scales are kept exactly: Q4_0 and Q8_0 dequantize bit for bit."""
    raw = random_blocks(qtype, 64, 64, seed=1)
    layer = QuantizedLinear.from_gguf(raw, qtype, (64, 64), None, torch.float32)
    ref = torch.from_numpy(quants.dequantize(raw, qtype))
    if qtype == QT.Q4_1:  # (q - 8) * d + (m + 8d) vs d * q + m: float32 roundings of the sums only
        torch.testing.assert_close(layer.dequantize(), ref, rtol=0, atol=float(dequant_bound(raw, qtype,
                                                                                              torch.float32).max()))
    else:
        assert torch.equal(layer.dequantize(), ref)


@pytest.mark.parametrize("qtype", GGUF, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_forward(qtype, dtype):
    raw = gguf_weight(qtype, 100, 160, seed=2)
    bias = torch.randn(100)
    layer = QuantizedLinear.from_gguf(raw, qtype, (100, 160), bias, dtype)
    for m in (1, 5, 33):
        assert_forward_close(layer, torch.randn(m, 160).to(dtype))
    assert_forward_close(layer, torch.randn(2, 3, 160))  # float32 input, [.., K], to a bfloat16 layer


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 40), (100, 70), (192, 576), (64, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_from_float_odd_shapes(method, shape, bias):
    """N not a multiple of 16 or 64, K not a multiple of the group or of 8 (the int8 CPU kernel's own limit)."""
    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k)
    layer = QuantizedLinear.from_float(w, torch.randn(n) if bias else None, method, 32, torch.bfloat16)
    deq = layer.dequantize()
    assert deq.shape == (n, k)
    if method == "int8":  # half a step of the row's scale, which is itself rounded to bfloat16
        step = w.abs().amax(1, keepdim=True) / 127 * (1 + U[torch.bfloat16])
    else:  # half a step of the group's range / 15, plus the bfloat16 rounding of its zero
        g = torch.nn.functional.pad(w, (0, -k % 32)).view(n, -1, 32)
        s = (g.amax(-1) - g.amin(-1)) / 15 * (1 + U[torch.bfloat16])
        # codes clamped to 0..15 when s and zero = min + 8s round: up to 15u * s + u * |zero| more
        step = (s + 2 * U[torch.bfloat16] * (24 * s + g.amin(-1).abs())).repeat_interleave(32, 1)[:, :k]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    for m in (1, 3, 17):
        assert_forward_close(layer, torch.randn(m, k).bfloat16())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 150), k=st.integers(1, 130), m=st.integers(1, 40), method=st.sampled_from(["int8", "int4"]),
       group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16))
def test_forward_any_shape(n, k, m, method, group, seed):
    g = torch.Generator().manual_seed(seed)
    layer = QuantizedLinear.from_float(torch.randn(n, k, generator=g), torch.randn(n, generator=g), method, group,
                                       torch.bfloat16)
    assert_forward_close(layer, torch.randn(m, k, generator=g).bfloat16())


def test_float32_compute():
    torch.manual_seed(0)
    for method in ("int8", "int4"):
        layer = QuantizedLinear.from_float(torch.randn(96, 64), None, method)
        assert layer.dtype == torch.float32
        assert_forward_close(layer, torch.randn(4, 64))


@pytest.mark.parametrize("source", ["int8", "int4", "Q4_0", "Q4_1", "Q8_0"])
def test_embedding_rows_equal_dequantized_rows(source):
    torch.manual_seed(0)
    if source.startswith("Q"):
        table = QuantizedLinear.from_gguf(gguf_weight(QT[source], 300, 64), QT[source], (300, 64), None,
                                          torch.bfloat16)
    else:
        table = QuantizedLinear.from_float(torch.randn(300, 64), None, source, 32, torch.bfloat16)
    emb = QuantizedEmbedding(table, torch.bfloat16)
    ids = torch.tensor([[0, 299, 64, 63], [128, 5, 5, 200]])
    out = emb(ids)
    assert out.shape == (2, 4, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, table.dequantize()[ids].bfloat16())
    assert resident_bytes(nn.ModuleList([emb, table])) == table.nbytes  # tied: the storage counted once


def test_nbytes_close_to_low_bit_size():
    torch.manual_seed(0)
    n, k = 1536, 576  # SmolLM2's gate/up projection
    bf16 = n * k * 2
    int8 = QuantizedLinear.from_float(torch.randn(n, k), None, "int8", dtype=torch.bfloat16)
    int4 = QuantizedLinear.from_float(torch.randn(n, k), None, "int4", 32, torch.bfloat16)
    assert int8.nbytes == n * k + 2 * n  # int8 weights and a bfloat16 scale per row: ~1/2 of bfloat16
    assert int4.nbytes == n * k // 2 + n * k // 32 * 4  # 4 bits and a scale + zero per 32: 5/16 of bfloat16
    assert 0.49 < int8.nbytes / bf16 < 0.51 and 0.24 < int4.nbytes / bf16 < 0.32
    for qtype in GGUF:
        raw = gguf_weight(qtype, n, k)
        q = QuantizedLinear.from_gguf(raw, qtype, (n, k), None, torch.bfloat16)
        # Q4_1 as stored in the file; Q4_0 adds its zeros (+1/9); Q8_0 is two int4 halves (1.25 vs 1.06 bytes)
        assert q.nbytes == {QT.Q4_1: raw.nbytes, QT.Q4_0: raw.nbytes * 10 // 9, QT.Q8_0: n * k * 5 // 4}[qtype]


def test_bad_input():
    w = torch.randn(64, 64)
    for args in [(w, None, "int2"), (w, None, "int4", 16), (w[None], None, "int8"),
                 (w.masked_fill(w > 2, float("nan")), None, "int8")]:
        with pytest.raises(ValueError):
            QuantizedLinear.from_float(*args)
    raw = gguf_weight(QT.Q4_0, 64, 64)
    with pytest.raises(ValueError, match="Q5_0"):
        QuantizedLinear.from_gguf(raw, QT.Q5_0, (64, 64), None, torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold"):
        QuantizedLinear.from_gguf(raw, QT.Q4_0, (64, 96), None, torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold"):
        QuantizedLinear.from_gguf(raw[:, :-1], QT.Q4_0, (64, 64), None, torch.bfloat16)
    with pytest.raises(ValueError):
        quantize_model(nn.Module(), "int4", 48)


def test_int4_layout_stays_on_its_device():
    """The packed int4 layout is the device's own: a layer moved elsewhere refuses to run rather than compute
    garbage (int8 weights are plain and may move)."""
    for method in ("int8", "int4"):
        layer = QuantizedLinear.from_float(torch.randn(64, 64), None, method, dtype=torch.bfloat16).to("meta")
        x = torch.empty(2, 64, dtype=torch.bfloat16, device="meta")
        if method == "int8":
            assert layer(x).shape == (2, 64)
        else:
            with pytest.raises(AssertionError, match="packed for cpu"):
                layer(x)


def tiny_model(dtype: torch.dtype) -> LlamaForCausalLM:
    """Qwen2 layout (q/k/v bias); hidden 96 and intermediate 200: K = 200 is not a multiple of the int4 group, the
    fused gate/up N = 400 not a multiple of 64."""
    torch.manual_seed(0)
    c = ArchConfig.from_hf({"model_type": "qwen2", "vocab_size": 300, "hidden_size": 96, "intermediate_size": 200,
                            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                            "max_position_embeddings": 64, "tie_word_embeddings": True})
    return LlamaForCausalLM(c, 64).to(dtype)


@torch.no_grad()
def logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """One prefill of `ids` through the paged forward; float32 logits [T, vocab]."""
    c, n = model.config, len(ids)
    kv = [torch.zeros(kv_cache_shape(1, n, c.num_kv_heads, c.head_dim), dtype=model.lm_head.weight.dtype)
          for _ in range(c.num_layers)]
    cpu = torch.device("cpu")
    meta = prompt_metadata(n, n, c.sliding_window, resolve_backend("auto", cpu), cpu)
    return model.compute_logits(model(ids, torch.arange(n), kv, meta)).float()


@pytest.mark.parametrize("method,min_cos", [("int8", 0.999), ("int4", 0.99)])
def test_quantize_model(method, min_cos):
    model = tiny_model(torch.bfloat16)
    quantized = copy.deepcopy(model)
    quantize_model(quantized, method)
    layer = quantized.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(lin, QuantizedLinear) and lin.kind == method and lin.dtype == torch.bfloat16
    assert layer.self_attn.qkv_proj.bias is not None
    assert type(quantized.lm_head) is nn.Linear and type(quantized.model.embed_tokens) is nn.Embedding
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.cosine_similarity(logits(model, ids), logits(quantized, ids), dim=-1)
    assert cos.min() > min_cos, cos.min()
    # the decoder's projections shrink (5/16 at real shapes; these tiny odd ones pad rows and K), nothing else
    floats = sum(p.nbytes for n, p in model.model.layers.named_parameters() if "_proj." in n)
    lows = sum(m.nbytes for m in quantized.modules() if isinstance(m, QuantizedLinear))
    assert resident_bytes(quantized) == resident_bytes(model) - floats + lows
    assert lows / floats < (0.55 if method == "int8" else 0.42)


def test_quantize_float32_model_computing_in_bfloat16():
    """A float32 model whose quantized layers compute in bfloat16 (the int kernels' fast dtype on CPU)."""
    model = tiny_model(torch.float32)
    quantized = copy.deepcopy(model)
    quantize_model(quantized, "int8", dtype=torch.bfloat16)
    assert quantized.model.layers[1].mlp.down_proj.dtype == torch.bfloat16
    ids = torch.arange(20)
    cos = torch.nn.functional.cosine_similarity(logits(model, ids), logits(quantized, ids), dim=-1)
    assert cos.min() > 0.999
