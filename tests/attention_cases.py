"""Random paged-attention cases and the reference outputs both kernels' tests compare against
(tests/test_cpu_attention.py, tests/test_triton_attention.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.model.attention import reference_paged_attention


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    window: int
    tables: list[list[int]]  # the blocks each sequence needs, unpadded (for build_metadata)

    def args(self, kv_cache: torch.Tensor | None = None) -> tuple:
        """The op's arguments, with kv_cache replaced if given."""
        return (self.q, self.k, self.v, self.kv_cache if kv_cache is None else kv_cache, self.slot_mapping,
                self.block_tables, self.query_start, self.seq_lens, self.q.shape[-1] ** -0.5, self.window)


def make_case(seed: int, seqs: list[tuple[int, int]], hq: int, hk: int, d: int, bs: int, dtype: torch.dtype,
              window: int = 0, shared_blocks: int = 0) -> Case:
    """Sequences of (new tokens, cached tokens), their blocks a random permutation of a pool with spare blocks,
    table rows padded with random valid ids, a cache of random values (stale data wherever nothing is written).
    shared_blocks: every sequence's first blocks are sequence 0's (a shared prefix, read only)."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for n, c in seqs]
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 5
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for s, n in enumerate(need):
        own = n - (shared_blocks if s else 0)
        assert own >= 0 and (not s or seqs[s][1] >= shared_blocks * bs), "shared blocks hold cached keys only (never written)"
        tables.append((tables[0][:shared_blocks] if s else []) + pool[:own])
        pool = pool[own:]
    width = max(need) + 2
    padded = torch.randint(0, num_blocks, (len(seqs), width), generator=g, dtype=torch.int32)
    for s, t in enumerate(tables):
        padded[s, :len(t)] = torch.tensor(t, dtype=torch.int32)
    slots = [tables[s][p // bs] * bs + p % bs for s, (n, c) in enumerate(seqs) for p in range(c, c + n)]
    starts = [0]
    for n, _ in seqs:
        starts.append(starts[-1] + n)
    t = starts[-1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return Case(randn(t, hq, d), randn(t, hk, d), randn(t, hk, d), randn(2, hk, num_blocks, bs, d),
                torch.tensor(slots, dtype=torch.long), padded, torch.tensor(starts, dtype=torch.int32),
                torch.tensor(lens, dtype=torch.int32), window, tables)


def reference(c: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the fp32 output of the reference on exact fp32 copies, P @ |V| (the scale of the fp32 error; P depends on q
    and K only, so the reference over |V| gives it), the cache as the reference writes it in c's dtype)."""
    q, k, v = (x.float() for x in (c.q, c.k, c.v))
    cache = c.kv_cache.float().clone()  # .float() of an fp32 tensor is the tensor itself
    out = reference_paged_attention(q, k, v, cache.clone(), *c.args()[4:])
    cache[1] = cache[1].abs()
    mag = reference_paged_attention(q, k, v.abs(), cache, *c.args()[4:])
    want_cache = c.kv_cache.clone()
    reference_paged_attention(c.q, c.k, c.v, want_cache, *c.args()[4:])
    return out, mag, want_cache
