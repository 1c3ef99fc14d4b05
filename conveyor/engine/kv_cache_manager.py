"""Gives sequences the blocks their tokens need and takes them back."""
from __future__ import annotations

from conveyor.engine.block_pool import BlockPool
from conveyor.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.num_in_use / self.pool.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next num_new_tokens of seq. False (and nothing changed) if the pool is short."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            seq.block_table.extend(self.pool.allocate(n))
        return True

    def free(self, seq: Sequence) -> None:
        # reversed so the tail blocks, least likely to be shared later, are reused first
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table = []
