"""Beam search as a mode of the engine: a request's W beams are sequences that share KV blocks.

Semantics follow transformers' `generate(num_beams=W, do_sample=False)`:
- each step, every live beam's log-softmax is added to its running score; the top K = max(2, 1 + #eos) * W
  candidates over all beams are taken, best first;
- a candidate ending in an eos token (or reaching max length) that ranks among the first W is a finished hypothesis
  scored `sum_logprobs / generated_len ** length_penalty`; the best W finished hypotheses are kept;
- the next beams are the best W candidates that did not stop;
- the search ends when every candidate stops (max length), when `early_stopping=True` and W hypotheses are
  finished, or when the best running beam, scored at its current length (or at max length under
  `early_stopping="never"` with a positive length penalty), can no longer beat the worst finished hypothesis.
The result is the best n finished hypotheses, best first.

The engine gives this module each live beam's log-probabilities once all of them have been computed for the same
length; it answers which (parent beam, token) pairs continue. Forking and freeing blocks is the engine's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conveyor.engine.sequence import Sequence

_NEG = -1.0e9


@dataclass
class Hypothesis:
    score: float
    token_ids: list[int]  # generated tokens only
    hit_eos: bool


@dataclass
class BeamSearchState:
    width: int
    num_prompt_tokens: int
    max_len: int  # prompt + max_tokens
    length_penalty: float
    early_stopping: bool | str
    eos_token_ids: list[int]
    beams: list[Sequence] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # running score of each live beam, best first
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> log-probs of its next token
    finished: list[Hypothesis] = field(default_factory=list)  # at most `width`, best first
    improvable: bool = True
    done: bool = False

    def ready(self) -> bool:
        return bool(self.beams) and all(b.seq_id in self.pending for b in self.beams)

    def restart(self, seq: Sequence) -> None:
        """Forget all progress; the search begins again from seq (the prompt alone)."""
        assert seq.num_tokens == self.num_prompt_tokens
        self.beams, self.scores, self.pending, self.finished = [seq], [0.0], {}, []
        self.improvable, self.done = True, False

    def step(self) -> list[tuple[Sequence, int]]:
        """Advance the search by one token. Returns the next beams as (parent beam, token) pairs, best first
        (empty when the search is done)."""
        assert self.ready()
        cur_len = self.beams[0].num_tokens
        assert all(b.num_tokens == cur_len for b in self.beams)
        lp = torch.stack([self.pending.pop(b.seq_id) for b in self.beams])
        lp = lp + torch.tensor(self.scores, dtype=lp.dtype)[:, None]
        vocab = lp.shape[1]
        k = min(max(2, 1 + len(self.eos_token_ids)) * self.width, lp.numel())
        top_scores, top_idx = lp.view(-1).topk(k)
        cands = [(s, self.beams[i // vocab], i % vocab) for s, i in zip(top_scores.tolist(), top_idx.tolist())]
        at_max = cur_len + 1 >= self.max_len
        stops = [at_max or tok in self.eos_token_ids for _, _, tok in cands]
        self._add_finished(cands, stops, cur_len)
        live = sorted(((s + (_NEG if stop else 0.0), rank) for rank, ((s, _, _), stop) in enumerate(zip(cands, stops))),
                      key=lambda x: -x[0])[:self.width]
        self.scores = [s for s, _ in live]
        chosen = [(cands[r][1], cands[r][2]) for _, r in live]
        self._update_improvable(cur_len + 1)
        if all(stops) or not self.improvable or (self.early_stopping is True and self._all_finished()):
            self.done = True
            return []
        return chosen

    def _add_finished(self, cands: list[tuple[float, Sequence, int]], stops: list[bool], cur_len: int) -> None:
        if self.early_stopping is True and self._all_finished() or not self.improvable:
            return
        gen_len = cur_len + 1 - self.num_prompt_tokens
        for rank, ((score, beam, tok), stop) in enumerate(zip(cands, stops)):
            if rank >= self.width or not stop:
                continue
            hit_eos = tok in self.eos_token_ids
            self.finished.append(Hypothesis(score / gen_len ** self.length_penalty,
                                            beam.output_token_ids + [tok], hit_eos))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width:]

    def _all_finished(self) -> bool:
        return len(self.finished) >= self.width

    def _update_improvable(self, new_len: int) -> None:
        if not self.improvable or not self.scores:
            return
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_len - self.num_prompt_tokens
        else:
            best_len = new_len - self.num_prompt_tokens
        best_running = self.scores[0] / best_len ** self.length_penalty
        worst_finished = self.finished[-1].score if self._all_finished() else _NEG
        self.improvable = best_running > worst_finished

    def results(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]
