"""Speculative decoding: cheap proposals for a sequence's next tokens, verified in one batched target forward.

A step that verifies k proposals d_1..d_k of a decoding sequence feeds the target its last token and the k proposals
(extra query tokens whose K/V go into the cache like any other) and gets k + 1 rows of logits: row j is the target's
distribution p_j for the token after d_1..d_j. The sampler turns each row into a token x_j exactly as it would without
speculation; verification keeps the proposals up to the first one the target rejects and then one token of the
target's own (see verify_coupled and rejection_sample), so a step emits 1 to k + 1 tokens. KV slots of rejected
proposals are given back (KVCacheManager.trim).

Proposers: NgramIndex (prompt lookup: the continuation of the latest earlier occurrence of the sequence's last n
tokens; Saxena 2023, "Prompt Lookup Decoding", as vLLM's ngram method) and DraftProposer in draft_model.py.

Adaptive: SpecPolicy gives each sequence fewer proposals as the batch grows and as its acceptance falls (a cost
model of the step), and none once disable_by_batch_size sequences run: a large batch already keeps the hardware
busy, and verifying proposals there costs what they save. A sequence the policy stopped still learns: the ngram
method checks the proposal it did not send against the token it gets (a shadow trial, free), the draft method
verifies one proposal every PROBE_INTERVAL steps (a probe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from conveyor.config import SpeculativeConfig
from conveyor.engine.sampler import Sampler
from conveyor.engine.scheduler import ScheduledSeq
from conveyor.engine.sequence import Sequence

if TYPE_CHECKING:
    from conveyor.engine.draft_model import DraftModel

ACCEPTANCE_EWMA = 0.3  # weight of the newest step in a sequence's acceptance estimate
PRIOR_EWMA = 0.02  # weight of each sequence-step in the engine-wide estimate that new sequences start from
PROBE_INTERVAL = 16  # draft model: a sequence whose estimate stopped its proposals verifies one this often
# no proposals from this many running sequences on (SmolLM2 on 2 CPU cores: a step costs ~24 ms + ~3.3 ms a token,
# bench/spec_step_cost.py; see SpecPolicy)
DEFAULT_DISABLE_BY_BATCH_SIZE = {"cpu": 32, "cuda": 256}


HASH_MOD = (1 << 61) - 1  # a Mersenne prime: n-gram hashes are polynomials in HASH_BASE modulo it
HASH_BASE = 1_000_003


class NgramIndex:
    """The latest position of every n-gram (prompt_lookup_min <= n <= prompt_lookup_max) of a growing token list
    that has a token after it, keyed by a polynomial hash of the n-gram (one int per entry, whatever n is; a lookup
    checks the tokens, so a collision costs a proposal, never a wrong one). Updating costs O(prompt_lookup_max) per
    new token; a lookup O(prompt_lookup_max)."""

    def __init__(self, n_min: int, n_max: int) -> None:
        assert 1 <= n_min <= n_max
        self.n_min, self.n_max = n_min, n_max
        self.powers = [pow(HASH_BASE, i, HASH_MOD) for i in range(n_max)]
        self.last_end: dict[int, int] = {}  # n-gram hash -> the index of its last token, latest occurrence
        self.indexed = 0  # n-grams ending before this index are in last_end

    def _hashes(self, tokens: list[int], end: int) -> list[int]:
        """Hashes of the n-grams ending at index end, for n = 1 .. min(n_max, end + 1)."""
        out, h = [], 0
        for n in range(1, min(self.n_max, end + 1) + 1):
            h = (h + (tokens[end - n + 1] + 1) * self.powers[n - 1]) % HASH_MOD
            out.append(h)
        return out

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest matching suffix of tokens (where
        they run into the suffix itself, the text is read as periodic), or none without a match."""
        for end in range(self.indexed, len(tokens) - 1):  # n-grams that now have a token after them
            for h in self._hashes(tokens, end)[self.n_min - 1:]:
                self.last_end[h] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        last = len(tokens) - 1
        hashes = self._hashes(tokens, last)
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            end = self.last_end.get(hashes[n - 1])
            if end is not None and end >= n - 1 and tokens[end - n + 1:end + 1] == tokens[last - n + 1:]:
                out: list[int] = []  # a continuation that reaches the end repeats with the match's period
                for j in range(end + 1, end + 1 + k):
                    out.append(tokens[j] if j < len(tokens) else out[j - len(tokens)])
                return out
        return []


@dataclass
class SpecState:
    """A sequence's speculation state: its acceptance estimate and, for the ngram method, its n-gram index."""
    acceptance: float = 1.0  # estimated chance that a proposal is accepted (EWMA over verify steps)
    ngram: NgramIndex | None = None
    shadow: int | None = None  # ngram: the first token it would have proposed in a step that proposed nothing
    steps_without_trial: int = 0  # draft model: decode steps since its last verified proposal

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        """Update the estimate after a step verified num_proposed proposals and accepted the first num_accepted."""
        self.acceptance += ACCEPTANCE_EWMA * (acceptance_rate(num_proposed, num_accepted) - self.acceptance)


def acceptance_rate(num_proposed: int, num_accepted: int) -> float:
    """A step's per-proposal acceptance: num_accepted successes out of min(num_accepted + 1, num_proposed) trials
    (the proposals after the first rejected one were never tried)."""
    assert 0 <= num_accepted <= num_proposed and num_proposed > 0
    return num_accepted / min(num_accepted + 1, num_proposed)


@dataclass
class SpecStats:
    """Counters in vLLM's spec_decode metric terms (cumulative)."""
    num_speculative_tokens: int
    num_drafts: int = 0  # sequence-steps that verified at least one proposal
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = [0] * self.num_speculative_tokens

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def as_dict(self) -> dict[str, int | float | list[int]]:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        return {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos),
                "spec_decode_acceptance_rate": rate}


class SpecPolicy:
    """How many proposals each decoding sequence gets this step.

    A step costs about a + b * tokens (a: reading the weights and the step's fixed work; b: one token's compute).
    With N sequences running it yields N tokens in a + b * N, and one more verified proposal, accepted with chance
    c, adds c tokens for b: worth it when c / b beats N / (a + b * N), i.e. when c > N / (N + a / b). The j-th
    proposal of a sequence is accepted with chance acceptance^j (only if the ones before it are). a / b is taken as
    disable_by_batch_size / 8, half the break-even batch measured on CPU (bench/spec_step_cost.py: ~7 for SmolLM2 on
    2 cores, against the default of 32): a verified proposal also costs engine work beyond its share of the forward,
    and a sequence picked for a high estimate tends to do worse than it (at concurrency 32 on free chat, a / b =
    disable_by_batch_size / 4 lost 7 %, bench/README.md). From disable_by_batch_size sequences on nothing is
    proposed."""

    def __init__(self, config: SpeculativeConfig, device: str) -> None:
        self.k = config.num_speculative_tokens
        self.disable_by_batch_size = config.disable_by_batch_size or DEFAULT_DISABLE_BY_BATCH_SIZE[device.split(":")[0]]
        self.break_even_batch = self.disable_by_batch_size / 8  # a / b

    def num_proposals(self, state: SpecState, num_running: int) -> int:
        if num_running >= self.disable_by_batch_size:
            return 0
        threshold = num_running / (num_running + self.break_even_batch)
        k, chance = 0, state.acceptance
        while k < self.k and chance > threshold:
            k += 1
            chance *= state.acceptance
        return k


def verify_coupled(drafts: list[int], sampled: list[int]) -> int:
    """How many leading proposals the target accepts when each row's token was drawn as the target would draw it
    without speculation (greedy argmax, or a seeded draw whose randomness depends only on the position): the
    proposals equal to the target's own tokens. sampled holds len(drafts) + 1 tokens; the step emits
    sampled[:accepted + 1]. For a deterministic proposer this is rejection sampling with a one-hot draft
    distribution (accept d with probability p(d), else draw from p without d), and for a draft model that drew its
    proposals with the same randomness it is a coupling of the two draws; either way every emitted token is exactly
    the target's sample."""
    assert len(sampled) == len(drafts) + 1
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == sampled[accepted]:
        accepted += 1
    return accepted


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: list[int], bonus: int,
                     generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
    Chen et al. 2023): proposal d_j drawn from the draft's q_j is accepted with probability min(1, p_j(d) / q_j(d));
    at the first rejection the token is drawn from max(0, p_j - q_j) renormalized; after k acceptances the bonus
    token (a draw from p_k) follows. The emitted tokens follow the target's distribution exactly.

    p: [k + 1, vocab] the target's sampling probabilities (after temperature, top-k/p, min-p and constraints),
    q: [k, vocab] the draft's, drafts: the k proposals, bonus: a token drawn from p[k]. Returns (number accepted,
    the token after them)."""
    k = len(drafts)
    assert p.shape[0] == k + 1 and q.shape[0] == k
    idx = torch.tensor(drafts, device=p.device)
    rows = torch.arange(k, device=p.device)
    pd, qd = p[rows, idx], q[rows, idx]
    u = torch.rand(k, generator=generator, device=p.device) if generator is not None else torch.rand(k, device=p.device)
    ok = (u * qd <= pd).tolist()  # u < p/q without dividing by a q of 0 (a draft q never proposes)
    accepted = next((j for j, a in enumerate(ok) if not a), k)
    if accepted == k:
        return k, bonus
    residual = (p[accepted] - q[accepted]).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q: nothing to correct towards (a rejection then has probability 0)
        residual = p[accepted]
    token = torch.multinomial(residual, 1, generator=generator) if generator is not None \
        else torch.multinomial(residual, 1)
    return accepted, int(token)


class Speculator:
    """The engine's speculative decoding: how many proposals each decode gets (before scheduling), the proposals
    (after it), their verification (from the sampled rows) and the counters."""

    def __init__(self, config: SpeculativeConfig, device: str, draft: DraftModel | None) -> None:
        assert (config.method == "draft_model") == (draft is not None)
        self.config = config
        self.draft = draft
        self.policy = SpecPolicy(config, device)
        self.stats = SpecStats(config.num_speculative_tokens)
        # a new sequence starts from what recent ones achieved: starting every one at 1.0 had each new chat
        # request verify k proposals it mostly loses (measured at concurrency 32, bench/spec_decode.py)
        self.prior = 1.0

    def lookahead(self, running: list[Sequence]) -> dict[int, int]:
        """seq_id -> proposals wanted, for running sequences that decode this step (beam search never speculates,
        nor a prompt's last token while samples wait to fork from it).
        The ngram proposals are made here (seq.spec_token_ids); a draft model's after scheduling."""
        out: dict[int, int] = {}
        n = len(running)
        for seq in running:
            seq.spec_token_ids = []
            # samples forked from seq when this step ends its prompt would share its proposals' slots
            if (seq.num_uncomputed_tokens != 1 or seq.params.use_beam_search or seq.forks
                    or n >= self.policy.disable_by_batch_size):
                continue
            if seq.spec is None:
                c = self.config
                seq.spec = SpecState(self.prior, NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max)
                                     if c.method == "ngram" else None)
            # proposals past max_tokens would never be used
            k = min(self.policy.num_proposals(seq.spec, n), seq.max_tokens - seq.num_output_tokens - 1)
            if seq.spec.ngram is not None:
                seq.spec_token_ids = seq.spec.ngram.propose(seq.token_ids, max(k, 1))
                if k <= 0 and seq.spec_token_ids:  # not worth verifying now: see whether it would have been right
                    seq.spec.shadow = seq.spec_token_ids[0]
                seq.spec_token_ids = seq.spec_token_ids[:max(k, 0)]
                k = len(seq.spec_token_ids)
            elif k <= 0 and seq.max_tokens - seq.num_output_tokens > 1:
                # a draft's proposals cost a forward even untried: probe with one now and then, so that an
                # estimate (and the prior) that fell in a bad stretch can recover
                seq.spec.steps_without_trial += 1
                k = int(seq.spec.steps_without_trial >= PROBE_INTERVAL)
            if self.draft is not None:  # no slots for proposals past the draft model's own maximum length
                k = min(k, self.draft.max_model_len - seq.num_tokens)
            if k > 0:
                out[seq.seq_id] = k
        return out

    def propose(self, scheduled: list[ScheduledSeq], sampler: Sampler) -> None:
        """Fill each scheduled decode's spec_token_ids (at most its num_spec_slots), cut before the first proposal
        its grammar does not allow."""
        if self.draft is not None:
            self.draft.propose(scheduled, sampler, {s.seq.seq_id for s in scheduled if self.uses_rejection(s.seq)})
        else:
            for s in scheduled:
                s.spec_token_ids = s.seq.spec_token_ids[:s.num_spec_slots]
        for s in scheduled:
            if s.spec_token_ids and s.seq.grammar is not None:
                n = s.seq.grammar.valid_prefix(s.spec_token_ids)
                s.spec_token_ids = s.spec_token_ids[:n]
                if s.draft_probs is not None:
                    s.draft_probs = s.draft_probs[:n]
            assert len(s.spec_token_ids) <= s.num_spec_slots

    def uses_rejection(self, seq: Sequence) -> bool:
        """Whether seq's proposals are verified by rejection sampling against the draft's distributions; else by
        coupling (verify_coupled): greedy, seeded, and every ngram proposal."""
        return self.draft is not None and not seq.params.greedy and seq.generator is None

    def verify(self, s: ScheduledSeq, sampled: list[int], probs: torch.Tensor | None,
               generator: torch.Generator) -> list[int]:
        """The tokens a verifying step emits for s: the accepted proposals, then one of the target's. sampled:
        the target's draws for the k + 1 rows; probs: their distributions [k + 1, vocab] (rejection only)."""
        drafts = s.spec_token_ids
        if not self.uses_rejection(s.seq):
            return sampled[:verify_coupled(drafts, sampled) + 1]
        assert probs is not None and s.draft_probs is not None
        accepted, token = rejection_sample(probs, s.draft_probs, drafts, sampled[-1], generator)
        return drafts[:accepted] + [token]

    def record(self, seq: Sequence, num_proposed: int, tokens: list[int]) -> None:
        """Count a step's verification (num_proposed proposals, tokens emitted) and learn from it."""
        trial = None  # (proposed, accepted)
        if num_proposed:
            self.stats.record(num_proposed, len(tokens) - 1)
            trial = num_proposed, len(tokens) - 1
        elif seq.spec is not None and seq.spec.shadow is not None:
            trial = 1, int(tokens[0] == seq.spec.shadow)
        if trial is not None:
            seq.spec.steps_without_trial = 0
            seq.spec.observe(*trial)
            self.prior += PRIOR_EWMA * (acceptance_rate(*trial) - self.prior)
        if seq.spec is not None:
            seq.spec.shadow = None
