"""The pool of physical KV blocks: reference counts, an LRU free queue, and the prefix cache's hash → block map.

A full block computed by some sequence is registered under a hash of its contents (see kv_cache_manager). When
its last reference goes, it joins the free queue but keeps its hash, so a later request with the same prefix can
take it back; it loses the hash only when the pool hands it out for other content (least recently freed first).
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.peak_in_use = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise RuntimeError(f"out of KV blocks: asked for {n}, {len(self.free_queue)} free")
        blocks = [self.free_queue.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            assert self.ref_counts[b] == 0, f"block {b} in the free queue is still referenced"
            self._evict(b)
            self.ref_counts[b] = 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)
        return blocks

    def allocate_contiguous(self, n: int) -> list[int] | None:
        """First fit: the lowest run of n consecutive free blocks, or None when fragmentation or use leaves none."""
        run = 0
        for b, refs in enumerate(self.ref_counts):
            run = run + 1 if refs == 0 else 0
            if run == n:
                blocks = list(range(b - n + 1, b + 1))
                for x in blocks:
                    del self.free_queue[x]
                    self._evict(x)
                    self.ref_counts[x] = 1
                self.peak_in_use = max(self.peak_in_use, self.num_in_use)
                return blocks
        return None

    def incref(self, block: int) -> None:
        """Take another reference; a cached block with none leaves the free queue."""
        if self.ref_counts[block] == 0:
            assert self.block_hash[block] is not None, f"block {block} is free and holds nothing reusable"
            assert block in self.free_queue
            del self.free_queue[block]
        self.ref_counts[block] += 1
        self.peak_in_use = max(self.peak_in_use, self.num_in_use)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go to the back of the free queue."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None

    # ---- prefix cache ------------------------------------------------------------------------------------------
    def lookup(self, block_hash: bytes, tokens: tuple[int, ...]) -> int | None:
        """The block holding exactly these tokens under this hash, if any. Comparing the tokens too means even a
        hash collision cannot hand out the wrong contents."""
        b = self.cached.get(block_hash)
        if b is None or self.block_tokens[b] != tokens:
            return None
        return b

    def register(self, block: int, block_hash: bytes, tokens: tuple[int, ...]) -> None:
        """Record that a full, referenced block holds `tokens` under `block_hash` (first writer wins)."""
        assert self.ref_counts[block] > 0
        if self.block_hash[block] is not None or block_hash in self.cached:
            return
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        self.block_tokens[block] = tokens

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
            self.block_tokens[block] = None

    def reset_prefix_cache(self) -> None:
        for b in list(self.free_queue):
            self._evict(b)
