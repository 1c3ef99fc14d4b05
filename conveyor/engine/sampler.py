"""Turns the logits of a step's sampling rows into next tokens (and logprobs).

A row is a sequence, or with speculative decoding a sequence followed by some of its proposals (SampleRow.drafts):
every per-sequence rule below then reads the sequence as if the proposals were already its output.
Order of processing per row: min_tokens mask, penalties, logit_bias (added to the logits: +100 forces a token,
-100 bans it), the structured output grammar's mask (conveyor.engine.structured_output; where it allows only tokens
that min_tokens bans, the grammar wins), then greedy argmax or temperature → top-k → top-p → min-p → a draw. A draw
is argmax(p / E) with E ~ Exp(1), which samples from p; a seeded sequence draws E from a generator seeded by its seed
and the token's position, so its tokens depend neither on the rest of the batch nor on how many tokens a step
produces (speculative decoding emits exactly the tokens it would emit without). Logprobs are those of the model's
raw distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.engine.logprobs import Logprobs, token_logprobs
from conveyor.engine.sequence import Sequence
from conveyor.engine.structured_output import apply_grammar_masks


@dataclass(frozen=True)
class SampleRow:
    """One row of logits to sample: the token at `position` of seq, after seq's tokens and then `drafts`. at: the
    sequence's length, fixed when the row is made (asynchronous scheduling: the sequence grows meanwhile)."""
    seq: Sequence
    drafts: tuple[int, ...] = ()
    at: int | None = None

    @property
    def position(self) -> int:
        return (self.seq.num_tokens if self.at is None else self.at) + len(self.drafts)

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.drafts)

    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + list(self.drafts)


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded sequence's draw for the token at `position` (splitmix64 finalizer over both)."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: str) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence | SampleRow]) -> tuple[list[int], list[Logprobs]]:
        """logits [rows, vocab] -> (one token per row, its logprobs: the token's, then params.logprobs top ones)."""
        rows = [r if isinstance(r, SampleRow) else SampleRow(r) for r in seqs]
        tokens, _ = self.sample(logits, rows)
        return tokens, self.logprobs(logits, rows, tokens)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow],
               want_probs: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """Draw one token per row of logits [rows, vocab]. With want_probs, also the [rows, vocab] float32
        distribution each random row was drawn from (rows of greedy sequences are zeros)."""
        assert logits.shape[0] == len(rows)
        logits = logits.float()
        if any(self._constrained(r) for r in rows):  # else no copy of the [batch, vocab] logits is needed
            logits = self._apply_constraints(logits.clone(), rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.seq.params.greedy]
        random = [i for i, r in enumerate(rows) if not r.seq.params.greedy]
        if len(greedy) == len(rows):
            tokens = logits.argmax(dim=-1)
        elif greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        probs = torch.zeros_like(logits) if want_probs else None
        if random:
            p = self._probs(logits[random], [rows[i].seq for i in random])
            tokens[random] = self._draw(p, [rows[i] for i in random])
            if probs is not None:
                probs[random] = p
        return tokens.tolist(), probs

    def logprobs(self, raw: torch.Tensor, rows: list[SampleRow], tokens: list[int]) -> list[Logprobs]:
        """Every row's {token: raw logprob, then its top-N (params.logprobs) alternatives}: the token's logprob is
        always there (cumulative_logprob), the top-N only when asked for."""
        return token_logprobs(raw, tokens, [r.seq.params.logprobs or 0 for r in rows])

    @staticmethod
    def _constrained(r: SampleRow) -> bool:
        """Whether _apply_constraints changes this row."""
        p = r.seq.params
        return (r.num_output_tokens < p.min_tokens or bool(p.presence_penalty or p.frequency_penalty)
                or p.repetition_penalty != 1.0 or bool(p.logit_bias) or r.seq.grammar is not None)

    def _apply_constraints(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        unbanned: dict[int, tuple[list[int], torch.Tensor]] = {}  # grammar rows' min_tokens bans, undone if needed
        for i, r in enumerate(rows):
            s, p = r.seq, r.seq.params
            if r.num_output_tokens < p.min_tokens:
                banned = [t for t in self.eos_token_ids + p.stop_token_ids if t < self.vocab_size]
                if s.grammar is not None:
                    unbanned[i] = (banned, logits[i, banned].clone())
                logits[i, banned] = float("-inf")
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(r.output_token_ids(), dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).float()
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.token_ids).union(r.drafts)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        g = [i for i, r in enumerate(rows) if r.seq.grammar is not None]
        if g:
            apply_grammar_masks(logits, g, [rows[i].seq.grammar for i in g], [rows[i].drafts for i in g])
        for i, (banned, vals) in unbanned.items():
            if bool(torch.isneginf(logits[i]).all()):  # the grammar allows only what min_tokens bans: it wins
                logits[i, banned] = vals
                apply_grammar_masks(logits, [i], [rows[i].seq.grammar], [rows[i].drafts])
        return logits

    def _probs(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """[rows, vocab] sampling distributions: temperature, top-k, top-p, min-p."""
        dev = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev)
        logits = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        top_ps = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = _top_k_top_p(logits, top_ks, top_ps)
        probs = logits.softmax(dim=-1)
        min_ps = torch.tensor([s.params.min_p for s in seqs], device=dev)
        if bool((min_ps > 0).any()):
            probs = probs.masked_fill(probs < min_ps[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs

    def _draw(self, probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """One token per row of probs: argmax(p / E), E ~ Exp(1) from the row's position seed or the stream."""
        noise = torch.empty_like(probs)
        for i, r in enumerate(rows):
            noise[i].exponential_(generator=self.row_generator(r))
        return (probs / noise).argmax(dim=-1)

    def row_generator(self, row: SampleRow) -> torch.Generator:
        """A seeded sequence's generator, seeded for this row's position; the engine's stream otherwise."""
        seq = row.seq
        if seq.generator is None:
            return self.generator
        assert seq.seed is not None
        return seq.generator.manual_seed(position_seed(seq.seed, row.position))


def check_logit_bias(logit_bias: dict[int, float] | None, vocab_size: int) -> None:
    """Raises ValueError naming the first logit_bias token id outside the model's vocabulary [0, vocab_size)."""
    bad = sorted(t for t in logit_bias or {} if not 0 <= t < vocab_size)
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=logits.device)  # any int k
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_ps, device=logits.device)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # drop a token when the tokens ranked above it already cover top_p; the top token always stays
    drop |= (probs.cumsum(dim=-1) - probs) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
