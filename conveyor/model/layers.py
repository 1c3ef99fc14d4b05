"""Building blocks shared by the Llama family: RMSNorm, rotary embeddings, gated MLP."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band in between interpolated smoothly."""
    factor = params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding, cos/sin computed for each step's positions. The sin has its
    first half negated, so rotate_half(x) * sin is x.roll(half) * signed_sin: one op instead of slice, neg, cat."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type != "default":
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)")
        # no table over max_position: a checkpoint's context length (up to 2**32 - 1 in a GGUF) would size it
        self.max_position = max_position
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for the positions [T]: computed once per forward, used by every layer."""
        freqs = torch.outer(positions.to(torch.float32), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], dim=-1).unsqueeze(1).to(dtype), \
            torch.cat([-sin, sin], dim=-1).unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """x: [T, H, D] (heads and D contiguous), cos and signed_sin: [T, 1, D] in x's dtype. Equals x * cos +
    rotate_half(x) * sin elementwise, bit for bit (negation is exact). fused: one C++ op, bit for bit the same
    (conveyor/kernels/cpu/fused.cpp; CPU, kernels loaded) instead of four torch ops and their temporaries."""
    if fused:
        return torch.ops.conveyor.rope(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fused: silu(gate) * up as one C++ op (conveyor/kernels/cpu/fused.cpp; CPU, kernels loaded)."""
        if fused:
            return self.down_proj(torch.ops.conveyor.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm, fused: bool) -> torch.Tensor:
    """residual += x in place (when x is given; one rounding to residual's dtype), then norm(residual) in the
    norm weight's dtype. fused: one C++ op (CPU, kernels loaded) instead of the add and RMSNorm's five ops; it
    also takes a float32 residual under a lower-precision model."""
    if fused and (x is None or x.dtype == norm.weight.dtype):
        return torch.ops.conveyor.add_rms_norm(x, residual, norm.weight, norm.eps)
    if x is not None:
        residual.add_(x)
    out = norm(residual)
    return out.to(norm.weight.dtype) if residual.dtype == torch.float32 else out
