"""Paged attention in Triton: one kernel for decode, speculative verification, chunked and plain prefill.

The algorithm is FlashAttention-2's (Dao, 2023: query tiles, online softmax with a running max and sum per row,
rescaling the fp32 accumulator as the max grows) with the keys read through block tables as in vLLM's paged
attention (Kwon et al., 2023); written here for Conveyor's cache layout and op contract (see
`triton_paged_attention`).

Each program handles one query tile of one sequence for one KV head. A tile is BLOCK_Q query tokens times the
Hq // Hk query heads that share the KV head (GQA: each K/V tile is loaded once for the whole group), laid out as
BLOCK_Q * G_PAD rows of one matrix. Tiles of all sequences are numbered consecutively without a device-to-host
sync: sequence s's tiles start at query_start[s] // BLOCK_Q + s (vLLM's trick), and a program finds its sequence
by binary search over query_start. Tiles past a sequence's last query exit at once.

On CUDA tensors the kernel is compiled by Triton; on CPU tensors it runs in Triton's interpreter (whatever
TRITON_INTERPRET says), which is how CI tests it without a GPU. The interpreter multiplies bfloat16 matrices wrongly
(Triton 3.9 hands their raw bits to numpy), so there the bfloat16 operands of both products are widened to fp32
after the same roundings as on the GPU.
"""
from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 256
_NEG_INIT = tl.constexpr(-1.0e30)  # finite start of the running max: rows that see no key in a tile stay NaN-free
# Reductions name their combine functions directly (tl.max / tl.sum are themselves @triton.jit functions, which the
# interpreter runs only when TRITON_INTERPRET was set before triton was imported; the reduce builtin works either way)
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


def _paged_attention_program(
        q_ptr, kv_ptr, out_ptr, bt_ptr, qs_ptr, sl_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kv, stride_kvh, stride_kvn, stride_kvt, stride_bt,
        num_seqs, scale_log2e, window,
        G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
        BF16_AS_F32: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    # the sequence owning this tile: the last s with query_start[s] // BLOCK_Q + s <= tile
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        before = tl.load(qs_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(before, mid + 1, lo)
        hi = tl.where(before, hi, mid)
    s = lo - 1
    q_start = tl.load(qs_ptr + s)
    q_len = tl.load(qs_ptr + s + 1) - q_start
    row0 = (tile - (q_start // BLOCK_Q + s)) * BLOCK_Q  # first query row of the tile within the sequence
    if row0 >= q_len:
        return
    ctx = tl.load(sl_ptr + s) - q_len  # position of the sequence's first query row

    rows = tl.arange(0, BLOCK_Q * G_PAD)
    qi = row0 + rows // G_PAD
    head = kvh * G + rows % G_PAD
    row_ok = (qi < q_len) & (rows % G_PAD < G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos = ctx + qi
    last = ctx + tl.minimum(row0 + BLOCK_Q, q_len) - 1  # the tile's last query position: its last key
    first_key = tl.where(window > 0, tl.maximum(ctx + row0 - window + 1, 0), 0)
    m_i = tl.full([BLOCK_Q * G_PAD], _NEG_INIT, tl.float32)
    l_i = tl.full([BLOCK_Q * G_PAD], 0.0, tl.float32)
    acc = tl.full([BLOCK_Q * G_PAD, BLOCK_D], 0.0, tl.float32)
    kv_head = kv_ptr + kvh.to(tl.int64) * stride_kvh
    for n0 in range(first_key // BLOCK_N * BLOCK_N, last + 1, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n <= last
        blk = tl.load(bt_ptr + s.to(tl.int64) * stride_bt + offs_n // BS, mask=n_ok, other=0).to(tl.int64)
        kv_off = blk * stride_kvn + (offs_n % BS) * stride_kvt
        kt = tl.load(kv_head + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if BF16_AS_F32:
            sc = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        elif IEEE:
            sc = tl.dot(q, kt, input_precision="ieee")
        else:
            sc = tl.dot(q, kt)
        visible = (offs_n[None, :] <= pos[:, None]) & ((window == 0) | (offs_n[None, :] > pos[:, None] - window))
        sc = tl.where(visible, sc * scale_log2e, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(sc, 1, _MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(kv_head + stride_kv + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if BF16_AS_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        elif IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_compiled = triton.jit(_paged_attention_program)
# the interpreter executes its rewrite of the kernel in the function's globals and adds its own names there: give it a
# copy of this module's globals
_interpreted = InterpretedFunction(types.FunctionType(_paged_attention_program.__code__, dict(globals())))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
           block_tables: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
           sliding_window: int) -> None:
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or kv_cache.dtype != q.dtype:
        raise ValueError(f"triton_paged_attention supports float32, float16 and bfloat16 with q, k, v and kv_cache "
                         f"of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}, {kv_cache.dtype}")
    if q.dim() != 3 or k.dim() != 3 or kv_cache.dim() != 5 or k.shape != v.shape:
        raise ValueError(f"expected q [T, Hq, D], k and v [T, Hk, D], kv_cache [2, Hk, N, bs, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(kv_cache.shape)}")
    t, hq, d = q.shape
    _, hk, _, bs, _ = kv_cache.shape
    if k.shape != (t, hk, d) or kv_cache.shape[0] != 2 or kv_cache.shape[-1] != d:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, kv_cache {tuple(kv_cache.shape)}")
    if hk == 0 or hq % hk:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the KV heads ({hk})")
    if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"triton_paged_attention supports head_dim a multiple of 16 from 16 to {MAX_HEAD_DIM} "
                         f"(64 and 128 among them); got {d}")
    if bs & (bs - 1) or not 1 <= bs <= MAX_BLOCK_SIZE:
        raise ValueError(f"triton_paged_attention supports block sizes that are powers of two from 1 to "
                         f"{MAX_BLOCK_SIZE}; got {bs}")
    s = seq_lens.shape[0]
    if query_start.shape != (s + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != s:
        raise ValueError(f"expected query_start [S + 1] and block_tables [S, W] for S = {s} sequences; got "
                         f"{tuple(query_start.shape)} and {tuple(block_tables.shape)}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"expected slot_mapping [{t}]; got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype != torch.int64 or {x.dtype for x in (block_tables, query_start, seq_lens)} != {torch.int32}:
        raise ValueError(f"expected slot_mapping int64 and block_tables, query_start, seq_lens int32; got "
                         f"{slot_mapping.dtype}, {block_tables.dtype}, {query_start.dtype}, {seq_lens.dtype}")
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be 0 (none) or positive; got {sliding_window}")
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("kv_cache and q must be contiguous in their last dimension")
    devices = {x.device for x in (q, k, v, kv_cache, slot_mapping, block_tables, query_start, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")


def _write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _, h, n, bs, d = kv_cache.shape
    kv_cache[0].view(h, n * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
    kv_cache[1].view(h, n * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1))


# (bytes per element, BLOCK_D) -> (most rows of a query tile, BLOCK_N): the largest tiles that compile for sm_90
# without register spills (cuobjdump --dump-resource-usage; K/V tiles are gathers, held in registers)
_TILES = {(2, 64): (128, 64), (2, 128): (128, 32), (2, 256): (32, 16),
          (4, 64): (32, 32), (4, 128): (32, 16), (4, 256): (16, 16)}


@functools.lru_cache(maxsize=4096)
def _tile_config(num_tokens: int, num_seqs: int, group: int, head_dim: int,
                 elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, G_PAD, BLOCK_N, num_warps) from the mean query length, known on the host without a sync: short
    queries (decode, verification) get tiles of 16 rows, long ones (prefill) up to _TILES' limit."""
    g_pad = triton.next_power_of_2(group)
    max_rows, block_n = _TILES[elem_size, max(64, triton.next_power_of_2(head_dim))]
    mean_q = -(-num_tokens // max(num_seqs, 1))
    block_q = min(triton.next_power_of_2(mean_q), max(1, max_rows // g_pad))
    block_q = max(block_q, 16 // g_pad, 1)  # tl.dot needs at least 16 rows
    return block_q, g_pad, block_n, 8 if block_q * g_pad >= 128 else 4


def triton_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_start: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int) -> torch.Tensor:
    """Write this step's keys and values into the paged cache, then attend every query row (the op contract).

    q: [T, Hq, D]; k, v: [T, Hk, D]; kv_cache: [2, Hk, N, bs, D] (K then V), all of one dtype (float32, float16 or
    bfloat16); slot_mapping: [T] int64 (token t's K/V go to block slot // bs, offset slot % bs; all writes happen
    before any attention); block_tables: [S, W] int32; query_start: [S + 1] int32 cumulative query counts;
    seq_lens: [S] int32 keys of each sequence after the writes. Query row i of sequence s (q_len rows) is at
    position p = seq_lens[s] - q_len + i and attends keys j with max(0, p - sliding_window + 1) <= j <= p
    (sliding_window 0: no window); query head h reads KV head h // (Hq // Hk). Softmax and accumulation in fp32
    (the probabilities are rounded to the cache's dtype before multiplying the values, as FlashAttention does).
    Returns out [T, Hq, D] in q's dtype. Block tables must cover every key position (not checked: that needs a
    device-to-host sync).

    Supported: head_dim a multiple of 16 up to 256, block sizes powers of two 1..256; else ValueError. CUDA tensors
    run compiled, CPU tensors in Triton's interpreter (slow; for tests).
    """
    _check(q, k, v, kv_cache, slot_mapping, block_tables, query_start, seq_lens, sliding_window)
    _write_kv(kv_cache, slot_mapping, k, v)
    t, hq, d = q.shape
    hk, bs = kv_cache.shape[1], kv_cache.shape[3]
    s = seq_lens.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0 or s == 0:
        return out
    block_q, g_pad, block_n, num_warps = _tile_config(t, s, hq // hk, d, q.element_size())
    interpret = q.device.type == "cpu"
    kernel = _interpreted if interpret else _compiled
    grid = (t // block_q + s, hk)
    kernel[grid](
        q, kv_cache, out, block_tables, query_start, seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        s, scale * 1.4426950408889634, sliding_window,
        G=hq // hk, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BS=bs, IEEE=q.dtype == torch.float32, BF16_AS_F32=interpret and q.dtype == torch.bfloat16, num_warps=num_warps)
    return out
