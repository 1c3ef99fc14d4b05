"""The fused C++ ops of the decoder (conveyor/kernels/cpu/fused.cpp) against the torch ops they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conveyor.kernels import cpu_ops
from conveyor.model.layers import RMSNorm, RotaryEmbedding, add_rms_norm, apply_rotary

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason=f"C++ kernels not built: {cpu_ops.error()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def norm_of(h: int, dtype: torch.dtype) -> RMSNorm:
    n = RMSNorm(h, 1e-5).to(dtype)
    n.weight.data = torch.randn(h).to(dtype)
    return n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, h", [(1, 64), (37, 576), (5, 77)])
def test_add_rms_norm_matches_torch(dtype, rows, h):
    torch.manual_seed(rows * h)
    norm = norm_of(h, dtype)
    x, res = torch.randn(rows, h).to(dtype), (3 * torch.randn(rows, h)).to(dtype)
    ref_res = res + x
    ref = norm(ref_res)
    out = add_rms_norm(x, res, norm, fused=True)
    assert torch.equal(res, ref_res)  # the residual add rounds once, like torch's
    assert out.dtype == dtype
    # only the fp32 sum of squares is ordered differently: at most one rounding of the output apart
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    plain = add_rms_norm(None, res.clone(), norm, fused=True)  # no x: the norm alone
    torch.testing.assert_close(plain.float(), norm(res).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_residual_under_a_low_precision_model(dtype):
    torch.manual_seed(0)
    norm = norm_of(256, dtype)
    x = torch.randn(9, 256).to(dtype)
    res = torch.randn(9, 256)
    expect = res + x.float()  # no rounding of the sum
    out = add_rms_norm(x, res, norm, fused=True)
    torch.testing.assert_close(res, expect, rtol=1e-6, atol=1e-6)
    ref = (norm.weight.float() * (expect * torch.rsqrt(expect.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    torch.manual_seed(1)
    gu = (4 * torch.randn(13, 2 * 300)).to(dtype)
    gate, up = gu.split(300, dim=-1)
    ref = F.silu(gate) * up
    out = torch.ops.conveyor.silu_mul(gu)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.ops.conveyor.silu_mul(gu[:0]).shape == (0, 300)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, d", [(1, 12, 64), (29, 3, 128), (7, 5, 6), (0, 4, 64)])
def test_rope_is_bit_exact(dtype, tokens, heads, d):
    """The fused rotary equals the torch expression bit for bit, also on a strided view of a fused qkv output."""
    torch.manual_seed(tokens + d)
    rotary = RotaryEmbedding(d, 4096, 10000.0, None)
    cos, sin = rotary.tables(torch.randint(0, 4096, (tokens,)), dtype)
    qkv = (3 * torch.randn(tokens, (heads + 2) * d)).to(dtype)
    x = qkv[:, :heads * d].view(tokens, heads, d)  # rows strided by the whole qkv width, as in Attention
    out = apply_rotary(x, cos, sin, fused=True)
    assert out.is_contiguous() and out.shape == (tokens, heads, d)
    assert torch.equal(out, apply_rotary(x, cos, sin))


def test_bad_inputs_raise():
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="add_rms_norm"):
        torch.ops.conveyor.add_rms_norm(torch.ones(2, 4), torch.ones(2, 8), w, 1e-5)
    with pytest.raises(RuntimeError, match="add_rms_norm"):
        torch.ops.conveyor.add_rms_norm(None, torch.ones(2, 8, dtype=torch.float64), w, 1e-5)
    with pytest.raises(RuntimeError, match="add_rms_norm"):
        torch.ops.conveyor.add_rms_norm(torch.ones(2, 8).bfloat16(), torch.ones(2, 8), w, 1e-5)
    with pytest.raises(RuntimeError, match="silu_mul"):
        torch.ops.conveyor.silu_mul(torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="silu_mul"):
        torch.ops.conveyor.silu_mul(torch.ones(3, 4, dtype=torch.int32))
    cos = torch.ones(2, 1, 8)
    with pytest.raises(RuntimeError, match="rope"):
        torch.ops.conveyor.rope(torch.ones(2, 3, 7), cos, cos)  # odd head dim
    with pytest.raises(RuntimeError, match="rope"):
        torch.ops.conveyor.rope(torch.ones(2, 3, 8), cos.bfloat16(), cos.bfloat16())  # dtypes differ
    with pytest.raises(RuntimeError, match="rope"):
        torch.ops.conveyor.rope(torch.ones(3, 3, 8), cos, cos)  # tables of other tokens
    with pytest.raises(RuntimeError, match="rope"):
        torch.ops.conveyor.rope(torch.ones(2, 8, 3).transpose(1, 2), cos, cos)  # head dim not contiguous
