"""Stateful property test of block sharing in the paged KV cache: KVCacheManager + BlockPool driven the way the
scheduler and the engine drive them (no model), against a model of what every physical block holds.

Sharing comes from three places: the prefix cache (prompts drawn from a few common prefixes, with a cache_salt from
a tiny set), fork() (parallel sampling / beam search share a parent's blocks, the partly filled tail copy-on-write)
and swap (blocks go to a host pool and come back into fresh device blocks).

The content model: slot j of a block holds the K/V of one position p, which depends on the sequence's tokens up to
and including p, so the model records (cache_salt, tuple(token_ids[:p + 1])) per slot. A write stores that for the
writer; a copy-on-write or swap copy copies the slots; a freshly allocated block keeps the stale slots of its last
user. A sequence's computed positions must then read back exactly its own (salt, prefix)."""
from __future__ import annotations

import sys
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conveyor.engine.kv_cache_manager import KVCacheManager, cdiv, hash_block
from conveyor.engine.sequence import Sequence, SequenceStatus
from conveyor.sampling_params import SamplingParams

PREFIXES = [(), (1, 2, 3, 1, 2, 3, 1, 2), (1, 2, 3, 1, 0, 0), (3, 3, 3, 3, 3, 3, 3, 3, 3)]
SALTS = [None, None, "a", "b"]
TOKENS = st.integers(0, 3)  # a tiny vocabulary: different sequences often write identical blocks
MAX_LEN = 24  # a sequence that reaches this many tokens finishes
MAX_SEQS = 8
PARAMS = SamplingParams()

RUNNING, WAITING, SWAPPED = SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.SWAPPED


def slot(seq: Sequence, pos: int) -> tuple[str | None, tuple[int, ...]]:
    """What position pos of seq's KV cache must hold."""
    return seq.cache_salt, tuple(seq.token_ids[:pos + 1])


def pick(items: list, i: int):
    return items[i % len(items)]


class KVSharingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv: KVCacheManager | None = None
        self.seqs: list[Sequence] = []  # every sequence not finished
        self.dev: list[list] = []  # device block -> per slot (salt, prefix) or None
        self.host: list[list] = []  # host block -> the same
        self.counter = 0

    # ---- helpers ---------------------------------------------------------------------------------------------------
    @property
    def bs(self) -> int:
        return self.kv.block_size

    def with_status(self, status: SequenceStatus) -> list[Sequence]:
        return [s for s in self.seqs if s.status == status]

    def holders(self) -> Counter[int]:
        """Device block -> how many live (running) tables hold it."""
        c: Counter[int] = Counter()
        for s in self.with_status(RUNNING):
            c.update(s.block_table)
        return c

    def snapshot(self) -> tuple:
        pool = self.kv.pool
        return (list(pool.ref_counts), list(pool.free_queue), dict(pool.cached), list(pool.block_hash),
                [(s.seq_id, list(s.block_table), s.num_computed_tokens, s.num_cached_blocks) for s in self.seqs],
                list(self.kv.pending_copies), list(self.kv.pending_swap_out), list(self.kv.pending_swap_in),
                list(self.kv.host_pool.ref_counts) if self.kv.host_pool else None)

    def new_seq(self, tokens: list[int], salt: str | None) -> Sequence:
        self.counter += 1
        tokens = tokens or [0]
        seq = Sequence(f"r{self.counter}", 0, list(tokens), len(tokens), PARAMS, MAX_LEN - len(tokens),
                       arrival_time=float(self.counter), cache_salt=salt)
        self.seqs.append(seq)
        return seq

    def allocate(self, seq: Sequence, n: int, reserve: bool = False) -> bool:
        """allocate_slots, checking its answer, that a failure changes nothing, and the copy-on-write it does."""
        kv, pool, bs = self.kv, self.kv.pool, self.bs
        holders = self.holders()
        pos = seq.num_computed_tokens
        assert len(seq.block_table) == cdiv(pos, bs)
        shared_tail = None
        if n and pos % bs and holders[seq.block_table[pos // bs]] > 1:
            shared_tail = (pos // bs, seq.block_table[pos // bs])
        need = cdiv(pos + n, bs) - len(seq.block_table) + (shared_tail is not None)
        expect_ok = need <= pool.num_free - (kv.watermark_blocks if reserve else 0)
        before = self.snapshot()
        old_table = list(seq.block_table)
        old_refs = list(pool.ref_counts)
        ok = kv.allocate_slots(seq, n, reserve=reserve)
        assert ok == expect_ok, f"allocate_slots({n}) answered {ok} with {pool.num_free} free for {need} blocks"
        if not ok:
            assert self.snapshot() == before, "a failed allocate_slots changed something"
            event("allocate_slots failed")
            return False
        copies = kv.take_copies()
        assert len(seq.block_table) == cdiv(pos + n, bs)
        fresh = [i for i, b in enumerate(seq.block_table) if i >= len(old_table) or b != old_table[i]]
        if shared_tail is None:
            assert copies == [], f"copy-on-write {copies} without a shared tail"
            assert fresh == list(range(len(old_table), len(seq.block_table)))
        else:
            i, old = shared_tail
            assert len(copies) == 1, f"a shared tail must be copied exactly once, got {copies}"
            src, dst = copies[0]
            assert src == old and seq.block_table[i] == dst, (copies, shared_tail, seq.block_table)
            assert fresh == [i] + list(range(len(old_table), len(seq.block_table)))
            assert pool.ref_counts[old] == old_refs[old] - 1, "the writer's reference to the shared tail stayed"
            self.dev[dst] = list(self.dev[src])  # the copy happens before the step writes anything
            event("copy-on-write")
        for i in fresh:
            b = seq.block_table[i]
            assert holders[b] == 0 and old_refs[b] == 0, f"block {b} handed out while held"
            assert pool.ref_counts[b] == 1 and pool.block_hash[b] is None
        assert kv.pending_copies == []
        return True

    def write(self, seq: Sequence, n: int) -> None:
        """The step computes positions [num_computed, num_computed + n) of seq: never into a shared block."""
        pool, bs = self.kv.pool, self.bs
        start = seq.num_computed_tokens
        holders = self.holders()
        for p in range(start, start + n):
            b = seq.block_table[p // bs]
            assert pool.ref_counts[b] == 1 and holders[b] == 1, f"block {b} written while shared"
            assert pool.block_hash[b] is None, f"block {b} written while in the prefix cache"
            self.dev[b][p % bs] = slot(seq, p)
        seq.num_computed_tokens += n
        self.kv.cache_full_blocks(seq)

    def compute(self, seq: Sequence, n: int, forks: int, toks: list[int]) -> bool:
        if not self.allocate(seq, n):
            return False
        self.write(seq, n)
        if seq.num_computed_tokens == seq.num_tokens:
            self.sampled(seq, forks, toks)
        return True

    def sampled(self, seq: Sequence, forks: int, toks: list[int]) -> None:
        """The chunk reached the end: fork the parent's samples/beams first (they share its blocks), then every one
        gets its own next token."""
        family = [seq]
        for _ in range(forks):
            if len(self.seqs) >= MAX_SEQS:
                break
            family.append(self.fork(seq))
        for s, tok in zip(family, toks):
            if s.num_tokens >= MAX_LEN:
                self.finish_seq(s)
            else:
                s.token_ids.append(tok)

    def fork(self, parent: Sequence) -> Sequence:
        child = Sequence(parent.request_id, len(self.seqs), [], parent.num_prompt_tokens, PARAMS, parent.max_tokens,
                         arrival_time=parent.arrival_time, status=SequenceStatus.FORK_PENDING,
                         cache_salt=parent.cache_salt)
        refs = list(self.kv.pool.ref_counts)
        self.kv.fork(parent, child)
        child.status = RUNNING
        self.seqs.append(child)
        assert child.block_table == parent.block_table and child.block_table is not parent.block_table
        assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
        for b in parent.block_table:
            assert self.kv.pool.ref_counts[b] == refs[b] + 1
        return child

    def finish_seq(self, seq: Sequence) -> None:
        pool, host = self.kv.pool, self.kv.host_pool
        refs, host_in_use = list(pool.ref_counts), host.num_in_use if host else 0
        table, status = list(seq.block_table), seq.status
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.seqs.remove(seq)
        assert seq.block_table == []
        if status == SWAPPED:
            assert pool.ref_counts == refs and host.num_in_use == host_in_use - len(table)
        else:
            assert host is None or host.num_in_use == host_in_use
            for b in table:
                assert pool.ref_counts[b] == refs[b] - 1

    # ---- rules ---------------------------------------------------------------------------------------------------
    @initialize(block_size=st.sampled_from([1, 2, 4, 4]), num_blocks=st.integers(3, 14),
                num_host=st.sampled_from([0, 4, 12, 12]), watermark=st.sampled_from([0.0, 0.0, 0.25]))
    def setup(self, block_size, num_blocks, num_host, watermark):
        self.kv = KVCacheManager(num_blocks, block_size, watermark=watermark, num_host_blocks=num_host)
        self.dev = [[None] * block_size for _ in range(num_blocks)]
        self.host = [[None] * block_size for _ in range(num_host)]

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(prefix=st.sampled_from(PREFIXES), suffix=st.lists(TOKENS, max_size=6), salt=st.sampled_from(SALTS))
    def add(self, prefix, suffix, salt):
        self.new_seq(list(prefix) + suffix, salt)

    def admit_seq(self, seq: Sequence, frac: float, forks: int = 0, toks: tuple[int, ...] = (0, 1, 2)) -> bool:
        """Scheduler._admit: prefix-cache match, then the first chunk's slots (keeping the watermark), rolled back on
        failure; the chunk is computed in the same step. A prefill that ends forks the request's other samples."""
        kv, bs = self.kv, self.bs
        refs = list(kv.pool.ref_counts)
        hit = kv.match_prefix(seq)
        assert hit % bs == 0 and hit < seq.num_tokens and hit == seq.num_computed_tokens
        assert len(seq.block_table) == hit // bs
        for i, b in enumerate(seq.block_table):  # a hit holds exactly the requested (salted) prefix's K/V
            got = self.dev[b]
            want = [slot(seq, p) for p in range(i * bs, (i + 1) * bs)]
            assert got == want, f"prefix-cache hit block {b} holds {got}, the request needs {want}"
        if hit:
            event("prefix-cache hit")
        n = round(frac * seq.num_uncomputed_tokens)
        if not self.allocate(seq, n, reserve=True):
            kv.free(seq)
            seq.num_computed_tokens = 0
            assert seq.block_table == [] and kv.pool.ref_counts == refs, "a failed admission kept blocks"
            return False
        seq.status = RUNNING
        self.write(seq, n)
        if seq.num_computed_tokens == seq.num_tokens:
            self.sampled(seq, forks, list(toks))
        return True

    @precondition(lambda self: self.with_status(WAITING))
    @rule(i=st.integers(0, MAX_SEQS), frac=st.sampled_from([0.0, 0.3, 1.0, 1.0]), forks=st.sampled_from([0, 1, 2]),
          toks=st.lists(TOKENS, min_size=3, max_size=3))
    def admit(self, i, frac, forks, toks):
        self.admit_seq(pick(self.with_status(WAITING), i), frac, forks, toks)

    @precondition(lambda self: self.with_status(RUNNING))
    @rule(i=st.integers(0, MAX_SEQS), frac=st.sampled_from([0.0, 0.5, 1.0, 1.0]), forks=st.sampled_from([0, 0, 1, 2]),
          toks=st.lists(TOKENS, min_size=3, max_size=3))
    def compute_chunk(self, i, frac, forks, toks):
        seq = pick(self.with_status(RUNNING), i)
        n = max(1, round(frac * seq.num_uncomputed_tokens))
        self.compute(seq, n, forks, toks)

    @precondition(lambda self: self.with_status(RUNNING) and len(self.seqs) < MAX_SEQS)
    @rule(i=st.integers(0, MAX_SEQS))
    def fork_running(self, i):
        """A fork at any point (mid-prefill too): both go on computing the same tokens; the first to write into
        the shared tail copies it."""
        self.fork(pick(self.with_status(RUNNING), i))

    def recompute(self, seq: Sequence) -> None:
        """Preemption by recompute (Scheduler._preempt): blocks freed, progress dropped, back to waiting."""
        self.finish_seq(seq)  # the same reference bookkeeping checks ...
        self.seqs.append(seq)  # ... but the sequence lives on
        seq.status = WAITING
        seq.num_computed_tokens = 0

    def swap_out(self, seq: Sequence) -> bool:
        """Preemption by swap (Scheduler._preempt), when host space allows."""
        kv = self.kv
        can = kv.can_swap_out(seq)
        assert can == (kv.host_pool is not None and len(seq.block_table) <= kv.host_pool.num_free)
        if not can:
            return False
        dev_table, refs = list(seq.block_table), list(kv.pool.ref_counts)
        host_free = set(kv.host_pool.free_queue)
        kv.swap_out(seq)
        seq.status = SWAPPED
        event("swap out")
        outs, ins = kv.take_swaps()
        assert ins == [] and outs == list(zip(dev_table, seq.block_table))
        assert set(seq.block_table) <= host_free and len(set(seq.block_table)) == len(seq.block_table)
        for d, h in outs:  # device -> host before the next forward
            self.host[h] = list(self.dev[d])
            assert kv.pool.ref_counts[d] == refs[d] - 1
            assert kv.host_pool.ref_counts[h] == 1
        return True

    def swap_in_seq(self, seq: Sequence, reserve: int) -> bool:
        kv = self.kv
        host_table, free_before = list(seq.block_table), set(kv.pool.free_queue)
        expect = len(host_table) + reserve <= kv.pool.num_free
        before = self.snapshot()
        ok = kv.swap_in(seq, reserve)
        assert ok == expect
        if not ok:
            assert self.snapshot() == before, "a failed swap_in changed something"
            return False
        seq.status = RUNNING
        event("swap in")
        outs, ins = kv.take_swaps()
        assert outs == [] and ins == list(zip(host_table, seq.block_table))
        for h, d in ins:  # host -> device before the next forward
            assert d in free_before and kv.pool.ref_counts[d] == 1 and kv.pool.block_hash[d] is None
            self.dev[d] = list(self.host[h])
        return True

    @precondition(lambda self: self.with_status(RUNNING))
    @rule(i=st.integers(0, MAX_SEQS))
    def preempt_recompute(self, i):
        self.recompute(pick(self.with_status(RUNNING), i))

    @precondition(lambda self: self.kv is not None and self.kv.host_pool is not None and self.with_status(RUNNING))
    @rule(i=st.integers(0, MAX_SEQS))
    def preempt_swap(self, i):
        self.swap_out(pick(self.with_status(RUNNING), i))

    @precondition(lambda self: self.with_status(SWAPPED))
    @rule(i=st.integers(0, MAX_SEQS), reserve=st.integers(0, 2))
    def swap_in(self, i, reserve):
        self.swap_in_seq(pick(self.with_status(SWAPPED), i), reserve)

    @precondition(lambda self: self.with_status(RUNNING) or self.with_status(SWAPPED))
    @rule(toks=st.lists(TOKENS, min_size=3, max_size=3), forks=st.sampled_from([0, 1]),
          swap=st.booleans(), rounds=st.integers(1, 4))
    def schedule_steps(self, toks, forks, swap, rounds):
        """Scheduler-like steps: running sequences, in rank order, compute the rest of their tokens (a decode: one);
        when slots run out the lowest-ranked running sequence is preempted (swapped out if `swap` and host space
        allow, else recomputed), possibly the one asking; swapped ones come back after a step without preemption."""
        for _ in range(rounds):
            queue = sorted(self.with_status(RUNNING), key=lambda s: s.seq_id)
            preempted = False
            while queue:
                seq = queue.pop(0)
                while not self.compute(seq, seq.num_uncomputed_tokens, forks, toks):
                    victim = queue.pop() if queue else seq
                    if not (swap and self.swap_out(victim)):
                        self.recompute(victim)
                    preempted = True
                    if victim is seq:
                        break
            if not preempted:
                for seq in sorted(self.with_status(SWAPPED), key=lambda s: s.seq_id):
                    if not self.swap_in_seq(seq, 1):
                        break

    @precondition(lambda self: self.with_status(RUNNING) and len(self.seqs) < MAX_SEQS)
    @rule(i=st.integers(0, MAX_SEQS), who=st.sampled_from(["parent", "child", "both"]),
          frac=st.sampled_from([0.0, 1.0]), toks=st.lists(TOKENS, min_size=3, max_size=3))
    def fork_then_compute(self, i, who, frac, toks):
        """Fork, then the parent and/or the child compute their next chunk: the first writer into a shared partly
        filled tail must copy it."""
        parent = pick(self.with_status(RUNNING), i)
        child = self.fork(parent)
        for seq in {"parent": [parent], "child": [child], "both": [child, parent]}[who]:
            if seq.status == RUNNING:
                self.compute(seq, max(1, round(frac * seq.num_uncomputed_tokens)), 0, toks)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_SEQS))
    def finish(self, i):
        self.finish_seq(pick(self.seqs, i))

    @precondition(lambda self: self.with_status(RUNNING))
    @rule(toks=st.lists(TOKENS, min_size=3, max_size=3), forks=st.sampled_from([0, 1]))
    def compute_until_full(self, toks, forks):
        """Memory pressure: every running sequence computes whole chunks, round robin, until an allocation fails."""
        for _ in range(4 * MAX_LEN):
            running = self.with_status(RUNNING)
            if not running:
                return
            for seq in running:
                if seq.status == RUNNING and not self.compute(seq, seq.num_uncomputed_tokens, forks, toks):
                    return

    @precondition(lambda self: self.kv is not None)
    @rule(prefixes=st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=MAX_SEQS),
          salt=st.sampled_from(SALTS), tail=TOKENS)
    def admit_until_full(self, prefixes, salt, tail):
        """Memory pressure at admission: new requests sharing prefixes arrive and are admitted whole until one
        does not fit (its prefix-cache hits are given back)."""
        for p in prefixes:
            if len(self.seqs) >= MAX_SEQS:
                return
            if not self.admit_seq(self.new_seq(list(p) + [tail], salt), 1.0):
                return

    @precondition(lambda self: self.kv is not None)
    @rule()
    def reset_prefix_cache(self):
        self.kv.pool.reset_prefix_cache()
        for b in self.kv.pool.free_queue:
            assert self.kv.pool.block_hash[b] is None

    @precondition(lambda self: self.kv is not None)
    @rule()
    def finish_all(self):
        for seq in list(self.seqs):
            self.finish_seq(seq)
        self.check_empty()

    def check_empty(self) -> None:
        kv = self.kv
        assert not self.seqs
        assert all(r == 0 for r in kv.pool.ref_counts), "a block is still referenced with every sequence gone"
        assert kv.pool.num_free == kv.pool.num_blocks and kv.pool.num_in_use == 0
        if kv.host_pool is not None:
            assert kv.host_pool.num_in_use == 0 and all(r == 0 for r in kv.host_pool.ref_counts)

    # ---- invariants ----------------------------------------------------------------------------------------------
    @invariant()
    def ref_counts_match_tables(self):
        pool = self.kv.pool
        holders = self.holders()
        for s in self.with_status(RUNNING):
            assert len(s.block_table) == len(set(s.block_table)), f"a block twice in one table {s.block_table}"
        for b, r in enumerate(pool.ref_counts):
            assert r >= 0, f"block {b} has ref count {r}"
            assert r == holders[b], f"block {b}: ref count {r}, held by {holders[b]} live tables"
        assert pool.num_in_use == len(holders)

    @invariant()
    def free_queue_is_the_unreferenced_blocks(self):
        pool = self.kv.pool
        free = list(pool.free_queue)
        assert len(free) == len(set(free))
        assert set(free) == {b for b, r in enumerate(pool.ref_counts) if r == 0}

    @invariant()
    def sequences_consistent(self):
        bs = self.bs
        for s in self.seqs:
            if s.status == WAITING:
                assert s.block_table == [] and s.num_computed_tokens == 0
                continue
            assert s.status in (RUNNING, SWAPPED), s.status
            assert len(s.block_table) == cdiv(s.num_computed_tokens, bs)
            assert s.num_computed_tokens < s.num_tokens <= MAX_LEN
            if s.status == RUNNING:
                assert s.num_cached_blocks <= s.num_computed_tokens // bs

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        bs = self.bs
        for s in self.seqs:
            if s.status == WAITING:
                continue
            content = self.dev if s.status == RUNNING else self.host
            for p in range(s.num_computed_tokens):
                b = s.block_table[p // bs]
                got = content[b][p % bs]
                assert got == slot(s, p), \
                    f"{s.status.value} seq {s.seq_id} position {p} (block {b}) holds {got}, wants {slot(s, p)}"

    @invariant()
    def prefix_cache_consistent(self):
        pool, bs = self.kv.pool, self.bs
        for h, b in pool.cached.items():
            assert pool.block_hash[b] == h, f"cached[{h.hex()[:8]}] = {b} whose hash is another"
        for b in range(pool.num_blocks):
            h = pool.block_hash[b]
            if h is None:
                assert pool.block_tokens[b] is None
                continue
            assert pool.cached.get(h) == b
            slots = self.dev[b]
            assert all(x is not None for x in slots), f"block {b} has a hash but is not full: {slots}"
            salt, prefix = slots[-1]
            assert len(prefix) % bs == 0
            want = [(salt, prefix[:len(prefix) - bs + 1 + j]) for j in range(bs)]
            assert slots == want, f"block {b} holds slots of different sequences: {slots}"
            assert pool.block_tokens[b] == prefix[-bs:], \
                f"block {b} recorded as {pool.block_tokens[b]} but holds {prefix[-bs:]}"
            parent = None
            for k in range(len(prefix) // bs):
                parent = hash_block(parent, prefix[k * bs:(k + 1) * bs], salt)
            assert parent == h, f"block {b}'s hash is not the one of the (salted) prefix it holds"

    @invariant()
    def sharing_is_positional(self):
        """A block shared by several tables (prefix-cache hits, forks) sits at the same position in each: it holds
        the same positions' K/V for all of them. A cached block is full and computed by every holder; an uncached
        shared block is a full block or the partly filled tail of forked sequences (the copy-on-write candidate)."""
        pool, bs = self.kv.pool, self.bs
        where: dict[int, set[int]] = {}
        for s in self.with_status(RUNNING):
            for i, b in enumerate(s.block_table):
                where.setdefault(b, set()).add(i)
                if pool.block_hash[b] is not None:
                    assert (i + 1) * bs <= s.num_computed_tokens, f"cached block {b} not computed by its holder"
                else:
                    assert (i + 1) * bs <= s.num_computed_tokens or i == len(s.block_table) - 1
        for b, idx in where.items():
            assert len(idx) == 1, f"block {b} shared at different positions {sorted(idx)}"

    @invariant()
    def host_pool_accounting(self):
        host = self.kv.host_pool
        swapped = self.with_status(SWAPPED)
        if host is None:
            assert not swapped
            return
        held: Counter[int] = Counter()
        for s in swapped:
            held.update(s.block_table)
        for h, r in enumerate(host.ref_counts):
            assert r == held[h] and r <= 1, f"host block {h}: ref count {r}, held by {held[h]}"
        assert set(host.free_queue) == {h for h, r in enumerate(host.ref_counts) if r == 0}
        assert host.num_in_use == sum(len(s.block_table) for s in swapped)
        assert not host.cached and all(x is None for x in host.block_hash)

    @invariant()
    def nothing_pending(self):
        kv = self.kv
        assert kv.pending_copies == [] and kv.pending_swap_out == [] and kv.pending_swap_in == []

    def teardown(self):
        if self.kv is None or sys.exc_info()[0] is not None:
            return  # a failure is being reported: leave it alone
        for seq in list(self.seqs):
            self.finish_seq(seq)
        self.check_empty()


KVSharingMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=50, deadline=None,
                                              database=None, suppress_health_check=[HealthCheck.too_slow])
TestKVSharing = KVSharingMachine.TestCase


def test_contiguous_fork_copies_on_write():
    """Beam search forks beams in the contiguous layout too: they share the whole reservation, so each shared block
    a step writes is copied first (the computed part) or just replaced (a reserved block nobody wrote yet)."""
    kv = KVCacheManager(7, 4, layout="contiguous", enable_prefix_caching=False)
    parent = Sequence("b", 0, [1, 2, 3, 4, 5, 6], 6, PARAMS, 6)
    assert kv.allocate_slots(parent, 6, reserve=True)
    assert parent.block_table == [0, 1, 2] and kv.take_copies() == []
    parent.num_computed_tokens = 6
    child = Sequence("b", 1, [], 6, PARAMS, 6, status=SequenceStatus.FORK_PENDING)
    kv.fork(parent, child)
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert kv.allocate_slots(parent, 1)  # position 6: block 1 holds positions 4, 5 of both
    (src, dst), = kv.take_copies()
    assert src == 1 and parent.block_table == [0, dst, 2] and child.block_table == [0, 1, 2]
    assert kv.pool.ref_counts[dst] == kv.pool.ref_counts[1] == 1 and kv.pool.ref_counts[2] == 2
    assert kv.allocate_slots(child, 1) and kv.take_copies() == []  # block 1 is the child's alone now
    parent.num_computed_tokens = child.num_computed_tokens = 7
    parent.token_ids.append(9)
    child.token_ids.append(9)
    assert kv.allocate_slots(parent, 2)  # positions 7, 8: block 2, reserved and still shared, written from 8
    assert kv.take_copies() == [] and parent.block_table[2] != 2 and kv.pool.ref_counts[2] == 1
    assert kv.pool.num_free == 7 - 5
    for s in (parent, child):
        kv.free(s)
    assert kv.pool.num_free == 7


def test_contiguous_fork_copy_on_write_needs_a_free_block():
    kv = KVCacheManager(4, 2, layout="contiguous", enable_prefix_caching=False)
    parent = Sequence("b", 0, [1, 2, 3], 3, PARAMS, 5)
    assert kv.allocate_slots(parent, 3, reserve=True) and parent.block_table == [0, 1, 2, 3]
    parent.num_computed_tokens = 3
    child = Sequence("b", 1, [], 3, PARAMS, 5, status=SequenceStatus.FORK_PENDING)
    kv.fork(parent, child)
    parent.token_ids.append(4)
    refs, table = list(kv.pool.ref_counts), list(parent.block_table)
    assert not kv.allocate_slots(parent, 1)  # no free block for the copy: nothing changes, the caller preempts
    assert kv.pool.ref_counts == refs and parent.block_table == table and kv.take_copies() == []
    kv.free(child)
    assert kv.allocate_slots(parent, 1) and kv.take_copies() == []  # not shared any more: written in place
