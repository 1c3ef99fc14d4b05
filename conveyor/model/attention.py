"""Paged attention: torch reference implementation.

The KV cache of one layer is a tensor [2, num_kv_heads, num_blocks, block_size, head_dim]: heads outermost, so the
blocks of one head gathered in block-table order are already the [tokens, head_dim] matrix attention multiplies
with. New keys and values are written at their slots (the slot mapping); attention reads every earlier key of a
sequence through its block table.

A step's flattened batch holds decode tokens first (one per sequence) and then prefill chunks. Decodes are attended
together, split into chunks of DECODE_CHUNK_TOKENS keys (flash-decoding): every chunk of every sequence goes through
one batched matmul, each keeps its own softmax max and sum, and the chunks of a sequence are then merged. A batch of
short and long contexts so costs its total context, not batch size * the longest. Each prefill chunk is attended on
its own with SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DECODE_CHUNK_TOKENS = 64  # measured on CPU: 32-64 balance per-chunk overhead against padding in the last chunk


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk's first token in the flattened batch
    q_len: int
    num_cached: int  # tokens of this sequence already in the KV cache before this chunk
    block_table: torch.Tensor  # [num_blocks] physical blocks covering num_cached + q_len tokens
    mask: torch.Tensor | None = None  # [q_len, num_cached + q_len], None for a plain causal prompt


@dataclass
class DecodePlan:
    """Which keys each decode attends to, as chunks of `chunk_len` keys; built once per step for all layers."""
    chunk_len: int
    chunk_seq: torch.Tensor  # [num_chunks] decode row each chunk belongs to; a row's chunks are consecutive
    rows: torch.Tensor  # [num_chunks * num_kv_heads * blocks_per_chunk] rows of the cache viewed [H*N, bs*D]
    mask: torch.Tensor | None  # [num_chunks, 1, 1, chunk_len], True where a key is not attended; None if none


class GatherBuffers:
    """Reused destinations for the keys and values attention gathers from the cache. A fresh tensor of tens of
    MiB per layer would be fresh pages from the OS every time, and faulting them in costs more than the copy."""

    def __init__(self) -> None:
        self.k = self.v = torch.empty(0)

    def get(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [rows, row_size] tensors of like's dtype and device, valid until the next get()."""
        shape = (rows, like.shape[-1])
        if self.k.numel() < rows * shape[1] or self.k.dtype != like.dtype or self.k.device != like.device:
            n = max(rows * shape[1], self.k.numel() * 3 // 2)
            self.k = self.v = torch.empty(0)  # free the old pair first
            self.k, self.v = (torch.empty(n, dtype=like.dtype, device=like.device) for _ in range(2))
        n = rows * shape[1]
        return self.k[:n].view(shape), self.v[:n].view(shape)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    num_decodes: int = 0
    decode: DecodePlan | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    buffers: GatherBuffers = field(default_factory=GatherBuffers)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return 2, num_kv_heads, num_blocks, block_size, head_dim


def build_decode_plan(block_tables: list[list[int]], context_lens: list[int], block_size: int, num_blocks: int,
                      num_kv_heads: int, sliding_window: int | None, device: torch.device) -> DecodePlan:
    """Cut each decode's context (its first context_len keys, through its block table) into chunks."""
    bpc = max(1, DECODE_CHUNK_TOKENS // block_size)
    chunk_len = bpc * block_size
    width = -(-max(context_lens) // chunk_len) * bpc
    tables = torch.tensor([t[:width] + [0] * (width - min(width, len(t))) for t in block_tables], device=device)
    ctx = torch.tensor(context_lens, device=device)
    start = torch.arange(0, width * block_size, chunk_len, device=device)  # first key position of each chunk
    keep = start[None, :] < ctx[:, None]
    if sliding_window is not None:
        keep &= start[None, :] + chunk_len > ctx[:, None] - sliding_window
    seq, chunk = keep.nonzero(as_tuple=True)
    blocks = tables.view(len(context_lens), -1, bpc)[seq, chunk]  # [num_chunks, bpc]
    heads = torch.arange(num_kv_heads, device=device)[None, :, None] * num_blocks
    pos = start[chunk][:, None] + torch.arange(chunk_len, device=device)[None, :]
    hidden = pos >= ctx[seq][:, None]
    if sliding_window is not None:
        hidden |= pos < (ctx[seq] - sliding_window)[:, None]
    mask = hidden[:, None, None, :] if bool(hidden.any()) else None
    return DecodePlan(chunk_len, seq, (blocks[:, None, :] + heads).reshape(-1), mask)


def build_prefill_mask(num_cached: int, q_len: int, sliding_window: int | None,
                       device: torch.device) -> torch.Tensor | None:
    """Query i (position num_cached + i) sees keys j <= num_cached + i. None means plain causal."""
    if num_cached == 0 and sliding_window is None:
        return None
    qpos = torch.arange(num_cached, num_cached + q_len, device=device)[:, None]
    kpos = torch.arange(num_cached + q_len, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _, h, n, bs, d = kv_cache.shape
    kv_cache[0].view(h, n * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
    kv_cache[1].view(h, n * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _gather(kv_cache: torch.Tensor, rows: torch.Tensor, buffers: GatherBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given rows of the cache viewed [2, H*N, bs*D] (one row per head and block)."""
    _, h, n, bs, d = kv_cache.shape
    cache = kv_cache.view(2, h * n, bs * d)
    k, v = buffers.get(rows.shape[0], cache)
    return torch.index_select(cache[0], 0, rows, out=k), torch.index_select(cache[1], 0, rows, out=v)


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, plan: DecodePlan, buffers: GatherBuffers,
                      scale: float) -> torch.Tensor:
    """q: [B, Hq, D] one query per decode row. Returns [B, Hq, D]."""
    b, hq, d = q.shape
    hk = kv_cache.shape[1]
    nc, c = plan.chunk_seq.shape[0], plan.chunk_len
    k, v = _gather(kv_cache, plan.rows, buffers)
    k, v = k.view(nc, hk, c, d), v.view(nc, hk, c, d)
    # the hq // hk query heads sharing a KV head attend as rows of one matrix
    qc = q.view(b, hk, hq // hk, d).index_select(0, plan.chunk_seq)
    s = torch.matmul(qc, k.transpose(-1, -2)).float().mul_(scale)  # [nc, hk, g, c]
    if plan.mask is not None:
        s.masked_fill_(plan.mask, float("-inf"))
    m = s.amax(-1, keepdim=True)  # every chunk has a visible key, so m is finite
    p = torch.exp(s.sub_(m))
    partial = torch.matmul(p.to(q.dtype), v).float()  # [nc, hk, g, d], not yet normalized
    # merge a row's chunks: rescale each to the row's max, then sum numerators and denominators
    idx = plan.chunk_seq[:, None, None, None].expand_as(m)
    row_max = torch.full((b, hk, hq // hk, 1), float("-inf"), device=q.device).scatter_reduce_(0, idx, m, "amax")
    w = torch.exp(m - row_max.index_select(0, plan.chunk_seq))
    num = torch.zeros(b, hk, hq // hk, d, device=q.device).index_add_(0, plan.chunk_seq, partial.mul_(w))
    den = torch.zeros(b, hk, hq // hk, 1, device=q.device).index_add_(0, plan.chunk_seq, p.sum(-1, keepdim=True) * w)
    return num.div_(den).view(b, hq, d).to(q.dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D] for the new tokens. Returns [T, Hq, D]."""
    write_kv(kv_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache, meta.decode, meta.buffers, scale)
    hk, n, bs, d = kv_cache.shape[1:]
    for p in meta.prefills:
        sl = slice(p.q_start, p.q_start + p.q_len)
        qi = q[sl].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if p.num_cached == 0:
            ki, vi = k[sl].transpose(0, 1).unsqueeze(0), v[sl].transpose(0, 1).unsqueeze(0)
        else:
            length = p.num_cached + p.q_len
            rows = (p.block_table[None, :] + torch.arange(hk, device=q.device)[:, None] * n).view(-1)
            ki, vi = (x.view(1, hk, -1, d)[:, :, :length] for x in _gather(kv_cache, rows, meta.buffers))
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[sl] = o.squeeze(0).transpose(0, 1)
    return out


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks (K and V, every head) src[i] -> dst[i]: copy-on-write of shared blocks."""
    kv_cache[:, :, dst] = kv_cache[:, :, src]


def move_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks between two caches of the same layout (device <-> host swap)."""
    dst_cache[:, :, dst.to(dst_cache.device)] = src_cache[:, :, src.to(src_cache.device)].to(dst_cache.device)
