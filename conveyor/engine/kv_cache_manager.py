"""Gives sequences the blocks their tokens need and takes them back."""
from __future__ import annotations

from conveyor.engine.block_pool import BlockPool
from conveyor.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, layout: str = "paged") -> None:
        self.block_size = block_size
        self.layout = layout
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

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, reserve: bool = False) -> bool:
        """Make room for the next num_new_tokens of seq. False (and nothing changed) if the pool is short.
        With the contiguous layout, admission (`reserve`) takes one run of blocks for prompt + max_tokens."""
        if self.layout == "contiguous":
            return self._reserve_contiguous(seq, num_new_tokens, reserve)
        n = self.blocks_needed(seq, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            seq.block_table.extend(self.pool.allocate(n))
        return True

    def _reserve_contiguous(self, seq: Sequence, num_new_tokens: int, reserve: bool) -> bool:
        if seq.block_table:
            assert self.blocks_needed(seq, num_new_tokens) == 0, "a contiguous reservation never grows"
            return True
        assert reserve, "contiguous blocks are reserved at admission"
        blocks = self.pool.allocate_contiguous(cdiv(seq.num_prompt_tokens + seq.max_tokens, self.block_size))
        if blocks is None:
            return False
        seq.block_table = blocks
        return True

    def free(self, seq: Sequence) -> None:
        # reversed so the tail blocks, least likely to be shared later, are reused first
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table = []
