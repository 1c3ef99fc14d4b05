"""Owns the model and its KV cache; turns a scheduled step into one forward over a flattened batch."""
from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import torch

from conveyor.config import DEFAULT_CPU_KV_CACHE_BYTES, CacheConfig, SchedulerConfig
from conveyor.engine.kv_cache_manager import cdiv
from conveyor.engine.logprobs import token_logprobs
from conveyor.engine.scheduler import ScheduledSeq
from conveyor.engine.sequence import Sequence
from conveyor.model.attention import (GatherBuffers, build_metadata, copy_blocks, kv_cache_shape, move_blocks,
                                      prompt_metadata, resolve_backend)
from conveyor.model.cuda_graphs import DecodeGraphs, capture_sizes
from conveyor.model.llama import ArchConfig
from conveyor.model.loader import LoadedModel

log = logging.getLogger("conveyor.runner")


@dataclass
class Chunk:
    """Tokens of one sequence that a forward computes: token_ids at positions start, start + 1, ..., their K/V
    written at the slots of its block table (seq's, or a copy given here: asynchronous scheduling changes seq's
    while the forward runs); logits wanted for the last num_logits of them."""
    seq: Sequence
    start: int
    token_ids: list[int]
    num_logits: int
    block_table: list[int] | None = None

    def __post_init__(self) -> None:
        assert self.token_ids and 0 <= self.num_logits <= len(self.token_ids)

    @property
    def table(self) -> list[int]:
        return self.seq.block_table if self.block_table is None else self.block_table

    @property
    def is_decode(self) -> bool:
        """Attended as decode rows, one query each: a decode, or a decode followed by speculative proposals."""
        return len(self.token_ids) == 1 or self.num_logits == len(self.token_ids)


def kv_bytes_per_block(arch: ArchConfig, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one KV block over all layers (K and V) for a model of this architecture and dtype."""
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * dtype.itemsize


def chunk_of(s: ScheduledSeq, copy_table: bool = False) -> Chunk:
    """The target model's chunk for a scheduled sequence: its next tokens, then this step's proposals. copy_table:
    the chunk keeps a copy of the block table as it is now."""
    seq, start = s.seq, s.seq.num_computed_tokens
    ids = seq.token_ids[start:start + s.num_tokens] + s.spec_token_ids
    return Chunk(seq, start, ids, (1 + len(s.spec_token_ids)) if s.samples else 0,
                 list(seq.block_table) if copy_table else None)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU it is backed by an anonymous mmap: the kernel hands out zero pages on first touch,
    so a large KV budget costs no time at start and memory only as blocks are used (torch.zeros writes it all)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps buf alive


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache: CacheConfig, sched: SchedulerConfig, device: str,
                 num_blocks: int | None = None, extra_bytes_per_block: int = 0,
                 num_host_blocks: int | None = None, attention_backend: str = "auto",
                 cuda_graphs: str = "off") -> None:
        """num_blocks, num_host_blocks: exactly this many device and host (swap) KV blocks (a draft model's caches
        mirror the target's); else from the budgets, which also hold extra_bytes_per_block per block (the draft's
        share when this is the target). attention_backend: see attention.resolve_backend (ValueError if it
        cannot run here). cuda_graphs: "auto" captures decode batches in CUDA graphs where they can run (CUDA, the
        Triton backend), else none; "off"; "padded" runs decodes through the graphs' static buffers eagerly (tests
        on CPU); see conveyor.model.cuda_graphs."""
        self.model = loaded.model
        self.arch = loaded.arch
        self.dtype = loaded.dtype
        self.device = torch.device(device)
        self.block_size = cache.block_size
        self.sliding_window = loaded.arch.sliding_window
        self.attention_backend = resolve_backend(attention_backend, self.device)
        self.num_blocks = num_blocks or self._num_blocks(cache, sched, extra_bytes_per_block)
        a = self.arch
        graphs = cuda_graphs
        if graphs == "auto":
            graphs = "capture" if self.device.type == "cuda" and self.attention_backend == "triton" else "off"
        if graphs not in ("off", "capture", "padded"):
            raise ValueError(f"cuda_graphs must be auto, off, capture or padded, got {cuda_graphs!r}")
        if graphs == "capture" and (self.device.type != "cuda" or self.attention_backend != "triton"):
            raise ValueError("CUDA graphs need a CUDA device and the triton attention backend")
        if graphs == "padded" and self.attention_backend == "torch":
            raise ValueError("the torch attention backend cannot run decode graphs (its plan syncs with the host)")
        # decode graphs' padding rows write to one more block, which the block pool never hands out
        shape = kv_cache_shape(self.num_blocks + (graphs != "off"), self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_caches = [_zeros(shape, self.dtype, self.device) for _ in range(a.num_layers)]
        # host memory for swapped-out blocks (swap preemption)
        self.num_host_blocks = num_host_blocks if num_host_blocks is not None else \
            int(cache.swap_space * 2**30) // (self.bytes_per_block + extra_bytes_per_block)
        host_shape = kv_cache_shape(self.num_host_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        pin = self.device.type == "cuda"
        self.host_caches = [torch.zeros(host_shape, dtype=self.dtype, pin_memory=pin) for _ in range(a.num_layers)] \
            if self.num_host_blocks else []
        self.gather_buffers = GatherBuffers()
        # the last execute's hidden states and, per sequence, (first row, first position, length) of its chunk; kept
        # only when a scheduled sequence wants prompt logprobs (see prompt_logprobs)
        self._hidden: torch.Tensor | None = None
        self._chunks: dict[int, tuple[int, int, int]] = {}
        log.info("attention backend: %s", self.attention_backend)
        self.graphs = None if graphs == "off" else DecodeGraphs(
            self.model, self.kv_caches, capture_sizes(sched.max_num_seqs), cdiv(sched.max_model_len, self.block_size),
            self.block_size, self.num_blocks, self.sliding_window, self.attention_backend, self.device, graphs)
        log.info("KV cache: %d blocks of %d tokens = %d token slots (%.1f MiB)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.num_blocks * self.bytes_per_block / 2**20)

    @property
    def bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.arch, self.dtype, self.block_size)

    def _num_blocks(self, cache: CacheConfig, sched: SchedulerConfig, extra_bytes_per_block: int) -> int:
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget(cache, sched)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        n = budget // (self.bytes_per_block + extra_bytes_per_block)
        # more blocks than max_num_seqs full-length sequences can never be used
        n = min(n, sched.max_num_seqs * cdiv(sched.max_model_len, self.block_size))
        if n < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {self.bytes_per_block} bytes")
        return n

    @torch.inference_mode()
    def _cuda_kv_budget(self, cache: CacheConfig, sched: SchedulerConfig) -> int:
        """gpu_memory_utilization * total memory, less the weights and the peak of a full-budget prefill."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(sched.max_num_batched_tokens, sched.max_model_len)
        a = self.arch
        nb = cdiv(n, self.block_size)
        tmp = [torch.empty(kv_cache_shape(nb, self.block_size, a.num_kv_heads, a.head_dim), dtype=self.dtype,
                           device=self.device) for _ in range(a.num_layers)]
        meta = prompt_metadata(n, self.block_size, self.sliding_window, self.attention_backend, self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        h = self.model(ids, torch.arange(n, device=self.device), tmp, meta)
        self.model.compute_logits(h[-min(n, sched.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - sum(t.numel() * t.element_size() for t in tmp)
        del tmp, h
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        return int(total * cache.gpu_memory_utilization) - peak

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Apply the step's copy-on-write block copies in every layer before the forward writes anything."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for kv in self.kv_caches:
            copy_blocks(kv, src, dst)

    @torch.inference_mode()
    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Device -> host copies of swapped-out blocks, then host -> device copies of swapped-in ones."""
        for pairs, to_host in ((swap_out, True), (swap_in, False)):
            if not pairs:
                continue
            src = torch.tensor([p[0] for p in pairs])
            dst = torch.tensor([p[1] for p in pairs])
            for dev, host in zip(self.kv_caches, self.host_caches):
                move_blocks(dev, host, src, dst) if to_host else move_blocks(host, dev, src, dst)

    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step. Returns float32 logits [rows, vocab]: for each entry of `scheduled` whose chunk reaches the
        end of its sequence, in order, one row, or 1 + k rows when it verifies k speculative proposals."""
        return self.forward([chunk_of(s) for s in scheduled])

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """One forward over chunks (at most one per sequence). Returns float32 logits [sum of num_logits, vocab],
        chunk by chunk in order."""
        if self._graphable(chunks):
            self._hidden, self._chunks = None, {}
            hidden = self.graphs.run([c.token_ids[0] for c in chunks], [c.start for c in chunks],
                                     [c.table for c in chunks])
            return self.model.compute_logits(hidden).float()
        decodes = [c for c in chunks if c.is_decode]
        prefills = [c for c in chunks if not c.is_decode]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: dict[int, list[int]] = {}  # seq_id -> its rows in the flattened batch
        bs = self.block_size
        for c in decodes + prefills:
            table = c.table
            logit_rows[c.seq.seq_id] = list(range(len(ids) + len(c.token_ids) - c.num_logits, len(ids) + len(c.token_ids)))
            ids.extend(c.token_ids)
            for pos in range(c.start, c.start + len(c.token_ids)):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
        dev = self.device
        meta = build_metadata([c.table for c in decodes + prefills],
                              [len(c.token_ids) for c in decodes + prefills],
                              [c.start + len(c.token_ids) for c in decodes + prefills], slots, len(decodes), bs,
                              self.sliding_window, self.attention_backend, dev, self.gather_buffers)
        self._hidden, self._chunks = None, {}
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)
        if any(c.seq.params.prompt_logprobs is not None for c in chunks):
            self._hidden, row = hidden, 0
            for c in decodes + prefills:
                self._chunks[c.seq.seq_id] = (row, c.start, len(c.token_ids))
                row += len(c.token_ids)
        rows = [r for c in chunks for r in logit_rows[c.seq.seq_id]]
        if not rows:
            return torch.empty(0, self.arch.vocab_size, device=dev)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=dev)]).float()

    def _graphable(self, chunks: list[Chunk]) -> bool:
        """A plain decode batch the decode graphs take: one token and its logits per sequence, no prompt logprobs
        wanted, every block table within the graphs' width."""
        if self.graphs is None or not self.graphs.fits(len(chunks), max((len(c.table) for c in chunks), default=0)):
            return False
        return all(len(c.token_ids) == 1 and c.num_logits == 1 and c.seq.params.prompt_logprobs is None
                   for c in chunks)

    @torch.inference_mode()
    def prompt_logprobs(self, seq: Sequence, start: int, end: int, top_k: int,
                        rows_per_block: int = 128) -> list[dict[int, float]]:
        """Logprobs of seq's tokens start + 1 .. end (each given the tokens before it) from the hidden states of
        positions start .. end - 1, which the last execute() must have computed (seq's chunk covered them and it
        wanted prompt logprobs). Returns per token {token: logprob, top_k alternatives...} (raw distribution).
        The logits are made rows_per_block positions at a time: a whole chunk's [tokens, vocab] would be large."""
        assert self._hidden is not None and seq.seq_id in self._chunks, "no hidden states for this sequence"
        row0, pos0, n = self._chunks[seq.seq_id]
        assert pos0 <= start < end <= pos0 + n and end < seq.num_tokens
        result: list[dict[int, float]] = []
        for lo in range(start, end, rows_per_block):
            hi = min(end, lo + rows_per_block)
            logits = self.model.compute_logits(self._hidden[row0 + lo - pos0:row0 + hi - pos0])
            result += token_logprobs(logits, seq.token_ids[lo + 1:hi + 1], [top_k] * (hi - lo))
        return result
