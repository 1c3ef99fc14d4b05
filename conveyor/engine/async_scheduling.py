"""Asynchronous scheduling: the engine schedules step N + 1 while step N's forward and sampling run.

Without it, a step is strictly serial: schedule, prepare inputs, forward, sample, then apply the tokens (stop checks,
detokenization, outputs); the device idles through the Python parts before and after its forward, and on CPU one
core idles through them. With it (vLLM's --async-scheduling; SGLang's overlap scheduler), the forward and sampling of
a step run as a job on a worker thread (torch releases the GIL inside its ops, and a CUDA launch returns at once)
while the engine thread applies the previous step's tokens and schedules the next step.

The next step is scheduled before this step's tokens are known: each sequence that samples in a job gets a
placeholder token (PENDING) at once, so the scheduler sees one more token to compute, as it will be. The next job
reads the real token from its predecessor's result (jobs run one at a time, in order) when it builds its input
ids, and the engine thread puts the real token in place of the placeholder when it applies the result. A sequence
that the token ends (EOS, a stop string, its length) has then been scheduled once more than needed: that result is
dropped. Freed blocks are safe to hand out at once: a job that still writes to them runs before any later job.

A job reads nothing that the engine thread changes meanwhile: its chunks carry copies of their token ids and block
tables, its sampling rows their positions. So only requests whose sampling needs nothing but that run here
(`plain`): no grammar, penalties, min_tokens, beams, n > 1 or prompt logprobs, and no speculative decoding; while
any other request is in the engine, steps run synchronously.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from conveyor.engine.logprobs import Logprobs
from conveyor.engine.sampler import SampleRow, Sampler
from conveyor.engine.scheduler import SchedulerOutput
from conveyor.engine.sequence import PENDING, Sequence
from conveyor.model.runner import Chunk, ModelRunner

class Skipped(Exception):
    """A job did not run because the job before it failed: its inputs may depend on tokens that never came."""


@dataclass
class Job:
    """A step handed to the worker: its schedule, what it moves between blocks first, its result to come (per
    sampling sequence (seq, token, its logprobs), in order), the sequences that sample, per sequence its
    num_computed_tokens before it was submitted (to undo it), the sequences its schedule admitted onto blocks in
    flight (see Scheduler.requeue_in_step_readers), and whether the worker has applied its block moves (each must
    be applied exactly once: a swap-out repeated after the forward wrote into its freed block copies that)."""
    sched: SchedulerOutput
    swaps: tuple[list[tuple[int, int]], list[tuple[int, int]]]
    copies: list[tuple[int, int]]
    future: Future
    sampling: list[Sequence] = field(default_factory=list)
    before: dict[int, int] = field(default_factory=dict)
    readers: list[Sequence] = field(default_factory=list)
    moved: threading.Event = field(default_factory=threading.Event)


def plain(req) -> bool:
    """Whether an engine Request's sampling depends on nothing but its token position (see the module docstring)."""
    params = req.params
    return (req.beam is None and params.num_samples == 1 and params.structured_outputs is None
            and params.prompt_logprobs is None and not params.min_tokens and not params.presence_penalty
            and not params.frequency_penalty and params.repetition_penalty == 1.0)


def run_job(runner: ModelRunner, sampler: Sampler, chunks: list[Chunk], rows: list[SampleRow],
            swaps: tuple[list, list], copies: list[tuple[int, int]], moved: threading.Event,
            prev: Future | None) -> list[tuple[Sequence, int, Logprobs]]:
    """On the worker: put the previous job's tokens in place of the chunks' placeholders, apply the block moves (and
    set moved), run the forward and sample. Raises Skipped if the previous job failed, whatever the forward or
    sampler raise, and KeyError for a placeholder the previous job did not sample (a bug)."""
    if prev is not None and prev.exception() is not None:
        raise Skipped()
    tokens = {seq.seq_id: tok for seq, tok, _ in prev.result()} if prev is not None else {}
    for c in chunks:
        if c.token_ids[-1] == PENDING:
            c.token_ids[-1] = tokens[c.seq.seq_id]
        assert PENDING not in c.token_ids, "only a chunk's last token can still be sampling"
    runner.swap(*swaps)
    runner.copy_blocks(copies)
    moved.set()
    logits = runner.forward(chunks)
    with torch.no_grad():
        drawn, _ = sampler.sample(logits, rows)
        lps = sampler.logprobs(logits, rows, drawn)
    return [(r.seq, tok, lp) for r, tok, lp in zip(rows, drawn, lps)]

