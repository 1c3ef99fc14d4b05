"""Decode forwards replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is dominated by kernel launches: a 16-layer model launches a few hundred kernels
whose GPU time is microseconds each, so the CPU, not the GPU, sets the pace. Capturing the whole forward once per
batch size and replaying it costs one launch (the approach of vLLM's CUDA graph runner and of gpt-fast's
`torch.compile(mode="reduce-overhead")`; written here for Conveyor's runner).

A graph replays fixed kernels on fixed addresses, so every input lives in a static buffer sized for the largest
bucket, and a batch of b decodes runs as the smallest bucket >= b: its b rows, then padding rows. A padding row is a
one-token sequence at position 0 whose K/V go to the pad block, a block the KV cache has beyond the ones the block
pool hands out; it attends one key, and its output is dropped. Real rows' block-table entries past their own keys
are never read, so stale entries left there by earlier steps are harmless and only the columns a step needs are
copied.

Attention must not sync with the host or size its launch from tensor values: the Triton backend qualifies (its
grid depends only on the token and sequence counts), the torch backend does not. On CPU nothing is captured; the
"padded" mode runs the same static buffers and padding eagerly, which is how CI tests everything but the capture.
"""
from __future__ import annotations

import logging
import time

import torch

from conveyor.model.attention import AttentionMetadata

log = logging.getLogger("conveyor.cuda_graphs")
MODES = ("off", "capture", "padded")
MAX_CAPTURE_SIZE = 512  # vLLM's default largest captured batch


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets: 1, 2, 4, then multiples of 8 (vLLM's), up to the first one that holds
    min(max_num_seqs, MAX_CAPTURE_SIZE) sequences."""
    assert max_num_seqs >= 1
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = []
    for size in [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 1, 8)]:
        sizes.append(size)
        if size >= top:
            break
    return sizes


class DecodeGraphs:
    """Runs decode batches (one new token per sequence) through static input buffers, as graphs when captured.

    model: the LlamaForCausalLM; kv_caches: the runner's per-layer caches, whose block pad_block belongs to no
    sequence; max_blocks: the most blocks a sequence's table can have (max_model_len / block_size, rounded up).
    mode "capture" records one CUDA graph per bucket now (CUDA and a sync-free backend only); "padded" runs the
    same buffers eagerly (any device; for tests)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 block_size: int, pad_block: int, sliding_window: int | None, backend: str, device: torch.device,
                 mode: str) -> None:
        assert mode in MODES[1:], mode
        assert backend in ("triton", "cpp"), f"attention backend {backend} cannot run in a CUDA graph"
        assert mode != "capture" or device.type == "cuda", "CUDA graphs need a CUDA device"
        assert sizes == sorted(set(sizes)) and sizes[0] >= 1
        assert all(pad_block < kv.shape[2] for kv in kv_caches)
        self.model, self.kv_caches, self.sizes = model, kv_caches, sizes
        self.block_size, self.pad_block, self.max_blocks = block_size, pad_block, max_blocks
        self.sliding_window, self.backend, self.mode = sliding_window, backend, mode
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), pad_block * block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks), pad_block, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query per row, always
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # the hidden states each graph writes [size, hidden]
        if mode == "capture":
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int:
        """The smallest captured size holding batch rows (ValueError past the largest)."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"a decode batch of {batch} exceeds the largest bucket ({self.sizes[-1]})")

    def fits(self, batch: int, widest_table: int) -> bool:
        """Whether a decode batch of this many sequences, the longest with widest_table blocks, can run here."""
        return 1 <= batch <= self.sizes[-1] and widest_table <= self.max_blocks

    def _metadata(self, size: int) -> AttentionMetadata:
        # the lists are placeholders: only the torch backend reads them, and it never runs here
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            query_start=self.query_start[:size + 1], seq_lens=self.seq_lens[:size],
            tables=[[self.pad_block]] * size, q_lens=[1] * size, lens=[1] * size,
            sliding_window=self.sliding_window, backend=self.backend, num_decode_seqs=size)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._metadata(size))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest bucket first, all in one memory pool: the smaller graphs reuse the largest one's memory."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs: captured %d decode batch sizes (1..%d) in %.1f s", len(self.sizes), self.sizes[-1],
                 time.perf_counter() - start)

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode forward: sequence i's token token_ids[i] at position positions[i], its K/V written there
        through block_tables[i] (which covers the position). Returns the final hidden states [batch, hidden],
        valid until the next run (a replayed graph writes to the same memory)."""
        b = len(token_ids)
        width = max(len(t) for t in block_tables)
        assert b == len(positions) == len(block_tables) and self.fits(b, width)
        size = self.bucket(b)
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        host = torch.tensor([token_ids, positions, slots], dtype=torch.long)
        tables = torch.tensor([t + [self.pad_block] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        self.input_ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.slot_mapping[:b].copy_(host[2], non_blocking=True)
        self.seq_lens[:b].copy_(host[1] + 1, non_blocking=True)
        self.block_tables[:b, :width].copy_(tables, non_blocking=True)
        if size > b:  # padding rows: token 0 at position 0, written to the pad block (a larger step left others
            # there); the one key each attends is read through whatever block id its table row holds: a valid one
            self.input_ids[b:size] = 0
            self.positions[b:size] = 0
            self.slot_mapping[b:size] = self.pad_block * bs
            self.seq_lens[b:size] = 1
        if self.mode == "padded":
            return self._forward(size)[:b]
        self.graphs[size].replay()
        return self.outputs[size][:b]
