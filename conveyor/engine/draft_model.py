"""The draft model proposer of speculative decoding: a smaller model with the target's tokenizer proposes each
sequence's next k tokens, one batched forward per proposal depth.

Its KV cache has the target's block layout: the same number of blocks, addressed through the target's block
tables, so copy-on-write copies, swaps, prefix-cache sharing and the trimming of rejected slots apply to both caches
alike. A sequence's draft K/V is valid for its first `num_draft_computed` tokens; the draft catches up on the rest
(a new prompt, the token the target added after accepting every proposal) in the first forward of its next proposal,
so sequences that never speculate cost the draft nothing. Prefix-cache hits start with no draft K/V: catching up
rewrites those shared blocks' draft entries with the same tokens' K/V.
"""
from __future__ import annotations

import torch

from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SpeculativeConfig
from conveyor.engine.sampler import SampleRow, Sampler
from conveyor.engine.scheduler import ScheduledSeq
from conveyor.model.loader import LoadedModel, load_model
from conveyor.model.runner import Chunk, ModelRunner


def load_draft(spec: SpeculativeConfig, config: EngineConfig, vocab_size: int) -> LoadedModel:
    """Load the draft checkpoint with the target's dtype. Raises ValueError when it cannot be loaded or its
    vocabulary differs."""
    m = config.model
    try:
        loaded = load_model(ModelConfig(model=spec.model, dtype=m.dtype, seed=m.seed, quantization=spec.quantization),
                            config.device)
    except ValueError as e:
        raise ValueError(f"speculative_config draft model: {e}") from None
    if loaded.arch.vocab_size != vocab_size:
        raise ValueError(f"the draft model's vocabulary ({loaded.arch.vocab_size} tokens) differs from the target's "
                         f"({vocab_size}): a draft model must share the target's tokenizer")
    return loaded


class DraftModel:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int, num_host_blocks: int,
                 stop_token_ids: list[int]) -> None:
        cache = CacheConfig(**{**config.cache.__dict__, "num_kv_blocks": num_blocks})
        self.runner = ModelRunner(loaded, cache, config.scheduler, config.device, num_blocks=num_blocks,
                                  num_host_blocks=num_host_blocks, attention_backend=config.attention_backend)
        self.max_model_len = loaded.max_model_len
        self.max_catch_up = config.scheduler.max_num_batched_tokens  # draft tokens computed per step to catch up
        self.stop_token_ids = set(stop_token_ids)

    def propose(self, scheduled: list[ScheduledSeq], sampler: Sampler, want_probs: set[int]) -> None:
        """Fill spec_token_ids (up to num_spec_slots tokens) of each scheduled decode, and draft_probs for the
        sequences in want_probs (seq ids; their verification needs the draft distributions). A sequence whose
        catch-up does not fit this step's max_catch_up proposes nothing and catches up partly."""
        todo = [s for s in scheduled if s.num_spec_slots and s.seq.num_tokens + s.num_spec_slots <= self.max_model_len]
        chunks, active, room = [], [], self.max_catch_up
        for s in todo:
            seq = s.seq
            ids = seq.token_ids[seq.num_draft_computed:]
            if len(ids) > room:  # catch up part of the way; propose from the next step on
                if room > 0:
                    chunks.append(Chunk(seq, seq.num_draft_computed, ids[:room], 0))
                    seq.num_draft_computed += room
                room = 0
                continue
            room -= len(ids)
            chunks.append(Chunk(seq, seq.num_draft_computed, ids, 1))
            active.append(s)
        while chunks:
            logits = self.runner.forward(chunks)
            rows = [SampleRow(s.seq, tuple(s.spec_token_ids)) for s in active]
            tokens, probs = sampler.sample(logits, rows, want_probs=bool(want_probs))
            for i, (s, tok) in enumerate(zip(active, tokens)):
                s.seq.num_draft_computed = s.seq.num_tokens + len(s.spec_token_ids)
                s.spec_token_ids.append(tok)
                if s.seq.seq_id in want_probs:
                    q = probs[i:i + 1]
                    s.draft_probs = q if s.draft_probs is None else torch.cat([s.draft_probs, q])
            active = [s for s in active if len(s.spec_token_ids) < s.num_spec_slots and self._may_go_on(s)]
            chunks = [Chunk(s.seq, s.seq.num_draft_computed, s.spec_token_ids[-1:], 1) for s in active]

    def _may_go_on(self, s: ScheduledSeq) -> bool:
        """No proposal after one that would end the sequence, or that its grammar does not allow."""
        if s.spec_token_ids[-1] in self.stop_token_ids or s.spec_token_ids[-1] in s.seq.params.stop_token_ids:
            return False
        g = s.seq.grammar
        return g is None or g.valid_prefix(s.spec_token_ids) == len(s.spec_token_ids)
