"""The CPU C++ paged-attention op (torch.ops.conveyor.paged_attention, conveyor/kernels/cpu/paged_attention.cpp)
against conveyor.model.attention.reference_paged_attention, the plain-torch statement of the op contract: block
tables scattered over a pool and padded, decode, verification and prefill chunks mixed in one call, block sizes,
GQA ratios, head dims of the AVX-512 and the generic paths, sliding windows and dtypes, at 1 and 2 torch threads.
Bad input must raise a clear error and write nothing. The torch backend (the fallback) is held to the same
reference through the `paged_attention` dispatch."""
from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_cases import Case, make_case, reference

from conveyor.kernels import cpu_ops
from conveyor.model.attention import build_metadata, paged_attention, resolve_backend

# Unit roundoff of each dtype: rounding an fp32 result to it moves it by at most UNIT * |result|.
UNIT = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# fp32 math on both sides (the kernel's online softmax with its polynomial exp, the reference's matmuls): errors of
# at most 1e-6 relative to P @ |V| measured on these cases, whose scores are of order 1 (randn inputs, scale
# D ** -0.5; an fp32 score s is off by ~|s| * 6e-8, so scores of order 100 would need a wider bound). 1e-5 leaves a
# wide margin, while one key too many or too few moves an output by 80x to 1e6x the bound here.
FP32_TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    if platform.system() != "Linux":
        pytest.skip("the CPU kernels are built on Linux only")
    assert cpu_ops.load(), cpu_ops.error()


def assert_close(out: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
                 prob_roundings: int = 0) -> None:
    """out within one rounding to dtype of the fp32 result plus the fp32 error; prob_roundings more roundings of
    the probabilities (a backend that multiplies P @ V in dtype) add that many UNIT * P @ |V|."""
    assert out.dtype == dtype and out.shape == want.shape
    bound = UNIT[dtype] * (want.abs() + prob_roundings * mag) + FP32_TOL * mag + 1e-7
    err = (out.float() - want).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"worst error / bound {worst:.2f} (max error {float(err.max()):.3g})"


def check_op(c: Case, threads: tuple[int, ...] = (1, 2)) -> None:
    """The op at each thread count on its own copy of the cache: the cache written exactly as the reference writes
    it (new K/V at their slots, nothing else touched) and the output within assert_close's bound."""
    want, mag, want_cache = reference(c)
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            cache = c.kv_cache.clone()
            out = torch.ops.conveyor.paged_attention(*c.args(cache))
            assert torch.equal(cache, want_cache), f"cache differs at {n} threads"
            assert_close(out, want, mag, c.q.dtype)
    finally:
        torch.set_num_threads(before)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DECODES = [(1, c) for c in (0, 1, 2, 15, 16, 17, 31, 33, 200, 511)]
CASES = {
    # name: (seqs [(new, cached)], hq, hk, head_dim, block_size, dtype, window)
    "decodes bf16 d128 gqa4 bs16": (DECODES + [(1, 4095)], 8, 2, 128, 16, BF16, 0),
    "decodes fp32 d64 gqa8 bs32 (8 rows: K transposed)": (DECODES, 8, 1, 64, 32, F32, 0),
    "verification fp16 d64 gqa1 bs32": ([(n, c) for n, c in zip(range(2, 18), range(0, 400, 25))], 4, 4, 64, 32,
                                        F16, 0),
    "mixed kinds fp32 d128 gqa1 bs256": ([(1, 700), (5, 90), (120, 3000), (150, 0), (17, 1)], 4, 4, 128, 256, F32, 0),
    "mixed kinds bf16 d64 gqa3 bs48": ([(1, 95), (4, 48), (200, 1000), (33, 0), (1, 0)], 6, 2, 64, 48, BF16, 0),
    "long chunk after a prefix fp16 d128 gqa4 bs16": ([(300, 3700), (1, 3999)], 8, 2, 128, 16, F16, 0),
    "long prompt bf16 d64 gqa8 bs16": ([(513, 0)], 8, 1, 64, 16, BF16, 0),
    "generic d80 gqa3 bs1 fp32": ([(1, 40), (9, 3), (40, 0), (17, 60)], 6, 2, 80, 1, F32, 0),
    "generic d32 gqa4 bs2 bf16": ([(1, 0), (1, 77), (3, 20), (25, 100)], 8, 2, 32, 2, BF16, 0),
    "generic d80 bs5 fp16 window 1": ([(1, 12), (6, 4), (30, 0)], 4, 1, 80, 5, F16, 1),
    "window 7 d32 bs16 fp32": ([(1, 3), (1, 60), (10, 33), (70, 0)], 4, 4, 32, 16, F32, 7),
    "window 40 d64 bs48 bf16 (first key inside a sub-tile)": ([(1, 102), (1, 101), (40, 70), (2, 0)], 8, 2, 64, 48,
                                                              BF16, 40),
    "window 1000 d128 bs32 fp32 over a 4k chunk": ([(64, 4000), (1, 2500)], 8, 2, 128, 32, F32, 1000),
    "window beyond every context d128 bs16 fp16": ([(1, 50), (20, 30), (60, 0)], 4, 1, 128, 16, F16, 100000),
}


@pytest.mark.parametrize("name", CASES)
def test_op_matches_reference(name):
    check_op(make_case(len(name), *CASES[name]))


def test_shared_prefix_blocks_and_sequences_without_queries():
    """Sequences reading the same prefix blocks (prefix caching); a sequence with no queries this step."""
    c = make_case(7, [(1, 64), (5, 80), (40, 64)], 8, 2, 64, 16, BF16, shared_blocks=4)
    check_op(c)
    c = make_case(8, [(3, 10), (1, 20)], 4, 2, 64, 8, F32)
    qs = c.query_start.tolist()  # the second sequence keeps its keys and has no queries
    c = replace(c, q=c.q[:3], k=c.k[:3], v=c.v[:3], slot_mapping=c.slot_mapping[:3],
                query_start=torch.tensor([0, qs[1], qs[1]], dtype=torch.int32),
                seq_lens=torch.tensor([13, 20], dtype=torch.int32))
    check_op(c)


def test_empty_batch():
    c = make_case(9, [(1, 3)], 4, 2, 64, 8, F32)
    cache = c.kv_cache.clone()
    out = torch.ops.conveyor.paged_attention(c.q[:0], c.k[:0], c.v[:0], cache, c.slot_mapping[:0],
                                             c.block_tables[:0], c.query_start[:1], c.seq_lens[:0], 0.125, 0)
    assert out.shape == (0, 4, 64) and torch.equal(cache, c.kv_cache)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 150)), min_size=1, max_size=5),
       heads=st.sampled_from([(4, 4), (6, 2), (8, 2), (8, 1)]), d=st.sampled_from([32, 64, 80, 128]),
       bs=st.sampled_from([1, 2, 3, 16, 32, 48]), dtype=st.sampled_from([F32, BF16, F16]),
       window=st.sampled_from([0, 1, 5, 40]), seed=st.integers(0, 2 ** 16))
def test_op_matches_reference_property(seqs, heads, d, bs, dtype, window, seed):
    check_op(make_case(seed, seqs, heads[0], heads[1], d, bs, dtype, window))


def dispatch(c: Case, backend: str, num_decode_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """paged_attention with the metadata build_metadata makes for c's batch (block tables padded with block 0):
    (output, the cache after the call)."""
    bs = c.kv_cache.shape[3]
    meta = build_metadata(c.tables, torch.diff(c.query_start).tolist(), c.seq_lens.tolist(), c.slot_mapping.tolist(),
                          num_decode_seqs, bs, c.window or None, backend, torch.device("cpu"))
    cache = c.kv_cache.clone()
    return paged_attention(c.q, c.k, c.v, cache, meta, c.q.shape[-1] ** -0.5), cache


BACKEND_CASES = {
    # name: (seqs, decode-like sequences first, hq, hk, head_dim, block_size, dtype, window)
    "decodes, verification, chunks fp32 gqa4": ([(1, 130), (1, 5), (4, 60), (40, 90), (25, 0)], 3, 8, 2, 64, 16,
                                                F32, 0),
    "bf16 gqa8 window 20": ([(1, 300), (6, 17), (70, 0), (12, 200)], 2, 8, 1, 128, 32, BF16, 20),
    "fp16 gqa3 d80 bs5": ([(1, 0), (1, 64), (33, 10)], 2, 6, 2, 80, 5, F16, 0),
    "prefills only bf16 d64 bs256": ([(64, 300), (90, 0)], 0, 4, 4, 64, 256, BF16, 0),
}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", BACKEND_CASES)
def test_backends_match_reference(name, backend):
    """The torch fallback (decodes batched in chunks with P rounded to q's dtype before P @ V, prefills through
    SDPA) and the cpp backend through the dispatch. The torch backend's bound allows two more roundings of P @ |V|
    (P, then the chunk's partial product) for bf16 and fp16."""
    seqs, nd, *geometry = BACKEND_CASES[name]
    c = make_case(len(name), seqs, *geometry)
    want, mag, want_cache = reference(c)
    out, cache = dispatch(c, backend, nd)
    assert torch.equal(cache, want_cache)
    assert_close(out, want, mag, c.q.dtype, prob_roundings=2 if backend == "torch" else 0)


def test_auto_backend_on_cpu_is_the_kernel():
    assert resolve_backend("auto", torch.device("cpu")) == "cpp" == resolve_backend("cpp", torch.device("cpu"))


def test_dispatch_takes_views_of_a_fused_projection():
    """The model splits one qkv projection: q, k, v reach the dispatch as strided views."""
    c = make_case(11, [(1, 40), (7, 9), (30, 0)], 8, 2, 64, 16, BF16)
    fused = torch.cat([x.flatten(1) for x in (c.q, c.k, c.v)], dim=1)
    views = fused.split([8 * 64, 2 * 64, 2 * 64], dim=1)
    strided = replace(c, q=views[0].view(-1, 8, 64), k=views[1].view(-1, 2, 64), v=views[2].view(-1, 2, 64))
    assert not strided.q.is_contiguous()
    want, mag, want_cache = reference(c)
    out, cache = dispatch(strided, "cpp", 1)
    assert torch.equal(cache, want_cache)
    assert_close(out, want, mag, BF16)


def test_op_takes_strided_rows():
    """q, k, v as the model makes them: views of one fused projection (rows longer than H * D), and q head-major
    underneath (a head stride of T * D); the elements of a head stay contiguous."""
    c = make_case(12, [(1, 70), (5, 20), (24, 0)], 8, 2, 128, 16, F16)
    fused = torch.cat([x.flatten(1) for x in (c.q, c.k, c.v)], dim=1)
    q, k, v = (x.unflatten(1, (-1, 128)) for x in fused.split([8 * 128, 2 * 128, 2 * 128], dim=1))
    check_op(replace(c, q=q, k=k, v=v))
    check_op(replace(c, q=c.q.transpose(0, 1).contiguous().transpose(0, 1)))


def _bad(c: Case, **change) -> tuple:
    """c's op arguments with some replaced by name (q, k, v, kv_cache, slot_mapping, block_tables, query_start,
    seq_lens, window)."""
    names = ["q", "k", "v", "kv_cache", "slot_mapping", "block_tables", "query_start", "seq_lens", "scale", "window"]
    args = dict(zip(names, c.args(c.kv_cache.clone())))
    return tuple({**args, **change}.values())


def _i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


BASE = dict(seqs=[(2, 3), (1, 4)], hq=4, hk=2, d=64, bs=8)  # 3 tokens; 7 blocks of 8 slots; tables 2 x 3
BAD_INPUT = {
    # name: (change(case) -> args, error message)
    "float64": (lambda c: _bad(c, **{n: getattr(c, n).double() for n in ("q", "k", "v")},
                               kv_cache=c.kv_cache.double()), "Double is not supported"),
    "int32 tensors": (lambda c: _bad(c, **{n: getattr(c, n).int() for n in ("q", "k", "v")},
                                     kv_cache=c.kv_cache.int()), "Int is not supported"),
    "bf16 cache, fp32 q": (lambda c: _bad(c, kv_cache=c.kv_cache.bfloat16()), "must share a dtype"),
    "fp16 v": (lambda c: _bad(c, v=c.v.half()), "must share a dtype"),
    "k heads != cache heads": (lambda c: _bad(c, k=c.k[:, :1].contiguous(), v=c.v[:, :1].contiguous()), "disagree"),
    "q heads not a multiple": (lambda c: _bad(c, q=c.q[:, :3].contiguous()), "disagree"),
    "head_dim mismatch": (lambda c: _bad(c, q=c.q[..., :32].contiguous()), "disagree"),
    "k with fewer tokens": (lambda c: _bad(c, k=c.k[:2], v=c.v[:2]), "disagree"),
    "q flattened": (lambda c: _bad(c, q=c.q.flatten(1)), r"q, k, v \[T, H, D\] and kv_cache"),
    "cache without the K/V axis": (lambda c: _bad(c, kv_cache=c.kv_cache[0].clone()), r"kv_cache \[2, Hk"),
    "cache with 3 planes": (lambda c: _bad(c, kv_cache=torch.cat([c.kv_cache, c.kv_cache[:1]])), r"kv_cache \[2, Hk"),
    "int32 slot_mapping": (lambda c: _bad(c, slot_mapping=c.slot_mapping.int()), "slot_mapping must be int64"),
    "short slot_mapping": (lambda c: _bad(c, slot_mapping=c.slot_mapping[:2]), "slot_mapping must be int64"),
    "int64 block_tables": (lambda c: _bad(c, block_tables=c.block_tables.long()), "must be int32"),
    "int64 query_start": (lambda c: _bad(c, query_start=c.query_start.long()), "must be int32"),
    "float seq_lens": (lambda c: _bad(c, seq_lens=c.seq_lens.float()), "must be int32"),
    "block_tables 1-D": (lambda c: _bad(c, block_tables=c.block_tables[0].clone()), r"block_tables \[S, W\]"),
    "seq_lens of 3 sequences": (lambda c: _bad(c, seq_lens=_i32(5, 5, 5)), r"block_tables \[S, W\]"),
    "query_start of 1 sequence": (lambda c: _bad(c, query_start=_i32(0, 3)), r"block_tables \[S, W\]"),
    "query_start not ending at T": (lambda c: _bad(c, query_start=_i32(0, 2, 2)), "run from 0 to T"),
    "query_start not starting at 0": (lambda c: _bad(c, query_start=_i32(1, 2, 3)), "run from 0 to T"),
    "query_start decreasing": (lambda c: _bad(c, query_start=_i32(0, 4, 3)), "sequence 1 has -1 queries"),
    "seq_lens shorter than the queries": (lambda c: _bad(c, seq_lens=_i32(1, 5)), "sequence 0 has 2 queries, 1 keys"),
    "seq_lens past the table": (lambda c: _bad(c, seq_lens=_i32(5, 8 * 3 + 1)), "3 block table entries"),
    "negative seq_len": (lambda c: _bad(c, query_start=_i32(0, 3, 3), seq_lens=_i32(5, -8)), "0 queries, -8 keys"),
    "block id = num_blocks": (lambda c: _bad(c, block_tables=_table(c, 0, 0, 7)), "block id 7 out of range"),
    "block id -1": (lambda c: _bad(c, block_tables=_table(c, 1, 0, -1)), "block id -1 out of range"),
    "slot = num_blocks * block_size": (lambda c: _bad(c, slot_mapping=torch.tensor([0, 1, 56])), "slot 56 out of"),
    "slot -1": (lambda c: _bad(c, slot_mapping=torch.tensor([0, -1, 2])), "slot -1 out of range"),
    "non-contiguous kv_cache": (lambda c: _bad(c, kv_cache=_strided(c.kv_cache)), "contiguous .*expected"),
    "q with strided elements": (lambda c: _bad(c, q=_strided(c.q)), "contiguous .*expected"),
    "v with strided elements": (lambda c: _bad(c, v=_strided(c.v)), "contiguous .*expected"),
    "non-contiguous block_tables": (lambda c: _bad(c, block_tables=c.block_tables.t().contiguous().t()),
                                    "must be int32"),
}


def _table(c: Case, s: int, i: int, block: int) -> torch.Tensor:
    t = c.block_tables.clone()
    t[s, i] = block
    return t


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x's values in a non-contiguous tensor of x's shape (every other element of the last axis)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_raises_and_writes_nothing(name):
    change, message = BAD_INPUT[name]
    c = make_case(5, **BASE, dtype=F32)
    assert c.kv_cache.shape[2] == 7 and c.block_tables.shape == (2, 3)  # the numbers in BAD_INPUT
    args = change(c)
    before = args[3].clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.conveyor.paged_attention(*args)
    assert torch.equal(args[3], before), "the cache was written before the error"


def test_tensors_off_the_cpu_are_refused():
    """No GPU here: a meta-device tensor stands for any device the op has no kernel for."""
    c = make_case(5, **BASE, dtype=F32)
    with pytest.raises(NotImplementedError, match="Meta"):
        torch.ops.conveyor.paged_attention(*_bad(c, kv_cache=c.kv_cache.to("meta")))


def test_negative_window_is_refused():
    c = make_case(5, **BASE, dtype=F32)
    with pytest.raises(RuntimeError, match="sliding_window"):
        torch.ops.conveyor.paged_attention(*_bad(c, window=-1))


def test_window_beyond_int32_is_no_window_or_refused():
    c = make_case(5, [(1, 20), (6, 10)], 4, 2, 64, 8, F32)
    try:
        out = torch.ops.conveyor.paged_attention(*_bad(c, window=2 ** 32 + 3))
    except RuntimeError as e:
        assert "sliding_window" in str(e)
        return
    assert torch.equal(out, torch.ops.conveyor.paged_attention(*_bad(c, window=0)))


CRASH_PROBE = """
import torch
from conveyor.kernels import cpu_ops
assert cpu_ops.load(), cpu_ops.error()
hq, hk, bs = {hq}, {hk}, {bs}
q, k, v = torch.randn(2, hq, 64), torch.randn(2, hk, 64), torch.randn(2, hk, 64)
try:
    torch.ops.conveyor.paged_attention(q, k, v, torch.zeros(2, hk, 4, bs, 64), torch.arange(2),
                                       torch.zeros(1, 4, dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
                                       torch.tensor([2], dtype=torch.int32), 0.125, 0)
except RuntimeError as e:
    print("raised:", e)
"""


@pytest.mark.parametrize("hq, hk, bs", [(4, 0, 4), (4, 2, 0)], ids=["no KV heads", "block size 0"])
def test_degenerate_shapes_raise_instead_of_crashing(hq, hk, bs):
    """In a child process, since the failure is the process dying."""
    proc = subprocess.run([sys.executable, "-c", CRASH_PROBE.format(hq=hq, hk=hk, bs=bs)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "raised: paged_attention:" in proc.stdout, (proc.returncode, proc.stderr[-500:])
