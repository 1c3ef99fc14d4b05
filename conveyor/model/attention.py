"""Paged attention: torch reference implementation.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. New keys and values are
written at their slots (the slot mapping); attention reads every earlier key of a sequence through its block table.

A step's flattened batch holds decode tokens first (one per sequence) and then prefill chunks. Decodes are attended
as one batch, padded to the longest context with a mask; each prefill chunk is attended on its own, so a long
prompt never pads the decodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk's first token in the flattened batch
    q_len: int
    num_cached: int  # tokens of this sequence already in the KV cache before this chunk
    block_table: torch.Tensor  # [num_blocks] physical blocks covering num_cached + q_len tokens
    mask: torch.Tensor | None = None  # [q_len, num_cached + q_len], None for a plain causal prompt


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size]
    prefills: list[PrefillChunk] = field(default_factory=list)


def build_decode_mask(context_lens: torch.Tensor, max_len: int, sliding_window: int | None) -> torch.Tensor:
    """Key j of decode row b is visible when j < context_len[b] (and within the window)."""
    j = torch.arange(max_len, device=context_lens.device)
    mask = j[None, :] < context_lens[:, None]
    if sliding_window is not None:
        mask &= j[None, :] >= (context_lens[:, None] - sliding_window)
    return mask[:, None, None, :]


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
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, H, D] through [B, nb] -> [B, H, nb * bs, D]."""
    x = cache[block_tables]  # [B, nb, bs, H, D]
    b, nb, bs, h, d = x.shape
    return x.view(b, nb * bs, h, d).transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D] for the new tokens. Returns [T, Hq, D]."""
    write_kv(kv_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decodes
    if nd:
        kc = _gather(kv_cache[0], meta.decode_block_tables)
        vc = _gather(kv_cache[1], meta.decode_block_tables)
        o = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kc, vc, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=gqa)
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        sl = slice(p.q_start, p.q_start + p.q_len)
        qi = q[sl].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if p.num_cached == 0:
            ki, vi = k[sl].transpose(0, 1).unsqueeze(0), v[sl].transpose(0, 1).unsqueeze(0)
        else:
            n = p.num_cached + p.q_len
            ki = _gather(kv_cache[0], p.block_table[None])[:, :, :n]
            vi = _gather(kv_cache[1], p.block_table[None])[:, :, :n]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[sl] = o.squeeze(0).transpose(0, 1)
    return out
