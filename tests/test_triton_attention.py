"""The Triton paged-attention kernel against conveyor.model.attention's torch reference of the op contract, run by
Triton's interpreter on CPU tensors (conveyor/kernels/triton_attention.py picks the interpreter for CPU tensors
whatever TRITON_INTERPRET says), plus compiles of the kernel for sm_90 with the ptxas that ships in Triton's wheel,
which catch what only the compiler rejects."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton.runtime.jit import JITFunction

from attention_cases import Case, reference
from attention_cases import make_case as make_seqs

from conveyor.kernels.triton_attention import _compiled, _tile_config, triton_paged_attention

UNIT = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def make_case(seed: int, q_lens: list[int], cached: list[int], hq: int, hk: int, d: int, bs: int,
              dtype: torch.dtype, window: int = 0) -> Case:
    """Sequences with cached[s] keys already in the cache and q_lens[s] new tokens (attention_cases.make_case)."""
    return make_seqs(seed, list(zip(q_lens, cached)), hq, hk, d, bs, dtype, window)


def run(c: Case) -> torch.Tensor:
    return triton_paged_attention(*c.args())


def check(c: Case) -> None:
    """Outputs within the dtype's roundings (of the probabilities before P @ V and of the output) of the fp32
    reference, and the cache written exactly as index_copy_ writes it."""
    want, mag, _ = reference(c)
    want_cache = c.kv_cache.clone()
    _, h, n, bs, d = want_cache.shape
    for i, x in enumerate((c.k, c.v)):
        want_cache[i].view(h, n * bs, d).index_copy_(1, c.slot_mapping, x.transpose(0, 1))
    out = run(c)
    assert out.dtype == c.q.dtype and out.shape == c.q.shape
    assert torch.equal(c.kv_cache, want_cache)
    bound = 3 * UNIT[c.q.dtype] * (want.abs() + mag) + 1e-6
    err = (out.float() - want).abs()
    assert bool((err <= bound).all()), f"worst error / bound {float((err / bound).max()):.2f}"


CASES = {
    # (q_lens, cached, hq, hk, head_dim, block_size, dtype, window)
    "decode batch": ([1] * 12, [0, 1, 5, 15, 16, 17, 31, 64, 100, 127, 200, 250], 8, 2, 64, 16, torch.bfloat16, 0),
    "mixed step": ([1, 1, 4, 4, 37, 20], [40, 9, 33, 0, 60, 0], 8, 2, 64, 4, torch.float32, 0),
    "windows": ([1, 3, 50, 1], [90, 12, 30, 5], 4, 4, 128, 8, torch.float16, 7),
    "window 1": ([1, 9, 20], [30, 0, 7], 6, 2, 64, 2, torch.float32, 1),
    "block size 1": ([1, 6], [23, 10], 4, 1, 64, 1, torch.bfloat16, 0),
    "block size 256": ([1, 70], [300, 200], 4, 2, 64, 256, torch.float32, 100),
    "head_dim 80, group 3": ([1, 17], [50, 3], 12, 4, 80, 32, torch.float32, 0),
    "window edge": ([1, 1, 1, 1], [102, 101, 103, 60], 4, 2, 64, 16, torch.float32, 40),  # first key at a tile's end
    "long decode": ([1, 1], [4095, 2000], 8, 1, 128, 256, torch.bfloat16, 0),
    "long prefill chunk": ([48], [4000], 4, 2, 64, 64, torch.float32, 1024),
    "long prompt": ([700], [0], 4, 2, 64, 16, torch.float16, 0),
}


@pytest.mark.parametrize("name", CASES)
def test_parity(name):
    check(make_case(len(name), *CASES[name]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=st.lists(st.tuples(st.integers(1, 24), st.integers(0, 120)), min_size=1, max_size=5),
       heads=st.sampled_from([(4, 4), (4, 2), (8, 1), (6, 2)]), bs=st.sampled_from([1, 2, 8, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), window=st.sampled_from([0, 1, 5, 40]),
       seed=st.integers(0, 2 ** 16))
def test_parity_property(seqs, heads, bs, dtype, window, seed):
    q_lens, cached = [s[0] for s in seqs], [s[1] for s in seqs]
    check(make_case(seed, q_lens, cached, heads[0], heads[1], 64, bs, dtype, window))


def test_strided_query_and_empty_batch():
    c = make_case(3, [1, 5], [10, 4], 4, 2, 64, 8, torch.float32)
    c.q = torch.cat([c.q, torch.zeros_like(c.q)], dim=-1)[..., :64]  # a view with row stride 2 * Hq * D
    check(c)
    e = make_case(4, [1], [3], 4, 2, 64, 8, torch.float32)
    e.q, e.k, e.v, e.slot_mapping = e.q[:0], e.k[:0], e.v[:0], e.slot_mapping[:0]
    e.query_start, e.seq_lens, e.block_tables = e.query_start[:1], e.seq_lens[:0], e.block_tables[:0]
    assert run(e).shape == (0, 4, 64)


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=72), "head_dim a multiple of 16"),
    (dict(head_dim=512), "head_dim a multiple of 16"),
    (dict(block_size=12), "powers of two"),
    (dict(block_size=512), "powers of two"),
    (dict(cache_dtype=torch.float16), "one dtype"),
    (dict(dtype=torch.float64), "float32, float16 and bfloat16"),
    (dict(hq=6, hk=4), "multiple of the KV heads"),
    (dict(window=-1), "sliding_window"),
    (dict(index_dtype=torch.int64), "int32"),
])
def test_bad_input(change, message):
    d, bs = change.get("head_dim", 64), change.get("block_size", 8)
    dtype = change.get("dtype", torch.float32)
    c = make_case(5, [2], [3], change.get("hq", 4), change.get("hk", 2), d, bs, dtype, change.get("window", 0))
    c.kv_cache = c.kv_cache.to(change.get("cache_dtype", dtype))
    c.seq_lens = c.seq_lens.to(change.get("index_dtype", torch.int32))
    before = c.kv_cache.clone()
    with pytest.raises(ValueError, match=message):
        run(c)
    assert torch.equal(c.kv_cache, before)  # nothing written


@pytest.mark.skipif(not isinstance(_compiled, JITFunction),
                    reason="TRITON_INTERPRET=1 was set when triton was imported: triton.jit interprets, none compiles")
@pytest.mark.parametrize("dtype, mean_q, group, head_dim", [("bf16", 1, 4, 128), ("fp32", 4, 3, 80),
                                                             ("bf16", 300, 4, 128)])
def test_compiles_for_sm90_without_spills(dtype, mean_q, group, head_dim, tmp_path):
    """The real compiler (no GPU needed: Triton's bundled ptxas) accepts the kernel for decode, verification and
    prefill tiles (the interpreter alone would not catch a construct only the compiler rejects), and the tile sizes
    of _TILES keep it within registers (cuobjdump's resource usage: no stack)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    size = 4 if dtype == "fp32" else 2
    block_q, g_pad, block_n, num_warps = _tile_config(mean_q * 8, 8, group, head_dim, size)
    consts = dict(G=group, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim,
                  BLOCK_D=1 << (head_dim - 1).bit_length(), BS=16, IEEE=dtype == "fp32", BF16_AS_F32=False)
    types = [f"*{dtype}"] * 3 + ["*i32"] * 3 + ["i32"] * 9 + ["i32", "fp32", "i32"] + ["constexpr"] * len(consts)
    names = _compiled.arg_names
    source = ASTSource(_compiled, dict(zip(names, types)),
                       constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    (tmp_path / "k.cubin").write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(tmp_path / "k.cubin")], capture_output=True,
                           text=True, check=True).stdout
    assert re.search(r"REG:\d+ STACK:0 ", usage), usage
