"""Paged attention: the metadata one step shares across layers, the backends, and the torch reference.

The KV cache of one layer is a tensor [2, num_kv_heads, num_blocks, block_size, head_dim]: heads outermost, so the
blocks of one head in block-table order are the [tokens, head_dim] matrix attention multiplies with. Every backend
implements one contract (reference_paged_attention states it): write the step's new K/V at their slots, then attend
each query row of each sequence through its block table, causally (and within the sliding window).

Backends, picked per engine by `resolve_backend`:
- cpp: the C++ kernel (conveyor/kernels/cpu/paged_attention.cpp), the default on CPU: one op per layer,
  threads across (sequence, KV head, query tile), K/V read in place, fp32 online softmax.
- triton: the Triton kernel (conveyor/kernels/triton_attention.py), the default on CUDA.
- torch: torch ops, the fallback where the C++ kernel cannot be built. Decodes are attended together, split into
  chunks of DECODE_CHUNK_TOKENS keys (flash-decoding): every chunk of every sequence goes through one batched matmul,
  each keeps its own softmax max and sum, and the chunks of a sequence are then merged. Each prefill chunk is
  attended on its own with SDPA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "cpp", "triton", "torch")
log = logging.getLogger("conveyor.attention")
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
    """One step's attention inputs, built once and shared by every layer (the contract's tensors).

    Sequence s owns query rows query_start[s] .. query_start[s + 1] - 1 of the flattened batch and has seq_lens[s]
    keys after this step's writes, at the blocks block_tables[s]. The first num_decode_seqs sequences are decode
    rows (a decode, or a decode followed by speculative proposals); tables, q_lens and lens are the same facts as
    lists, for the torch backend's plan."""
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, W] int32, rows padded with block 0
    query_start: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    tables: list[list[int]]
    q_lens: list[int]
    lens: list[int]
    sliding_window: int | None = None
    backend: str = "torch"
    num_decode_seqs: int = 0
    buffers: GatherBuffers = field(default_factory=GatherBuffers)
    _plan: tuple[DecodePlan | None, list[PrefillChunk]] | None = None

    def __post_init__(self) -> None:
        assert self.backend in BACKENDS[1:], self.backend
        assert len(self.tables) == len(self.q_lens) == len(self.lens) and 0 <= self.num_decode_seqs <= len(self.lens)
        assert all(0 < q <= n for q, n in zip(self.q_lens, self.lens)), "every sequence has 1..seq_len queries"

    def torch_plan(self, kv_cache: torch.Tensor) -> tuple[DecodePlan | None, list[PrefillChunk]]:
        """The torch backend's decode plan and prefill chunks, made on the first layer's call."""
        if self._plan is None:
            _, hk, n, bs, _ = kv_cache.shape
            self._plan = _torch_plan(self, n, bs, hk)
        return self._plan


def build_metadata(tables: list[list[int]], q_lens: list[int], lens: list[int], slots: list[int],
                   num_decode_seqs: int, block_size: int, sliding_window: int | None, backend: str,
                   device: torch.device, buffers: GatherBuffers | None = None) -> AttentionMetadata:
    """Metadata for sequences with q_lens[i] new tokens and lens[i] keys each (the decode-like ones first), their
    block tables (at least ceil(lens[i] / block_size) entries each) and the slots of the new tokens [sum(q_lens)]."""
    width = max((-(-n // block_size) for n in lens), default=1)
    padded = [t[:width] + [0] * (width - min(width, len(t))) for t in tables]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(lens), width),
        query_start=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        tables=tables, q_lens=q_lens, lens=lens, sliding_window=sliding_window, backend=backend,
        num_decode_seqs=num_decode_seqs, buffers=buffers or GatherBuffers())


def prompt_metadata(n: int, block_size: int, sliding_window: int | None, backend: str,
                    device: torch.device) -> AttentionMetadata:
    """One fresh prompt of n tokens at positions 0..n-1 in blocks 0, 1, ... (a scratch cache)."""
    return build_metadata([list(range(-(-n // block_size)))], [n], [n], list(range(n)), 0, block_size,
                          sliding_window, backend, device)


def _torch_plan(meta: AttentionMetadata, num_blocks: int, bs: int,
                num_kv_heads: int) -> tuple[DecodePlan | None, list[PrefillChunk]]:
    dev = meta.slot_mapping.device
    nd = meta.num_decode_seqs
    decode = None
    if nd:  # a decode with proposals is one decode row per token, each seeing the keys up to its own
        rows_tables = [meta.tables[s] for s in range(nd) for _ in range(meta.q_lens[s])]
        rows_lens = [meta.lens[s] - meta.q_lens[s] + j + 1 for s in range(nd) for j in range(meta.q_lens[s])]
        decode = build_decode_plan(rows_tables, rows_lens, bs, num_blocks, num_kv_heads, meta.sliding_window, dev)
    prefills = []
    q_start = sum(meta.q_lens[:nd])
    for s in range(nd, len(meta.lens)):
        n, cached = meta.q_lens[s], meta.lens[s] - meta.q_lens[s]
        nb = -(-meta.lens[s] // bs)
        prefills.append(PrefillChunk(q_start, n, cached, torch.tensor(meta.tables[s][:nb], dtype=torch.long,
                                                                      device=dev),
                                     build_prefill_mask(cached, n, meta.sliding_window, dev)))
        q_start += n
    return decode, prefills


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
    """q: [T, Hq, D]; k, v: [T, Hk, D] for the new tokens. Writes k, v into kv_cache at meta's slots and returns the
    attention output [T, Hq, D] (reference_paged_attention's contract), by meta.backend."""
    window = meta.sliding_window or 0
    with torch.profiler.record_function("attention"):
        if meta.backend == "cpp":
            return torch.ops.conveyor.paged_attention(q, k, v, kv_cache,
                                                      meta.slot_mapping, meta.block_tables, meta.query_start,
                                                      meta.seq_lens, scale, window)
        if meta.backend == "triton":
            from conveyor.kernels.triton_attention import triton_paged_attention
            return triton_paged_attention(q, k, v, kv_cache, meta.slot_mapping, meta.block_tables, meta.query_start,
                                          meta.seq_lens, scale, window)
        return _torch_attention(q, k, v, kv_cache, meta, scale)


def _torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    decode, prefills = meta.torch_plan(kv_cache)
    write_kv(kv_cache, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = sum(meta.q_lens[:meta.num_decode_seqs])
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache, decode, meta.buffers, scale)
    hk, n, bs, d = kv_cache.shape[1:]
    for p in prefills:
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


def reference_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_start: torch.Tensor,
                              seq_lens: torch.Tensor, scale: float, sliding_window: int) -> torch.Tensor:
    """The contract every backend implements, in plain torch (the oracle of the kernel tests; slow).

    q: [T, Hq, D]; k, v: [T, Hk, D]; kv_cache: [2, Hk, N, bs, D] (K then V), one dtype; slot_mapping: [T] int64;
    block_tables: [S, W] int32; query_start: [S + 1] int32; seq_lens: [S] int32. First k, v are written into
    kv_cache (in place) at their slots (block slot // bs, offset slot % bs). Then query row i of sequence s, with
    q_len = query_start[s + 1] - query_start[s] rows, at position p = seq_lens[s] - q_len + i, attends the keys at
    positions j, max(0, p - sliding_window + 1) <= j <= p (sliding_window 0: no window), key j at block
    block_tables[s, j // bs], offset j % bs; query head h reads KV head h // (Hq // Hk). Softmax in fp32.
    Returns [T, Hq, D] in q's dtype."""
    _, hk, n, bs, d = kv_cache.shape
    write_kv(kv_cache, slot_mapping, k, v)
    out = torch.empty_like(q)
    group = q.shape[1] // hk
    for s in range(seq_lens.numel()):
        a, b, length = int(query_start[s]), int(query_start[s + 1]), int(seq_lens[s])
        if a == b:
            continue
        blocks = block_tables[s, :-(-length // bs)].long()
        keys, vals = (kv_cache[i][:, blocks].reshape(hk, -1, d)[:, :length].float().repeat_interleave(group, 0)
                      for i in (0, 1))
        scores = q[a:b].float().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [Hq, q_len, length]
        pos = torch.arange(length - (b - a), length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        visible = (kpos <= pos) & ((kpos > pos - sliding_window) if sliding_window else True)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[a:b] = (probs @ vals).transpose(0, 1).to(q.dtype)
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend an engine on device uses for backend (one of BACKENDS). auto: cpp on CPU when the C++ kernels
    build (else torch, with a warning logged), triton on CUDA. Raises ValueError for a backend that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "cpp" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError("attention_backend cpp runs on CPU only (use triton or torch on CUDA)")
        from conveyor.kernels import cpu_ops
        if cpu_ops.load():
            return "cpp"
        if backend == "cpp":
            raise ValueError(f"attention_backend cpp: {cpu_ops.error()}")
        log.warning("%s; attention uses the torch backend", cpu_ops.error())
        return "torch"
    if backend == "auto":
        return "triton"
    return backend


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks (K and V, every head) src[i] -> dst[i]: copy-on-write of shared blocks."""
    kv_cache[:, :, dst] = kv_cache[:, :, src]


def move_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks between two caches of the same layout (device <-> host swap)."""
    dst_cache[:, :, dst.to(dst_cache.device)] = src_cache[:, :, src.to(src_cache.device)].to(dst_cache.device)
