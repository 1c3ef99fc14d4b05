"""Turns the last-position logits of a step's sequences into next tokens (and logprobs).

Order of processing per row: min_tokens mask, penalties, logit_bias (added to the logits: +100 forces a token,
-100 bans it), the structured output grammar's mask (conveyor.engine.structured_output; where it allows only tokens
that min_tokens bans, the grammar wins), then greedy argmax or temperature → top-k → top-p → min-p → a draw. A draw
is argmax(p / E) with E ~ Exp(1), which samples from p; a seeded sequence draws E from its own generator so its
tokens do not depend on the rest of the batch. Logprobs are those of the model's raw distribution.
"""
from __future__ import annotations

import torch

from conveyor.engine.logprobs import token_logprobs
from conveyor.engine.sequence import Sequence
from conveyor.engine.structured_output import apply_grammar_masks


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: str) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float]]]:
        assert logits.shape[0] == len(seqs)
        logits = logits.float()
        raw = logits
        if any(self._constrained(s) for s in seqs):  # else no copy of the [batch, vocab] logits is needed
            logits = self._apply_constraints(logits.clone(), seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        random = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if len(greedy) == len(seqs):
            tokens = logits.argmax(dim=-1)
        elif greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if random:
            tokens[random] = self._sample(logits[random], [seqs[i] for i in random])
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, token_list)

    @staticmethod
    def _constrained(s: Sequence) -> bool:
        """Whether _apply_constraints changes this sequence's row."""
        p = s.params
        return (s.num_output_tokens < p.min_tokens or bool(p.presence_penalty or p.frequency_penalty)
                or p.repetition_penalty != 1.0 or bool(p.logit_bias) or s.grammar is not None)

    def _apply_constraints(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        unbanned: dict[int, tuple[list[int], torch.Tensor]] = {}  # grammar rows' min_tokens bans, undone if needed
        for i, s in enumerate(seqs):
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                banned = [t for t in self.eos_token_ids + p.stop_token_ids if t < self.vocab_size]
                if s.grammar is not None:
                    unbanned[i] = (banned, logits[i, banned].clone())
                logits[i, banned] = float("-inf")
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(s.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).float()
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if rows:
            apply_grammar_masks(logits, rows, [seqs[i].grammar for i in rows])
        for i, (banned, vals) in unbanned.items():
            if bool(torch.isneginf(logits[i]).all()):  # the grammar allows only what min_tokens bans: it wins
                logits[i, banned] = vals
                apply_grammar_masks(logits, [i], [seqs[i].grammar])
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
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
        noise = torch.empty_like(probs)
        for i, s in enumerate(seqs):
            noise[i].exponential_(generator=s.generator or self.generator)
        return (probs / noise).argmax(dim=-1)

    def _logprobs(self, raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[dict[int, float]]:
        """Every row's {sampled token: raw logprob, then its top-N (params.logprobs) alternatives}: the sampled
        token's logprob is always there (cumulative_logprob), the top-N only when asked for."""
        return token_logprobs(raw, tokens, [s.params.logprobs or 0 for s in seqs])


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
