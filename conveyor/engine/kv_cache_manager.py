"""Gives sequences the blocks their tokens need and takes them back; automatic prefix caching.

Prefix caching: the i-th full block of a sequence is identified by a chained hash,
sha256(hash of block i-1 ‖ the block's token ids ‖ extra keys), where the extra keys are whatever else changes the
block's K/V or must keep it private (the request's cache_salt). A new sequence reuses the longest run of its full
blocks already in the pool (never its last token, whose logits must be computed) and starts computing after them.

Blocks in flight: while a step is scheduled, the full blocks its chunks will complete are offered (`publish`) to the
sequences admitted after them in the same step, so a burst of requests with one system prompt computes it once. This
is sound because a forward writes all of the step's new K/V into the cache before any attention reads it, and a
sequence with cached tokens attends through its block table. If that forward fails, the sequences that took blocks
in flight are sent back to the waiting queue (Scheduler.requeue_in_step_readers): they may have read keys never
written.
"""
from __future__ import annotations

import hashlib
from array import array

from conveyor.engine.block_pool import BlockPool
from conveyor.engine.sequence import Sequence, SequenceStatus


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: bytes | None, tokens: tuple[int, ...], extra: str | None) -> bytes:
    h = hashlib.sha256(parent or b"\0")
    h.update(array("q", tokens).tobytes())
    if extra is not None:
        h.update(b"\1salt:" + extra.encode())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, layout: str = "paged", enable_prefix_caching: bool = True,
                 watermark: float = 0.0, num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self.host_pool = BlockPool(num_host_blocks) if num_host_blocks else None  # swap space
        self.pending_swap_out: list[tuple[int, int]] = []  # (device block, host block)
        self.pending_swap_in: list[tuple[int, int]] = []  # (host block, device block)
        self.blocks_swapped_out = 0
        self.blocks_swapped_in = 0
        self.enable_prefix_caching = enable_prefix_caching and layout == "paged"
        # admission keeps this many blocks free for the running sequences' growth (bursts)
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) block copies for the next step
        self.num_cow_copies = 0
        self.prefix_cache_hits = 0  # of those, tokens found cached
        # full blocks this step's forward computes: hash -> (block, tokens) while the step admits sequences, and
        # block -> seq_id of the sequence computing it until the next step
        self.in_flight: dict[bytes, tuple[int, tuple[int, ...]]] = {}
        self.in_flight_owner: dict[int, int] = {}
        # sequences admitted this step onto blocks in flight (until the next step is scheduled)
        self.in_step_readers: dict[int, Sequence] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.num_in_use / self.pool.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, reserve: bool = False) -> bool:
        """Make room for the next num_new_tokens of seq. False (and nothing changed) if the pool is short.
        With the contiguous layout, admission (`reserve`) takes one run of blocks for prompt + max_tokens."""
        if self.layout == "contiguous":
            return self._reserve_contiguous(seq, num_new_tokens, reserve)
        shared_tail = self._shared_tail(seq) if num_new_tokens else None
        n = self.blocks_needed(seq, num_new_tokens) + (shared_tail is not None)
        if n > self.pool.num_free - (self.watermark_blocks if reserve else 0):
            return False
        if shared_tail is not None:  # copy-on-write: never write into a block another sequence reads
            i, old = shared_tail
            (new,) = self.pool.allocate(1)
            self.pending_copies.append((old, new))
            self.num_cow_copies += 1
            self.pool.free([old])
            seq.block_table[i] = new
        n = self.blocks_needed(seq, num_new_tokens)
        if n:
            seq.block_table.extend(self.pool.allocate(n))
        return True

    def _shared_tail(self, seq: Sequence) -> tuple[int, int] | None:
        """(index, block) of the partly filled block seq writes next, if other sequences share it."""
        pos = seq.num_computed_tokens
        if pos % self.block_size == 0 or pos // self.block_size >= len(seq.block_table):
            return None
        b = seq.block_table[pos // self.block_size]
        return (pos // self.block_size, b) if self.pool.ref_counts[b] > 1 else None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child becomes a copy of parent that shares all of its blocks (copied on the first divergent write)."""
        assert not child.block_table
        for b in parent.block_table:
            self.pool.incref(b)
        child.block_table = list(parent.block_table)
        child.token_ids = list(parent.token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_draft_computed = parent.num_draft_computed

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _reserve_contiguous(self, seq: Sequence, num_new_tokens: int, reserve: bool) -> bool:
        if seq.block_table:
            assert self.blocks_needed(seq, num_new_tokens) == 0, "a contiguous reservation never grows"
            # beams forked from one reservation share all of it: copy-on-write each shared block this step writes
            bs, pos = self.block_size, seq.num_computed_tokens
            shared = [i for i in range(pos // bs, cdiv(pos + num_new_tokens, bs))
                      if self.pool.ref_counts[seq.block_table[i]] > 1]
            if len(shared) > self.pool.num_free:
                return False
            for i in shared:
                old = seq.block_table[i]
                (new,) = self.pool.allocate(1)
                if i * bs < pos:  # holds computed positions: copy them
                    self.pending_copies.append((old, new))
                    self.num_cow_copies += 1
                self.pool.free([old])
                seq.block_table[i] = new
            return True
        assert reserve, "contiguous blocks are reserved at admission"
        blocks = self.pool.allocate_contiguous(cdiv(seq.num_prompt_tokens + seq.max_tokens, self.block_size))
        if blocks is None:
            return False
        seq.block_table = blocks
        return True

    # ---- prefix cache ------------------------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        """Hashes of seq's first num_full full blocks, computed once and kept on the sequence."""
        bs = self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]), seq.cache_salt))
        return seq.block_hashes[:num_full]

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the cached blocks of its longest cached prefix; returns the tokens
        they cover (its num_computed_tokens from now on). Blocks in flight (being computed by this step) count as
        cached. A request for prompt logprobs reads nothing: every prompt position must be computed (its blocks are
        still cached for others)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        bs = self.block_size
        self.prefix_cache_queries += seq.num_tokens
        hits, in_flight = [], False
        for i, h in enumerate(self._block_hashes(seq, (seq.num_tokens - 1) // bs)):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            b = self.pool.lookup(h, tokens)
            if b is None:
                b, tokens_in_flight = self.in_flight.get(h, (None, None))
                if b is None or tokens_in_flight != tokens:
                    break
                in_flight = True
            hits.append(b)
        for b in hits:
            self.pool.incref(b)
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * bs
        self.prefix_cache_hits += seq.num_computed_tokens
        if in_flight:
            self.in_step_readers[seq.seq_id] = seq
        return seq.num_computed_tokens

    def begin_step(self) -> None:
        """Forget the previous step's blocks in flight and their readers (that step's forward has run)."""
        self.in_flight.clear()
        self.in_flight_owner.clear()
        self.in_step_readers.clear()

    def end_admission(self) -> None:
        """No sequence joins this step any more: nothing may take blocks in flight (who computes them is kept)."""
        self.in_flight.clear()

    def publish(self, seq: Sequence, num_new_tokens: int) -> None:
        """Offer the full blocks that seq will hold once its next num_new_tokens are computed to sequences admitted
        later in this step. A chunk cut short by the token budget offers only the blocks it completes. Blocks
        already cached or in flight under the same hash are left to their first holder."""
        if not self.enable_prefix_caching or num_new_tokens == 0:
            return
        bs = self.block_size
        num_full = (seq.num_computed_tokens + num_new_tokens) // bs
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            h, b = hashes[i], seq.block_table[i]
            if h in self.pool.cached or h in self.in_flight or self.pool.block_hash[b] is not None:
                continue
            self.in_flight[h] = (b, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            self.in_flight_owner[b] = seq.seq_id

    def cache_full_blocks(self, seq: Sequence, upto: int | None = None) -> None:
        """Register the blocks a step has just filled, so later requests can reuse them. upto: only blocks within
        the first upto tokens (default num_computed_tokens; asynchronous scheduling counts tokens as computed while
        their forward still runs)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = (seq.num_computed_tokens if upto is None else upto) // bs
        for i in range(seq.num_cached_blocks, num_full):
            h = self._block_hashes(seq, i + 1)[i]
            self.pool.register(seq.block_table[i], h, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    # ---- swap ----------------------------------------------------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return self.host_pool is not None and len(seq.block_table) <= self.host_pool.num_free

    def swap_out(self, seq: Sequence) -> None:
        """Move seq's blocks to host memory; its device blocks go back to the pool (shared ones stay with the other
        holders). The copies happen before the next forward."""
        host = self.host_pool.allocate(len(seq.block_table))
        self.pending_swap_out += zip(seq.block_table, host)
        self.pool.free(list(reversed(seq.block_table)))
        self.blocks_swapped_out += len(host)
        seq.block_table = host
        seq.num_cached_blocks = 0

    def swap_in(self, seq: Sequence, reserve: int) -> bool:
        """Bring seq's blocks back if that leaves `reserve` blocks free; False (nothing changed) otherwise."""
        n = len(seq.block_table)
        if n + reserve > self.pool.num_free:
            return False
        dev = self.pool.allocate(n)
        self.pending_swap_in += zip(seq.block_table, dev)
        self.host_pool.free(seq.block_table)
        self.blocks_swapped_in += n
        seq.block_table = dev
        return True

    def take_swaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        outs, ins = self.pending_swap_out, self.pending_swap_in
        self.pending_swap_out, self.pending_swap_in = [], []
        return outs, ins

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past seq's last token: slots of speculative proposals that were rejected (or never
        proposed). They hold no computed token, so no other sequence and no prefix-cache entry has them."""
        if self.layout != "paged":
            return
        keep = cdiv(seq.num_tokens, self.block_size)
        extra = seq.block_table[keep:]
        if not extra:
            return
        assert all(self.pool.ref_counts[b] == 1 and self.pool.block_hash[b] is None for b in extra), \
            "a block past the last token is shared or cached"
        del seq.block_table[keep:]
        self.pool.free(list(reversed(extra)))

    def free(self, seq: Sequence) -> None:
        seq.num_draft_computed = 0
        self.in_step_readers.pop(seq.seq_id, None)
        if seq.status == SequenceStatus.SWAPPED:
            self.host_pool.free(seq.block_table)
            seq.block_table = []
            return
        # reversed so the tail blocks, least likely to be shared later, are reused first
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_cached_blocks = 0
