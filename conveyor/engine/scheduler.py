"""Continuous batching: every step decides which sequences run and how many tokens each computes.

A sequence has `num_computed_tokens` of its `token_ids` in the KV cache; a step computes the next chunk of the rest
(a whole or partial prompt while prefilling, one token while decoding). Running sequences go first, in priority
then arrival order; waiting ones are admitted while slots, the token budget and free blocks allow. A running
sequence that cannot get a block preempts the lowest-ranked running sequence (itself, if it ranks last) by
recompute: its blocks are freed and it goes back to the head of the waiting queue.

A sequence admitted in a step may start after full blocks that sequences scheduled before it in the same step are
computing (blocks in flight, see kv_cache_manager), so requests arriving together with one prefix compute it once.

The batching modes other than continuous (static, dynamic, none) only change admission: a new batch is admitted
when the running set is empty; see SchedulerConfig. They exist to measure what continuous batching buys.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from conveyor.config import SchedulerConfig
from conveyor.engine.kv_cache_manager import KVCacheManager
from conveyor.engine.sequence import PENDING, FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of the sequence to compute this step
    # speculative decoding: KV slots allocated for proposals after the sequence's last token, and the proposals
    # this step verifies (at most num_spec_slots; filled after scheduling), with the draft model's distributions
    # they were drawn from when verification needs them ([len(spec_token_ids), vocab])
    num_spec_slots: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits give the next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    restarted: list[Sequence] = field(default_factory=list)  # fresh first sequences of restarted beam searches

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens + s.num_spec_slots for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, preemption_mode: str = "recompute") -> None:
        self.config = config
        self.kv = kv
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # in rank order
        self.num_preemptions = 0
        self.preemptions_by_mode = {"recompute": 0, "swap": 0}
        # swap-in hysteresis: a swapped sequence returns only if this many blocks stay free afterwards
        self.swap_in_reserve = max(1, kv.watermark_blocks, -(-kv.num_blocks * 4 // 100))

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def prefill_backlog_tokens(self) -> int:
        """Tokens that still need a prefill (or a recompute after preemption): all uncomputed tokens of waiting
        sequences plus those of running sequences that are mid-prefill."""
        waiting = sum(s.num_uncomputed_tokens for s in self.waiting)
        return waiting + sum(s.num_uncomputed_tokens for s in self.running if s.num_uncomputed_tokens > 1)

    def rank(self, seq: Sequence) -> tuple:
        """Scheduling order (lower runs first, the highest is preempted first): arrival under fcfs; priority value,
        then arrival under the priority policy."""
        if self.config.scheduling_policy == "priority":
            return seq.params.priority, seq.arrival_time, seq.seq_id
        return seq.arrival_time, seq.seq_id

    def add(self, seq: Sequence) -> None:
        assert seq.status == SequenceStatus.WAITING and not seq.block_table
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """The waiting queue is kept in rank order, so a preempted sequence goes back ahead of later arrivals."""
        key = self.rank(seq)
        if not self.waiting or self.rank(self.waiting[-1]) <= key:
            self.waiting.append(seq)
            return
        i = next(i for i, w in enumerate(self.waiting) if self.rank(w) > key)
        self.waiting.insert(i, seq)

    def _chunk(self, seq: Sequence, budget: int, reserved: int) -> int:
        """Tokens seq may compute this step. A prefill leaves `reserved` tokens of the budget to the decodes still
        to be scheduled, and takes at most long_prefill_token_threshold, so one long prompt cannot stall them."""
        n = seq.num_uncomputed_tokens
        if n == 1:
            if seq.token_ids[-1] == PENDING and (seq.num_output_tokens >= seq.max_tokens
                                                 or seq.num_tokens >= self.config.max_model_len):
                return 0  # the token its step in flight samples is its last (asynchronous scheduling)
            return min(1, budget)
        cap = self.config.long_prefill_token_threshold or n
        return max(0, min(n, budget - reserved, cap))

    def schedule(self, lookahead: dict[int, int] | None = None) -> SchedulerOutput:
        """lookahead: seq_id -> speculative proposals a decoding sequence would verify this step. They get KV slots
        only from the budget and blocks left over: never at the expense of another sequence's token or block."""
        out = SchedulerOutput()
        self.kv.begin_step()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=self.rank)
        order = list(self.running)  # preemption only removes sequences from the running set
        decodes_after = _decodes_after(order)
        for k, seq in enumerate(order):
            if budget <= 0:
                break
            n = self._chunk(seq, budget, decodes_after[k]) if seq.status == SequenceStatus.RUNNING else 0
            if n == 0:
                continue
            spec = self._spec_slots(seq, n, budget - decodes_after[k], lookahead)
            while seq.status == SequenceStatus.RUNNING and not self.kv.allocate_slots(seq, n):
                budget += self._preempt(self.running[-1], out)  # the lowest ranked, maybe seq itself
            if seq.status != SequenceStatus.RUNNING:
                continue
            out.scheduled.append(ScheduledSeq(seq, n, num_spec_slots=spec))
            budget -= n + spec
        if not out.preempted:  # admitting right after preempting would only thrash
            for s in out.scheduled if self.waiting else []:  # only admissions read blocks in flight
                self.kv.publish(s.seq, s.num_tokens)
            budget = self._swap_in(out, budget)
            if not self.swapped:  # new work waits until every swapped-out sequence is back
                self._admit(out, budget)
        assert self._writes_unshared(out), "a step would write into a block another sequence shares"
        self.kv.end_admission()
        return out

    def _spec_slots(self, seq: Sequence, n: int, budget: int, lookahead: dict[int, int] | None) -> int:
        """Allocate slots for seq's n tokens and up to lookahead[seq] proposals if the budget allows and the pool
        keeps a block free for every decode still to be scheduled; returns the proposals' slots (0: none given,
        nothing allocated)."""
        want = min((lookahead or {}).get(seq.seq_id, 0), budget - n)
        if want <= 0 or seq.num_uncomputed_tokens != 1:
            return 0
        need = self.kv.blocks_needed(seq, n + want) + 1  # + 1: a copy-on-write of a shared tail block
        if self.kv.pool.num_free - need < len(self.running) or not self.kv.allocate_slots(seq, n + want):
            return 0
        return want

    def _writes_unshared(self, out: SchedulerOutput) -> bool:
        """No scheduled write lands in a shared block, except a block in flight written by the sequence computing
        it (its other holders only read it, in the same forward, after the write)."""
        bs, refs, owner = self.kv.block_size, self.kv.pool.ref_counts, self.kv.in_flight_owner
        for s in out.scheduled:
            first = s.seq.num_computed_tokens // bs
            last = (s.seq.num_computed_tokens + s.num_tokens + s.num_spec_slots - 1) // bs
            if any(refs[b] != 1 and owner.get(b) != s.seq.seq_id for b in s.seq.block_table[first:last + 1]):
                return False
        return True

    def _admission_limit(self) -> int:
        """How many waiting sequences may join the running set now."""
        cfg = self.config
        if cfg.batching == "continuous":
            return cfg.max_num_seqs - sum(1 + s.num_reserved_slots + len(s.forks) for s in self.running)
        if self.running or not self.waiting:
            return 0  # batch modes admit only at a batch boundary
        if cfg.batching == "none":
            return 1
        wait = cfg.batch_timeout_s if cfg.batching == "static" else cfg.batch_window_s
        full = len(self.waiting) >= cfg.max_num_seqs
        return cfg.max_num_seqs if full or time.monotonic() - self.waiting[0].arrival_time >= wait else 0

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        limit = self._admission_limit()
        whole_batch = self.config.batching != "continuous"
        while self.waiting and limit > 0 and (budget > 0 or whole_batch):
            seq = self.waiting[0]
            slots = 1 + len(seq.forks) + seq.num_reserved_slots
            if slots > limit and self.running:
                break  # its samples or beams will need slots of their own once they fork
            if not seq.block_table:
                self.kv.match_prefix(seq)
            n = self._chunk(seq, budget, 0)  # a batch member may join with 0 tokens and prefill later
            if not self.kv.allocate_slots(seq, n, reserve=True):
                self.kv.free(seq)  # give back any prefix-cache hits; they stay cached
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            limit -= slots
            if n:
                out.scheduled.append(ScheduledSeq(seq, n))
                self.kv.publish(seq, n)
                budget -= n

    def _swap_in(self, out: SchedulerOutput, budget: int) -> int:
        """Bring swapped-out sequences back in rank order while slots, budget and the hysteresis reserve allow."""
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            reserve = self.swap_in_reserve if self.running else 1  # alone, it must always be able to return
            if not self.kv.swap_in(seq, reserve):
                break
            self.swapped.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget, 0)
            if n and self.kv.allocate_slots(seq, n):  # else it runs from the next step on
                out.scheduled.append(ScheduledSeq(seq, n))
                self.kv.publish(seq, n)
                budget -= n
        return budget

    def requeue_in_step_readers(self, batch: list[ScheduledSeq]) -> bool:
        """After a forward over batch failed: the sequences admitted this step onto blocks in flight may have read
        keys that were never written. Each goes back to the waiting queue with nothing computed and no blocks, as
        after a recompute preemption (its admission is undone), and its entry leaves batch (changed in place).
        Returns whether there were any. The blocks' first holders stay in batch: none of them took blocks in
        flight, so what remains can run on its own."""
        readers = list(self.kv.in_step_readers.values())
        if not readers:
            return False
        ids = {seq.seq_id for seq in readers}
        batch[:] = [s for s in batch if s.seq.seq_id not in ids]
        assert batch, "blocks in flight without a sequence computing them"
        self.restart(readers)
        return True

    def restart(self, seqs: list[Sequence]) -> None:
        """Send running sequences back to the waiting queue with nothing computed and no blocks, as a recompute
        preemption does (not counted as one)."""
        for seq in seqs:
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.running.remove(seq)
            self.kv.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_computed_tokens = 0
            self._enqueue(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Preempt seq: swap it out when the mode is swap and host space allows, else recompute it later from
        scratch. A beam is never preempted alone (its siblings would hold their blocks waiting for it): its whole
        search restarts from the prompt. Returns the budget given back by sequences taken out of this step."""
        self.num_preemptions += 1
        if seq.params.use_beam_search:
            return self._restart_beams(seq, out)
        self.running.remove(seq)
        out.preempted.append(seq)
        seq.num_preemptions += 1
        if self.preemption_mode == "swap" and self.kv.can_swap_out(seq):
            self.kv.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            key = self.rank(seq)
            i = next((i for i, w in enumerate(self.swapped) if self.rank(w) > key), len(self.swapped))
            self.swapped.insert(i, seq)
            self.preemptions_by_mode["swap"] += 1
            return 0
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.preemptions_by_mode["recompute"] += 1
        self._enqueue(seq)
        return 0

    def _restart_beams(self, victim: Sequence, out: SchedulerOutput) -> int:
        """Free every beam of victim's request and queue one fresh sequence for its prompt (by its original rank).
        The engine resets the search state for out.restarted. Beam search is deterministic, so the restart
        recomputes the same beams; the validation in Engine.add_request guarantees one search fits the cache."""
        beams = [s for s in self.running if s.request_id == victim.request_id]
        given_back = sum(s.num_tokens for s in out.scheduled if s.seq.request_id == victim.request_id)
        out.scheduled = [s for s in out.scheduled if s.seq.request_id != victim.request_id]
        for b in beams:
            self.running.remove(b)
            self.kv.free(b)
            b.status, b.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
            out.preempted.append(b)
        fresh = Sequence(victim.request_id, 0, victim.token_ids[:victim.num_prompt_tokens], victim.num_prompt_tokens,
                         victim.params, victim.max_tokens, arrival_time=victim.arrival_time,
                         cache_salt=victim.cache_salt, num_reserved_slots=victim.params.beam_width - 1,
                         num_preemptions=victim.num_preemptions + 1)
        fresh.first_scheduled_time = victim.first_scheduled_time
        self.preemptions_by_mode["recompute"] += 1
        self._enqueue(fresh)
        out.restarted.append(fresh)
        return given_back

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A pending sample joins the running set sharing its parent's blocks (parallel sampling)."""
        assert child.status == SequenceStatus.FORK_PENDING and parent.status == SequenceStatus.RUNNING
        self.kv.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        child.first_scheduled_time = parent.first_scheduled_time
        self.running.append(child)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (done or aborted) and free its blocks now, so the next step can reuse them."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _decodes_after(seqs: list[Sequence]) -> list[int]:
    """For each position, how many decoding sequences (one token to compute) come after it."""
    counts, n = [0] * len(seqs), 0
    for i in range(len(seqs) - 1, -1, -1):
        counts[i] = n
        n += seqs[i].num_uncomputed_tokens == 1
    return counts
