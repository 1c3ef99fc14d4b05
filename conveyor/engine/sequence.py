"""A sequence is one stream of tokens the engine computes: prompt + generated output, its block table and how far
its KV cache is filled. A request with n samples owns n sequences."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from conveyor.sampling_params import SamplingParams

if TYPE_CHECKING:
    from conveyor.engine.spec_decode import SpecState
    from conveyor.engine.structured_output import GrammarState

_seq_counter = itertools.count()


# the token a step in flight is still sampling (asynchronous scheduling): an id no vocabulary has
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: its blocks are in host memory, its progress kept
    FORK_PENDING = "fork_pending"  # a sample of n > 1 waiting for its parent's prefill, whose blocks it will share
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # sample index within its request
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # resolved: never None
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # seeded sequences: reseeded per position (Sampler.row_generator)
    seed: int | None = None  # this sample's own seed (from SamplingParams.seed and its index)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    cache_salt: str | None = None  # keeps this request's cached prefix blocks apart from other tenants'
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of full blocks, in order
    num_cached_blocks: int = 0  # leading blocks of the block table registered in the prefix cache
    forks: list[Sequence] = field(default_factory=list)  # samples to fork from this one when its prefill ends
    num_reserved_slots: int = 0  # running slots held for sequences this one will fork (beam search)
    grammar: GrammarState | None = None  # structured outputs: the grammar's state after this sequence's output
    # speculative decoding: the state of its proposer, the proposals for the next step (not yet in token_ids), and
    # how many leading tokens have their K/V in the draft model's cache (blocks shared with the target's)
    spec: SpecState | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_computed: int = 0
    # incremental detokenization state
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.read_offset = self.num_prompt_tokens
        self.prefix_offset = max(0, self.num_prompt_tokens - 6)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
