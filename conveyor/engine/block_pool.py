"""The pool of physical KV blocks: a free queue and a reference count per block."""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))
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
        blocks = [self.free_queue.popleft() for _ in range(n)]
        for b in blocks:
            assert self.ref_counts[b] == 0, f"block {b} in the free queue is still referenced"
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
                taken = set(blocks)
                self.free_queue = deque(x for x in self.free_queue if x not in taken)
                for x in blocks:
                    self.ref_counts[x] = 1
                self.peak_in_use = max(self.peak_in_use, self.num_in_use)
                return blocks
        return None

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is free"
        self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody references go back to the free queue."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue.append(b)
