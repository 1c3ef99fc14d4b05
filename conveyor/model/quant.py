"""Weight-only quantization: linear layers whose weights stay int8 or int4 in memory and run through PyTorch's own
weight-only low-bit matmul kernels (activations stay float; no weight is expanded to float for a matmul).

Two storage kinds, chosen for the kernels:

- ``int8``: one int8 per weight and one scale per output channel, ``w = q * scale``; kernel
  ``aten._weight_int8pack_mm``.
- ``int4``: 4-bit codes ``q`` in 0..15 in the kernel's packed layout and, per group of ``group_size`` weights along
  K, a scale and a zero: ``w = (q - 8) * scale + zero``; kernels ``aten._weight_int4pack_mm_for_cpu`` (CPU) and the
  tinygemm ``aten._weight_int4pack_mm`` (CUDA, bfloat16 only).

Compute dtype: scales and zeros are kept in the layer's dtype, which is the dtype the kernel computes in (inputs of
another dtype are cast, the output cast back). **On CPU use bfloat16**: with bfloat16 activations the int8/int4
kernels match or beat float matmuls at decode sizes, with float32 activations they are 2-26x slower than a float32
matmul (bench/quant_matmul.py, bench/README.md; on an AVX2-only CPU a float32 model whose quantized layers compute
in bfloat16 avoids emulated bfloat16 dense matmuls). The CUDA paths are untested until a GPU check runs.

GGUF: Q4_0 and Q4_1 map exactly onto the int4 kind (group 32); Q8_0 onto int4 too, as two 4-bit halves of each
int8 code (see ``QuantizedLinear.from_gguf``), so every supported GGUF type is exact up to the rounding of its fp16
block scales to the compute dtype.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.progress import weight_load_progress

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels accept
GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF tensor types kept low-bit by from_gguf
_INT8_K_ALIGN = 32  # see QuantizedLinear._int8
ROW_BLOCK = 64  # int4 rows are padded to a multiple of this: a whole number of every packed layout's row tiles
_DEQUANT_ROWS = 4096  # rows dequantized at a time (dequantize(), the CUDA int8 fallback)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _inner_k_tiles(k: int) -> int:
    """tinygemm (CUDA) needs K to be a multiple of 16 * innerKTiles; K is a multiple of 32 here."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _pack_int4(q: Tensor) -> Tensor:
    """int32 codes [N, K] in 0..15 -> the int4 kernel's packed weight on q's device (N % 16 == 0, K % 32 == 0)."""
    if q.is_cuda:
        return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                          _inner_k_tiles(q.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def _int4_mm(x: Tensor, packed: Tensor, group: int, scales_zeros: Tensor) -> Tensor:
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


@functools.cache
def _nibble_index(k: int, device: str) -> Tensor:
    """Where the packed int4 layout keeps each code of a block of ROW_BLOCK rows: int64 [ROW_BLOCK, k], the index of
    the nibble (2 * byte, + 1 for the high nibble) holding code (row, col). The layouts are private to the kernels
    and differ by CPU ISA (AVX-512, AVX2, none) and device, so this is learned by packing probes whose codes spell
    each element's position 4 bits at a time. Asserts that the packing moves nibbles without changing them and
    that every block of ROW_BLOCK rows is packed alike into its own contiguous bytes."""
    n = 2 * ROW_BLOCK
    pos = torch.arange(n * k, device=device)
    where = torch.zeros(n * k, dtype=torch.int64, device=device)  # where[nibble] = position of the code there
    for shift in range(0, (n * k - 1).bit_length(), 4):
        packed = _pack_int4(((pos >> shift) & 15).int().view(n, k)).view(torch.uint8).flatten()
        nibbles = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
        assert nibbles.numel() == n * k, "the int4 packed layout is not 4 bits per code"
        where |= nibbles.long() << shift
    assert torch.bincount(where, minlength=n * k).eq(1).all(), "the int4 packed layout is not a permutation"
    index = torch.empty_like(where)
    index[where] = pos
    index = index.view(n, k)
    assert torch.equal(index[ROW_BLOCK:], index[:ROW_BLOCK] + ROW_BLOCK * k), \
        f"the int4 packed layout is not made of independent blocks of {ROW_BLOCK} rows"
    return index[:ROW_BLOCK].clone()


def _int4_codes(packed: Tensor, k: int, rows: Tensor) -> Tensor:
    """Codes int32 [len(rows), k] (0..15) of the given rows of a packed int4 weight with K = k."""
    nib = _nibble_index(k, str(packed.device))[rows % ROW_BLOCK] + (rows // ROW_BLOCK * (ROW_BLOCK * k))[:, None]
    byte = packed.view(torch.uint8).flatten()[nib >> 1].int()
    return (byte >> ((nib & 1) * 4).int()) & 15


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ bias) with W [N, K] kept low-bit in memory (int8 or int4, see the module docstring).

    Build with ``from_float`` or ``from_gguf`` on the device it will run on: the packed layout is the device's."""

    def __init__(self, kind: str, in_features: int, out_features: int, qweight: Tensor, scales: Tensor,
                 bias: Tensor | None, group_size: int = 0, splits: int = 1) -> None:
        super().__init__()
        assert kind in ("int8", "int4"), kind
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.group_size = group_size  # int4 only
        self.splits = splits  # int4 codes per weight along K (2 for GGUF Q8_0, whose halves are summed)
        self.register_buffer("qweight", qweight)  # int8 [N, K_pad] or the int4 kernel's packed [N64, K_pad]
        self.register_buffer("scales", scales)  # int8: [N]; int4: [K_pad / group, N64, 2] (scale, zero)
        self.register_buffer("bias", None if bias is None else bias.to(scales.dtype))
        self.k_pad = qweight.shape[1] if kind == "int8" else scales.shape[0] * group_size
        self.packed_for = qweight.device.type  # int4 layouts differ by device: .to() another device cannot work
        assert self.k_pad >= splits * in_features

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the scales)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Resident bytes of the low-bit weights, their scales (and zeros) and the bias."""
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.kind == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}{group}, "
                f"dtype={self.dtype}, bias={self.bias is not None}")

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: Tensor, bias: Tensor | None, method: str, group_size: int = 32,
                   dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Quantize a float weight [N, K] on its device. ``int8``: symmetric per output channel,
        ``q = round(w / s)`` in -127..127 with ``s = max|w_row| / 127`` (error <= s / 2). ``int4``: asymmetric per
        group of ``group_size`` (32, 64, 128 or 256) along K, the group's min..max in 16 steps (error <= step / 2).
        ``dtype``: the compute dtype (default: the weight's; use bfloat16 on CPU). Raises ValueError for an
        unknown method or group size, a weight that is not 2-D or has non-finite values."""
        dtype = dtype or weight.dtype
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight has non-finite values")
        if method == "int8":
            return cls._int8(weight.float(), bias, dtype)
        if method == "int4":
            if group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
            return cls._int4_from_float(weight.float(), bias, group_size, dtype)
        raise ValueError(f"quantization method must be 'int8' or 'int4', got {method!r}")

    @classmethod
    def _int8(cls, w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> QuantizedLinear:
        n, k = w.shape
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(dtype).tiny).to(dtype)
        q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        # K to a multiple of _INT8_K_ALIGN: torch 2.13's CPU kernel returns wrong values or crashes for > 1 row when
        # K is not a multiple of 8 (AVX2), and crashes for bfloat16 when K is not a multiple of 16 (AVX-512 bf16)
        q = F.pad(q, (0, _ceil_to(k, _INT8_K_ALIGN) - k))
        return cls("int8", k, n, q.contiguous(), scale, bias)

    @classmethod
    def _int4_from_float(cls, w: Tensor, bias: Tensor | None, group: int, dtype: torch.dtype) -> QuantizedLinear:
        n, k = w.shape
        g = F.pad(w, (0, _ceil_to(k, group) - k)).view(n, -1, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(torch.finfo(dtype).tiny).to(dtype).float()
        zero = (lo + 8 * scale).to(dtype).float()  # codes are quantized against the stored scale and zero
        q = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
        return cls._int4(q.view(n, -1), scale, zero, group, k, bias, dtype)

    @classmethod
    def _int4(cls, q: Tensor, scale: Tensor, zero: Tensor, group: int, k: int, bias: Tensor | None,
              dtype: torch.dtype, splits: int = 1) -> QuantizedLinear:
        """q: codes [N, K_pad] in 0..15 (uint8 or float), scale/zero [N, K_pad / group]; w = (q - 8) * scale +
        zero. Rows are padded to a multiple of ROW_BLOCK with all-zero weights."""
        if q.is_cuda and dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA computes in bfloat16 only, got {dtype}")
        n = q.shape[0]
        rows = _ceil_to(n, ROW_BLOCK) - n
        q = F.pad(q, (0, 0, 0, rows), value=8).int().contiguous()
        scales_zeros = torch.stack([F.pad(scale, (0, 0, 0, rows)), F.pad(zero, (0, 0, 0, rows))], dim=-1)
        scales_zeros = scales_zeros.transpose(0, 1).to(dtype).contiguous()
        return cls("int4", k, n, _pack_int4(q), scales_zeros, bias, group, splits)

    @classmethod
    @torch.no_grad()
    def from_gguf(cls, raw: np.ndarray, qtype, shape: tuple[int, int], bias: Tensor | None, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> QuantizedLinear:
        """A layer over a GGUF tensor's own blocks. raw: its bytes as GGUFReader gives them, uint8
        [N, bytes_per_row] (rows are output channels, blocks of 32 along K); qtype: a gguf.GGMLQuantizationType;
        shape: (N, K). Every type becomes the int4 kind with group 32, exactly:

        - Q4_0 ``w = d * (q - 8)``: scale d, zero 0.
        - Q4_1 ``w = d * q + m``: scale d, zero m + 8d.
        - Q8_0 ``w = d * q`` (q int8): q = 16 * hi + lo with hi in -8..7, lo in 0..15, stored as K' = 2K codes:
          hi + 8 with scale 16d, zero 0, then lo with scale d, zero 8d. The layer runs [x, x] @ [W_hi, W_lo]^T,
          one int4 matmul, instead of rescaling Q8_0's per-block scales to one scale per channel for the int8
          kernel (which would add an error of up to half a step of the row's largest block scale: 1.2 % relative
          on SmolLM2's embedding). It costs 1.25 bytes per weight instead of Q8_0's 1.06.

        Error bound: exact up to the rounding of d (and m + 8d) from fp16 to ``dtype``: for bfloat16,
        |w' - w| <= 2^-8 * (8 |d| + |m + 8d|) per weight (Q4_0, Q8_0: <= 2^-8 |w|); none for float32.
        device: where the layer will run (its int4 layout is that device's).
        Raises ValueError for another type or a raw array that does not match the shape."""
        name = getattr(qtype, "name", str(qtype))
        if name not in GGUF_TYPES:
            raise ValueError(f"GGUF tensor type {name} cannot be kept quantized (supported: {', '.join(GGUF_TYPES)});"
                             f" dequantize it instead")
        n, k = shape
        type_size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[name]
        if k % 32 or raw.shape != (n, k // 32 * type_size) or raw.dtype != np.uint8:
            raise ValueError(f"{name} data of shape {raw.shape} ({raw.dtype}) does not hold a [{n}, {k}] weight "
                             f"(expected uint8 [{n}, {k // 32 * type_size}], K a multiple of 32)")
        blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(n, k // 32, type_size).copy()).to(device)
        d = blocks[..., :2].contiguous().view(torch.float16)[..., 0].float()
        if name == "Q8_0":
            q = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
            hi, lo = ((q >> 4) + 8).view(torch.uint8), (q & 15).view(torch.uint8)
            scale, zero = torch.cat([16 * d, d], 1), torch.cat([torch.zeros_like(d), 8 * d], 1)
            return cls._int4(torch.cat([hi, lo], 1), scale, zero, 32, k, bias, dtype, splits=2)
        packed = blocks[..., 2 if name == "Q4_0" else 4:]
        q = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(n, k)  # low nibbles are codes 0..15 of a block
        if name == "Q4_0":
            return cls._int4(q, d, torch.zeros_like(d), 32, k, bias, dtype)
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        return cls._int4(q, d, m + 8 * d, 32, k, bias, dtype)

    # -- use ---------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x [..., K] -> [..., N], in x's dtype (computed in the layer's dtype)."""
        assert x.device == self.qweight.device, f"input on {x.device}, weights on {self.qweight.device}"
        self._check_layout()
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features).to(self.dtype)
        if self.splits > 1:
            h = h.repeat(1, self.splits)
        if self.k_pad > h.shape[1]:
            h = F.pad(h, (0, self.k_pad - h.shape[1]))
        y = self._mm(h.contiguous())
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _check_layout(self) -> None:
        assert self.kind == "int8" or self.qweight.device.type == self.packed_for, \
            f"int4 weights packed for {self.packed_for} were moved to {self.qweight.device}: build them there"

    def _mm(self, h: Tensor) -> Tensor:
        if self.kind == "int4":
            return _int4_mm(h, self.qweight, self.group_size, self.scales)
        if not h.is_cuda or _has_cuda_int8_kernel():
            return torch.ops.aten._weight_int8pack_mm(h, self.qweight, self.scales)
        return torch.cat([h @ (self.qweight[i:i + _DEQUANT_ROWS].to(h.dtype) * self.scales[i:i + _DEQUANT_ROWS, None]).T
                          for i in range(0, self.out_features, _DEQUANT_ROWS)], dim=1)

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized rows W[ids] (output channels), float32 [len(ids), K]: what forward multiplies by."""
        self._check_layout()
        if self.kind == "int8":
            return self.qweight[ids, :self.in_features].float() * self.scales[ids].float()[:, None]
        q = _int4_codes(self.qweight, self.k_pad, ids).float()
        sz = self.scales[:, ids].float().repeat_interleave(self.group_size, dim=0)  # [K_pad, len(ids), 2]
        w = (q - 8) * sz[..., 0].T + sz[..., 1].T
        w = w[:, :self.splits * self.in_features].view(len(ids), self.splits, self.in_features)
        return w.sum(1)  # exact: each half is a float32 product of a bfloat16 / fp16 scale and a small integer

    def dequantize(self) -> Tensor:
        """The weight the layer multiplies by, float32 [N, K] (for tests and references)."""
        dev = self.qweight.device
        return torch.cat([self.rows(torch.arange(i, min(i + _DEQUANT_ROWS, self.out_features), device=dev))
                          for i in range(0, self.out_features, _DEQUANT_ROWS)])


@functools.cache
def _has_cuda_int8_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA")


class QuantizedEmbedding(nn.Module):
    """Embedding lookup from a QuantizedLinear's storage (tied embeddings share it with lm_head): forward(ids [T])
    -> [T, K] rows dequantized to ``dtype``; no full-size float copy is ever made."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.table.rows(ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 32, dtype: torch.dtype | None = None) -> None:
    """Replace every nn.Linear of the decoder layers (qkv_proj, o_proj, gate_up_proj, down_proj) in place with
    QuantizedLinear.from_float(method, group_size), computing in ``dtype`` (default: each layer's own; inputs of
    another dtype are cast). The embedding and lm_head stay at the model dtype, as vLLM keeps them: they are a small
    share of a large model, and the most sensitive. Raises ValueError for an unknown method or group size (before
    anything is replaced)."""
    if method not in ("int8", "int4") or (method == "int4" and group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"cannot quantize with method {method!r}, group_size {group_size}")
    with weight_load_progress(len(model.model.layers), f"Quantizing weights to {method}", "layers") as bar:
        for layer in model.model.layers:
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, QuantizedLinear.from_float(child.weight, child.bias, method,
                                                                         group_size, dtype))
            bar.update()


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters and persistent buffers (quantized weights, scales), each
    tensor once however often it is shared; not non-persistent buffers such as rotary tables."""
    tensors = list(model.parameters()) + [b for m in model.modules() for name, b in m._buffers.items()
                                          if b is not None and name not in m._non_persistent_buffers_set]
    return sum(nbytes for _, nbytes in {(t.data_ptr(), t.nbytes): None for t in tensors})
