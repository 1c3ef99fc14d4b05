"""The engine: requests in, one scheduled forward per step(), outputs out.

step(): Scheduler.schedule() → ModelRunner.execute() → Sampler → stop checks and detokenization → outputs.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from conveyor.config import EngineConfig
from conveyor.engine.async_scheduling import Job, Skipped, plain, run_job
from conveyor.engine.beam_search import BeamSearchState
from conveyor.engine.detokenizer import check_stop, detokenize_incrementally, find_stop_string
from conveyor.engine.kv_cache_manager import KVCacheManager, cdiv
from conveyor.engine.draft_model import DraftModel, load_draft
from conveyor.engine.sampler import SampleRow, Sampler, check_logit_bias
from conveyor.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from conveyor.engine.sequence import PENDING, FinishReason, Sequence, SequenceStatus
from conveyor.engine.spec_decode import Speculator
from conveyor.engine.structured_output import GrammarCompiler, GrammarState
from conveyor.model.loader import load_model
from conveyor.model.runner import ModelRunner, chunk_of, kv_bytes_per_block
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.sampling_params import SamplingParams, ensure_utf8

log = logging.getLogger("conveyor.engine")

Prompt = str | list[int] | dict


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    beam: BeamSearchState | None = None  # beam search requests: seqs are the live beams
    aborted: bool = False
    # per sample (set in __post_init__): chars and tokens already handed out, the sum of its sampled tokens' logprobs
    emitted_text: list[int] = field(init=False)
    emitted_tokens: list[int] = field(init=False)
    cumulative_logprobs: list[float] = field(init=False)
    # per sample: for each output token whose text is known, the length of output_text once that text was added; a
    # token that adds no text yet (an incomplete UTF-8 character, a skipped special token) waits for the next text
    text_ends: list[list[int]] = field(init=False)
    # [None, {token: logprob, ...}, ...]: filled chunk by chunk while the prompt computes (None: not asked for)
    prompt_logprobs: list[dict[int, float] | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.seqs) if self.beam is None else self.params.n
        self.emitted_text, self.emitted_tokens = [0] * n, [0] * n
        self.cumulative_logprobs = [0.0] * n
        self.text_ends = [[] for _ in range(n)]
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is None or len(self.prompt_logprobs) == len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done or self.aborted
        return all(s.is_finished for s in self.seqs)

    def restart_beams(self, seq: Sequence) -> None:
        """The scheduler preempted this beam search: it starts over from seq, its prompt."""
        assert self.beam is not None and seq.request_id == self.request_id
        self.beam.restart(seq)
        self.seqs = [seq]


def _note_text_end(ends: list[int], seq: Sequence) -> None:
    """After a token of seq was appended: if its text (and that of any earlier tokens still waiting) has been added
    to output_text, record where it ends. A stop string that cut the text leaves its tokens ending at the cut."""
    if seq.num_output_tokens > len(ends) and (seq.is_finished or len(seq.output_text) > (ends[-1] if ends else 0)):
        ends += [len(seq.output_text)] * (seq.num_output_tokens - len(ends))


def _dict_prompt(prompt: dict) -> str | list[int]:
    """The text or token ids of a dict prompt. Raises ValueError for other keys, both or neither."""
    unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
    if unknown:
        raise ValueError(f"unknown keys in a dict prompt: {', '.join(unknown)[:200]} (it takes 'prompt' or "
                         f"'prompt_token_ids')")
    if len(prompt) != 1:
        raise ValueError("a dict prompt takes exactly one of 'prompt' and 'prompt_token_ids'")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(prompt['prompt']).__name__}")
        return prompt["prompt"]
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
    return list(ids)


def _drop_placeholders(seq: Sequence, n: int | None = None) -> None:
    """Take seq's trailing placeholder tokens (asynchronous scheduling) away: n of them, or all (None)."""
    while seq.token_ids and seq.token_ids[-1] == PENDING and (n is None or n > 0):
        seq.token_ids.pop()
        n = None if n is None else n - 1
    assert not n, "a sampling sequence lacks its placeholder"


def _undo(job: Job) -> None:
    """Take back what submitting job did to its sequences: their computed tokens (unless a recompute preemption
    has started the sequence over since) and their placeholders."""
    for s in job.sched.scheduled:
        if s.seq.status in (SequenceStatus.RUNNING, SequenceStatus.SWAPPED):
            s.seq.num_computed_tokens = job.before[s.seq.seq_id]
    for seq in job.sampling:
        if not seq.is_finished:
            _drop_placeholders(seq, 1)


def _mix_seed(seed: int, index: int) -> int:
    return (seed * 6364136223846793005 + index * 1442695040888963407) % (1 << 63)


def _salt_key(cache_salt: str | None) -> str | None:
    """The salt as the prefix cache keys it: a fixed-size digest, so a long salt costs nothing per block.
    Raises ValueError for a salt that is not a string of valid text."""
    if cache_salt is None:
        return None
    if not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
    ensure_utf8(cache_salt, "cache_salt")
    return hashlib.sha256(cache_salt.encode()).hexdigest()


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        loaded = load_model(config.model, config.device)
        config.scheduler.max_model_len = loaded.max_model_len
        self.max_model_len = loaded.max_model_len
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.arch.vocab_size
        self.model_name = loaded.name
        c, spec = config.cache, config.speculative
        if spec is not None and c.kv_layout != "paged":
            raise ValueError("speculative decoding needs the paged KV cache layout (kv_layout='paged')")
        draft = None if spec is None or spec.method != "draft_model" else \
            load_draft(spec, config, loaded.arch.vocab_size)
        draft_bytes = kv_bytes_per_block(draft.arch, draft.dtype, c.block_size) if draft else 0
        self.runner = ModelRunner(loaded, c, config.scheduler, config.device, extra_bytes_per_block=draft_bytes,
                                  attention_backend=config.attention_backend,
                                  cuda_graphs="off" if config.enforce_eager else "auto")
        self.kv = KVCacheManager(self.runner.num_blocks, c.block_size, c.kv_layout, c.enable_prefix_caching,
                                 c.watermark, self.runner.num_host_blocks)
        self.scheduler = Scheduler(config.scheduler, self.kv, c.preemption_mode)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, config.model.seed, config.device)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.spec = None if spec is None else Speculator(spec, config.device, draft and DraftModel(
            draft, config, self.runner.num_blocks, self.runner.num_host_blocks, self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        # asynchronous scheduling: the worker that runs steps' forwards, and the step in flight there
        self.async_scheduling = config.async_scheduling
        # one thread: jobs run one at a time, in the order submitted
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="conveyor-step") if self.async_scheduling else None
        self._inflight: Job | None = None
        self.last_step_num_seqs = 0
        self.last_step_all_failed = False  # every request the last step ran failed (see step())
        self.num_failed_requests = 0
        # KV slots reserved (blocks in use × block size) vs used (tokens in the cache), summed over steps
        self.kv_slots_reserved = 0
        self.kv_slots_used = 0
        self.peak_running = 0

    # ---- requests in -------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Returns (text or None, token ids). A prompt is a string, a list of token ids, or vLLM's dict prompts
        {"prompt": text} and {"prompt_token_ids": [...]}. Raises ValueError for anything that is not a servable
        prompt."""
        if isinstance(prompt, dict):
            prompt = _dict_prompt(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ensure_utf8(prompt, "the prompt")
            try:
                ids = self.tokenizer.encode(prompt)
            except Exception as e:  # whatever the tokenizer cannot take is a bad prompt, not a server fault
                raise ValueError(f"the prompt could not be tokenized ({type(e).__name__})") from None
            if not ids:
                raise ValueError("the prompt tokenizes to no tokens")
            return prompt, ids
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("the prompt is empty")
            bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return None, list(prompt)
        raise ValueError(f"a prompt is a string, a list of token ids, {{'prompt': text}} or "
                         f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def validate(self, prompt: Prompt, params: SamplingParams,
                 cache_salt: str | None = None) -> tuple[str | None, list[int]]:
        """Tokenize and check a request without queueing it (safe from any thread). Raises ValueError for a request
        that can never be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # again: fields may have been changed since the params were made
        self._check_max_logprobs(params)
        _salt_key(cache_salt)
        text, ids = self.tokenize(prompt)
        self._resolve_max_tokens(len(ids), params)
        check_logit_bias(params.logit_bias, self.vocab_size)
        if params.structured_outputs is not None:  # compiled (and cached for add_request) in the caller's thread
            self.grammars.compile(params.structured_outputs)
        return text, ids

    def _check_max_logprobs(self, params: SamplingParams) -> None:
        """The operator's --max-logprobs (ModelConfig.max_logprobs), below the sampler's own 20."""
        limit = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > limit:
                raise ValueError(f"{name} must be in [0, {limit}] (max_logprobs, --max-logprobs), got {v}")

    def _resolve_max_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                             f"maximum length of {self.max_model_len} tokens")
        if max_tokens < 1:
            raise ValueError(f"the prompt ({n_prompt} tokens) leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        if max_tokens < params.min_tokens:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the {max_tokens} tokens this prompt leaves "
                             f"within max_model_len={self.max_model_len}")
        need = cdiv(n_prompt + max_tokens, self.kv.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks but the whole cache has {self.kv.num_blocks}")
        return max_tokens

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    prompt_text: str | None = None, cache_salt: str | None = None) -> None:
        """Validate and queue a request. Raises ValueError for a request that can never be served."""
        params = SamplingParams() if params is None else params
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.validate(prompt, params, cache_salt)
        cache_salt = _salt_key(cache_salt)
        max_tokens = self._resolve_max_tokens(len(ids), params)
        width = params.beam_width if params.use_beam_search else params.num_samples
        if width > self.config.scheduler.max_num_seqs:
            raise ValueError(f"{width} samples or beams exceed max_num_seqs={self.config.scheduler.max_num_seqs}")
        if params.use_beam_search:
            need = cdiv(len(ids), self.kv.block_size) + params.beam_width * (cdiv(max_tokens, self.kv.block_size) + 1)
            if need > self.kv.num_blocks:
                raise ValueError(f"beam search with beam_width={params.beam_width} and max_tokens={max_tokens} "
                                 f"may need {need} KV blocks but the whole cache has {self.kv.num_blocks}")
            self._add_beam_request(request_id, text or prompt_text, ids, params, max_tokens, cache_salt)
            return
        now = time.monotonic()
        seqs = []
        for i in range(params.num_samples):
            seed = None if params.seed is None else _mix_seed(params.seed, i)
            gen = None if seed is None else torch.Generator(self.config.device)
            seqs.append(Sequence(request_id, i, list(ids), len(ids), params, max_tokens, arrival_time=now,
                                 generator=gen, seed=seed, cache_salt=cache_salt))
        if len(seqs) > 1 and self.kv.layout == "paged":  # samples share the prompt's blocks: prefill it once
            for child in seqs[1:]:
                child.status = SequenceStatus.FORK_PENDING
            seqs[0].forks = seqs[1:]
        req = Request(request_id, text or prompt_text, ids, params, seqs, now)
        if params.structured_outputs is not None:
            compiled = self.grammars.compile(params.structured_outputs)  # a cache hit: validate compiled it
            for s in seqs:
                s.grammar = GrammarState(compiled)
        self.requests[request_id] = req
        for s in seqs:
            if s.status == SequenceStatus.WAITING:
                self.scheduler.add(s)

    def _add_beam_request(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams,
                          max_tokens: int, cache_salt: str | None) -> None:
        """One sequence to start with; it forks into beam_width beams after the prompt's prefill."""
        seq = Sequence(request_id, 0, list(ids), len(ids), params, max_tokens, cache_salt=cache_salt,
                       num_reserved_slots=params.beam_width - 1)
        eos = ([] if params.ignore_eos else list(self.eos_token_ids)) + list(params.stop_token_ids)
        state = BeamSearchState(params.beam_width, len(ids), len(ids) + max_tokens, params.length_penalty,
                                params.early_stopping, sorted(set(eos)), beams=[seq], scores=[0.0])
        req = Request(request_id, text, ids, params, [seq], seq.arrival_time, beam=state)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; returns its final output (finish reason "abort")."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.aborted = True
        for s in req.seqs:
            _drop_placeholders(s)
            self.scheduler.finish(s, FinishReason.ABORT)
        return self._make_output(req, time.monotonic())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    # ---- one step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one forward; returns the outputs of the requests it advanced.

        A request that makes the step raise is ended (blocks freed) and comes back finished with `error` set and
        finish reason "error"; the other requests of the batch carry on (a failing forward is run again on halves
        of the batch to find the requests that fail). What cannot be pinned on requests fails the whole batch (in
        the scheduler: every request). An AssertionError (a broken invariant) propagates: the state is suspect.

        With asynchronous scheduling (conveyor.engine.async_scheduling) a step submits its forward and returns the
        outputs of the step before it; a step that cannot run asynchronously first completes the one in flight."""
        self.last_step_all_failed = False
        if self.async_scheduling and all(plain(r) for r in self.requests.values()) and not self.spec:
            return self._step_async()
        if self._inflight is not None:
            return self._drain()
        try:
            lookahead = self.spec.lookahead(self.scheduler.running) if self.spec else None
            sched = self.scheduler.schedule(lookahead)
            for seq in sched.restarted:
                self.requests[seq.request_id].restart_beams(seq)
        except AssertionError:
            raise
        except Exception as e:
            self.last_step_num_seqs = 0
            return self._fail_all(dict.fromkeys(self.requests, e))
        batch = list(dict.fromkeys(s.seq.request_id for s in sched.scheduled))
        try:
            return self._run(sched, self.kv.take_swaps(), self.kv.take_copies())
        except AssertionError:
            raise
        except Exception as e:  # outside any one request's part of the step
            return self._fail_all(dict.fromkeys(batch, e))

    def _run(self, sched: SchedulerOutput, swaps: tuple[list, list],
             copies: list[tuple[int, int]]) -> list[RequestOutput]:
        """Run a scheduled step synchronously, its block moves first."""
        self.last_step_num_seqs = len(sched.scheduled)
        if not sched.scheduled:
            return []
        for runner in [self.runner] + ([self.spec.draft.runner] if self.spec and self.spec.draft else []):
            runner.swap(*swaps)
            runner.copy_blocks(copies)
        if self.spec is not None:
            self._propose(sched.scheduled)
        sampled, forking, prompt_lps, failed = self._compute(sched.scheduled)
        beams = [s.seq.request_id for s in sched.scheduled if s.samples and s.seq.request_id not in failed
                 and self.requests[s.seq.request_id].beam is not None]
        for s in sched.scheduled:  # only once the forward has succeeded
            if s.seq.request_id not in failed:
                s.seq.num_computed_tokens += s.num_tokens
                self.kv.cache_full_blocks(s.seq)
        for seq, start, lps in prompt_lps:
            if seq.request_id not in failed:
                got = self.requests[seq.request_id].prompt_logprobs
                assert len(got) == start + 1, "prompt logprobs must arrive in order"
                got += lps
        for parent, child in forking:
            self.scheduler.fork(parent, child)
            parent.forks = []
        self._account_kv()
        now = time.monotonic()
        tokens: dict[str, list[tuple[Sequence, list[int], list[dict[int, float]]]]] = {}
        for seq, toks, lps in sampled:
            tokens.setdefault(seq.request_id, []).append((seq, toks, lps))
        outs = self._advance_all(list(dict.fromkeys([*tokens, *beams])), tokens, failed, now)
        if self.spec is not None:
            self._after_verify(sched.scheduled, sampled, failed)
        self.last_step_all_failed = len(failed) == len({s.seq.request_id for s in sched.scheduled})
        return outs + self._fail(failed)

    # ---- asynchronous scheduling (conveyor.engine.async_scheduling) ---------------------------------------------
    def _step_async(self) -> list[RequestOutput]:
        """Schedule the next step and submit its job, then apply the job in flight before it."""
        try:
            sched = self.scheduler.schedule(None)
        except AssertionError:
            raise
        except Exception as e:
            self.last_step_num_seqs = 0
            outs = self._drain()
            return outs + self._fail_all(dict.fromkeys(self.requests, e))
        prev = self._inflight
        self._inflight = self._submit(sched, prev) if sched.scheduled else None
        self.last_step_num_seqs = len(sched.scheduled)
        return self._complete(prev, self._inflight) if prev is not None else []

    def _drain(self) -> list[RequestOutput]:
        """Apply the job in flight, if any; none is in flight afterwards."""
        job, self._inflight = self._inflight, None
        return self._complete(job, None) if job is not None else []

    def _submit(self, sched: SchedulerOutput, prev: Job | None) -> Job:
        """Hand the step to the worker. Its sequences count the step as computed and each sampling one gets a
        placeholder token, so the next schedule sees them as they will be."""
        chunks = [chunk_of(s, copy_table=True) for s in sched.scheduled]
        sampling = [s.seq for s in sched.scheduled if s.samples]
        rows = [SampleRow(seq, at=seq.num_tokens) for seq in sampling]
        before = {s.seq.seq_id: s.seq.num_computed_tokens for s in sched.scheduled}
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
        for seq in sampling:
            seq.token_ids.append(PENDING)
        swaps, copies, moved = self.kv.take_swaps(), self.kv.take_copies(), threading.Event()
        future = self.worker.submit(run_job, self.runner, self.sampler, chunks, rows, swaps, copies, moved,
                                    prev.future if prev is not None else None)
        return Job(sched, swaps, copies, future, sampling, before, list(self.kv.in_step_readers.values()), moved)

    def _complete(self, job: Job, nxt: Job | None) -> list[RequestOutput]:
        """Wait for job and apply its tokens (nxt: the job submitted after it, in flight). If it failed, it runs
        again synchronously, with the usual search for the requests that fail, and nxt is undone."""
        try:
            sampled = job.future.result()
        except Exception as e:
            log.warning("an asynchronous step failed (%s); it runs again synchronously", type(e).__name__)
            return self._recover(job, nxt)
        again = {seq.seq_id for seq in nxt.sampling} if nxt is not None else set()
        tokens: dict[str, list[tuple[Sequence, list[int], list[dict[int, float]]]]] = {}
        for seq, tok, lp in sampled:
            if seq.is_finished:  # aborted meanwhile; abort_request took its placeholders away
                continue
            _drop_placeholders(seq, 2 if seq.seq_id in again else 1)
            tokens.setdefault(seq.request_id, []).append((seq, [tok], [lp]))
        self._account_kv()
        failed: dict[str, Exception] = {}
        outs = self._advance_all(list(tokens), tokens, failed, time.monotonic())
        for s in job.sched.scheduled:  # now that every computed position holds its real token; not the ones nxt
            seq = s.seq  # is still computing (if it fails, they were never written)
            if seq.status == SequenceStatus.RUNNING and seq.request_id not in failed:
                self.kv.cache_full_blocks(seq, nxt.before.get(seq.seq_id) if nxt is not None else None)
        for seq, _, _ in sampled:
            if seq.seq_id in again and not seq.is_finished:
                seq.token_ids.append(PENDING)
        self.last_step_all_failed = bool(failed) and len(failed) == len(tokens)
        return outs + self._fail(failed)

    def _recover(self, job: Job, nxt: Job | None) -> list[RequestOutput]:
        """job failed (and nxt, skipped, never ran): undo both, run job's step synchronously, then nxt's block
        moves; nxt's sequences are scheduled again by the next step. Each job's block moves are applied exactly
        once: a swap-out done again after the failed forward wrote into its freed device block would copy that."""
        readers = job.readers
        if nxt is not None:
            assert isinstance(nxt.future.exception(), Skipped), "a job ran after the one before it failed"
            self._inflight = None
            _undo(nxt)
            readers = readers + nxt.readers
        _undo(job)
        # sequences that took blocks in flight start over (their blocks' owners may not run again); those preempted
        # since job was submitted compute their tokens anew anyway (a schedule that preempts admits none)
        self.scheduler.restart(readers)
        keep = [s for s in job.sched.scheduled if s.seq.status == SequenceStatus.RUNNING]
        batch = list(dict.fromkeys(s.seq.request_id for s in keep))
        try:
            if not job.moved.is_set():  # the job failed before its block moves
                self.runner.swap(*job.swaps)
                self.runner.copy_blocks(job.copies)
            outs = self._run(SchedulerOutput(scheduled=keep), ([], []), [])
        except AssertionError:
            raise
        except Exception as e:
            outs = self._fail_all(dict.fromkeys(batch, e))
        if nxt is not None:
            self.runner.swap(*nxt.swaps)
            self.runner.copy_blocks(nxt.copies)
        return outs

    def _propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Speculative proposals for this step's decodes. A proposer that fails costs the step its proposals,
        never a request."""
        try:
            self.spec.propose(scheduled, self.sampler)
        except AssertionError:
            raise
        except Exception:
            log.exception("speculative proposals failed; this step runs without them")
            for s in scheduled:
                s.spec_token_ids, s.draft_probs = [], None
                s.seq.num_draft_computed = 0

    def _after_verify(self, scheduled: list[ScheduledSeq], sampled: list, failed: dict[str, Exception]) -> None:
        """Count verifications; give back the slots of rejected proposals; register the blocks accepted proposals
        filled. Accepted proposals' K/V count as computed once appended (_advance); the draft's K/V stays valid up
        to the target's."""
        emitted = {seq.seq_id: toks for seq, toks, _ in sampled}
        for s in scheduled:
            seq = s.seq
            if seq.request_id in failed or seq.seq_id not in emitted:
                continue
            self.spec.record(seq, len(s.spec_token_ids), emitted[seq.seq_id])
            if s.num_spec_slots and seq.status == SequenceStatus.RUNNING:
                self.kv.trim(seq)
                self.kv.cache_full_blocks(seq)
                seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)

    def _compute(self, batch: list[ScheduledSeq]) -> tuple[list, list, list, dict[str, Exception]]:
        """Run the forward and sampling for batch. If that raises, run halves of it (whole requests each) to find the
        requests that fail. Returns (seq, tokens, logprobs) per sampled sequence, (parent, child) forks,
        (seq, first position, logprobs) of prompt logprobs, and the failed requests with their errors."""
        try:
            return *self._forward(batch), {}
        except AssertionError:
            raise
        except Exception as e:
            if self.scheduler.requeue_in_step_readers(batch):  # sequences reading blocks in flight go back to
                return self._compute(batch)  # waiting (their keys may be unwritten); the rest runs again
            ids = list(dict.fromkeys(s.seq.request_id for s in batch))
            if len(ids) == 1:
                return [], [], [], {ids[0]: e}
            first = set(ids[:len(ids) // 2])
            a = self._compute([s for s in batch if s.seq.request_id in first])
            b = self._compute([s for s in batch if s.seq.request_id not in first])
            return a[0] + b[0], a[1] + b[1], a[2] + b[2], {**a[3], **b[3]}

    def _forward(self, batch: list[ScheduledSeq]) -> tuple[list, list, list]:
        """The model forward and sampling for batch. It changes nothing but KV cache contents and beams' pending
        log-probs, so it can run again on part of the batch. Returns what _sample does for the sampling sequences,
        forks and prompt logprobs (see _compute)."""
        logits = self.runner.execute(batch)
        prompt_lps = [x for s in batch if (x := self._prompt_logprobs(s)) is not None]
        first_row, r = {}, 0  # rows of logits: 1 per sampling entry, 1 + k for one verifying k proposals
        for s in batch:
            if s.samples:
                first_row[s.seq.seq_id], r = r, r + 1 + len(s.spec_token_ids)
        assert r == logits.shape[0]
        beams = [s.seq for s in batch if s.samples and self.requests[s.seq.request_id].beam is not None]
        if beams:  # beams are advanced by the beam search, from their log-probabilities
            idx = torch.tensor([first_row[b.seq_id] for b in beams], device=logits.device)
            for seq, lp in zip(beams, logits[idx].log_softmax(-1).cpu()):
                self.requests[seq.request_id].beam.pending[seq.seq_id] = lp
        entries = [s for s in batch if s.samples and self.requests[s.seq.request_id].beam is None]
        # samples waiting on a parent whose prefill just ended draw their first token from the parent's logits
        forks = [(s.seq, c) for s in entries for c in s.seq.forks]
        entries += [ScheduledSeq(c, 1) for _, c in forks]
        src = [first_row[s.seq.seq_id] + j for s in entries[:len(entries) - len(forks)]
               for j in range(1 + len(s.spec_token_ids))] + [first_row[p.seq_id] for p, _ in forks]
        if src != list(range(r)):
            logits = logits[torch.tensor(src, dtype=torch.long, device=logits.device)]
        return self._sample(logits, entries), forks, prompt_lps

    def _sample(self, logits: torch.Tensor, entries: list[ScheduledSeq]) -> list:
        """Draw every entry's rows of logits (1, or 1 + k for one verifying k proposals, in order) and verify the
        proposals. Returns (seq, tokens, their logprobs) per entry: one token, or the accepted proposals and the
        token after them."""
        # one row per sampled position: a verifying sequence's row j follows its first j proposals
        rows = [SampleRow(s.seq, tuple(s.spec_token_ids[:j])) for s in entries
                for j in range(1 + len(s.spec_token_ids))]
        rejection = [s for s in entries if s.spec_token_ids and self.spec.uses_rejection(s.seq)]
        drawn, probs = self.sampler.sample(logits, rows, want_probs=bool(rejection))
        emitted, used, r = [], [], 0  # per entry its tokens; the rows that gave them
        for s in entries:
            n = 1 + len(s.spec_token_ids)
            toks = drawn[r:r + 1] if n == 1 else \
                self.spec.verify(s, drawn[r:r + n], probs[r:r + n] if probs is not None else None,
                                 self.sampler.generator)
            emitted.append(toks)
            used += range(r, r + len(toks))
            r += n
        if len(used) < len(rows):
            logits = logits[torch.tensor(used, dtype=torch.long, device=logits.device)]
        lps = self.sampler.logprobs(logits, [rows[i] for i in used], [t for toks in emitted for t in toks])
        sampled, r = [], 0
        for s, toks in zip(entries, emitted):
            sampled.append((s.seq, toks, lps[r:r + len(toks)]))
            r += len(toks)
        return sampled

    def _prompt_logprobs(self, s: ScheduledSeq) -> tuple[Sequence, int, list[dict[int, float]]] | None:
        """The prompt logprobs that s's chunk yields and its request still lacks (a recompute after preemption
        yields none again): (seq, first prompt position, logprobs of the prompt tokens after it), or None."""
        req = self.requests[s.seq.request_id]
        if req.prompt_logprobs_done:
            return None
        have = len(req.prompt_logprobs)  # position p gives the logprob of prompt token p + 1
        start = max(s.seq.num_computed_tokens, have - 1)
        end = min(s.seq.num_computed_tokens + s.num_tokens, s.seq.num_prompt_tokens - 1)
        if start >= end:
            return None
        return s.seq, start, self.runner.prompt_logprobs(s.seq, start, end, req.params.prompt_logprobs)

    def _advance_all(self, rids: list[str], tokens: dict[str, list], failed: dict[str, Exception],
                     now: float) -> list[RequestOutput]:
        """_advance each request of rids with its tokens; the outputs. A request that raises goes into failed."""
        outs = []
        for rid in rids:
            try:
                out = self._advance(self.requests[rid], tokens.get(rid, []), now)
            except AssertionError:
                raise
            except Exception as e:
                failed[rid] = e
                continue
            if out is not None:
                outs.append(out)
        return outs

    def _advance(self, req: Request, tokens: list[tuple[Sequence, list[int], list[dict[int, float]]]],
                 now: float) -> RequestOutput | None:
        """Apply one request's new tokens (stop checks, text) or its beam step; its output, if it has one now.
        A verifying sequence's tokens are its accepted proposals, whose K/V the step computed, and then one more:
        they are appended in order until one ends the sequence, exactly where it would end without speculation."""
        for seq, toks, lps in tokens:
            for i, (tok, lp) in enumerate(zip(toks, lps)):
                req.cumulative_logprobs[seq.index] += lp[tok]
                self._append_token(seq, tok, lp if req.params.logprobs is not None else None, now)
                _note_text_end(req.text_ends[seq.index], seq)
                if seq.is_finished:
                    break
                if i < len(toks) - 1:
                    seq.num_computed_tokens += 1
        if req.beam is not None:
            if not req.beam.ready():
                return None
            self._beam_step(req, now)
            if not req.finished:
                return None
        if req.params.num_samples > req.params.n and not req.finished:
            return None  # best_of: only the final output, once the best n are known
        return self._make_output(req, now)

    def _fail_all(self, failed: dict[str, Exception]) -> list[RequestOutput]:
        self.last_step_all_failed = True
        outs = self._fail(failed)
        assert self.requests or (self.kv.pool.num_in_use == 0 and not self.scheduler.num_unfinished), \
            "a failed step left blocks or sequences behind"
        return outs

    def _fail(self, failed: dict[str, Exception]) -> list[RequestOutput]:
        """End requests that failed inside a step: every sequence of theirs leaves the scheduler and frees its
        blocks. Returns their final outputs, with `error` set."""
        outs = []
        for rid, e in failed.items():
            log.error("request %s failed inside a step; it was ended", rid, exc_info=e)
            for seq in [*self.scheduler.running, *self.scheduler.waiting, *self.scheduler.swapped]:
                if seq.request_id == rid:  # also beams forked before the failure but not yet recorded
                    self.scheduler.finish(seq, FinishReason.ABORT)
            out = self.abort_request(rid) or RequestOutput(rid, None, [], finished=True)
            out.error = f"the engine failed while running this request ({type(e).__name__})"
            for c in out.outputs:
                c.finish_reason = "error"
            outs.append(out)
        self.num_failed_requests += len(failed)
        return outs

    def _beam_step(self, req: Request, now: float) -> None:
        """Apply one beam search step: surviving beams continue or fork (sharing blocks), the others end."""
        st = req.beam
        old = list(st.beams)
        chosen = st.step()
        new: list[Sequence] = []
        taken: set[int] = set()
        for parent, _ in chosen:  # fork before any parent gets its new token
            if parent.seq_id not in taken:
                taken.add(parent.seq_id)
                new.append(parent)
                continue
            child = Sequence(req.request_id, 0, [], parent.num_prompt_tokens, parent.params, parent.max_tokens,
                             arrival_time=parent.arrival_time, status=SequenceStatus.FORK_PENDING,
                             cache_salt=parent.cache_salt)
            self.scheduler.fork(parent, child)
            new.append(child)
        for beam in old:
            beam.num_reserved_slots = 0
            if beam.seq_id not in taken:
                self.scheduler.finish(beam, FinishReason.STOP if st.done else FinishReason.ABORT)
        for seq, (_, tok) in zip(new, chosen):
            seq.token_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
        st.beams = new
        req.seqs = new or old

    def _account_kv(self) -> None:
        running = self.scheduler.running
        self.peak_running = max(self.peak_running, len(running))
        reserved = self.kv.pool.num_in_use * self.kv.block_size
        self.kv_slots_reserved += reserved
        # samples and beams share blocks: the tokens they hold can outnumber the slots behind them
        self.kv_slots_used += min(reserved, sum(s.num_computed_tokens for s in running))

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        if seq.grammar is not None:
            seq.grammar.accept(token)  # a token the grammar rejects raises before it is appended: the request fails
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
        if reason != FinishReason.STOP or seq.params.include_stop_str_in_output:
            new_text = detokenize_incrementally(self.tokenizer, seq, final=reason is not None)
            seq.output_text += new_text
            if reason != FinishReason.STOP and find_stop_string(seq, len(new_text)):
                reason = FinishReason.STOP
        if reason is None and seq.grammar is not None and seq.grammar.done:  # nothing but EOS may follow
            seq.output_text += detokenize_incrementally(self.tokenizer, seq, final=True)
            reason = FinishReason.STOP
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _beam_output(self, req: Request) -> list[CompletionOutput]:
        outs = []
        for i, h in enumerate(req.beam.results(req.params.n)):
            text = self.tokenizer.decode(h.token_ids, skip_special_tokens=req.params.skip_special_tokens)
            n = len(h.token_ids)
            outs.append(CompletionOutput(index=i, text=text, token_ids=h.token_ids,
                                         finish_reason="stop" if h.hit_eos else "length", num_new_tokens=n,
                                         new_text=text, num_emitted_tokens=n,
                                         cumulative_logprob=h.score * n ** req.params.length_penalty))
        return outs

    def _best_of_output(self, req: Request) -> list[CompletionOutput]:
        """The n samples with the highest cumulative logprob (ties: the lower sample index), best first."""
        best = sorted(range(len(req.seqs)), key=lambda i: -req.cumulative_logprobs[i])[:req.params.n]
        outs = []
        for rank, i in enumerate(best):
            seq = req.seqs[i]
            outs.append(CompletionOutput(
                index=rank, text=seq.output_text, token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                logprobs=seq.logprobs if req.params.logprobs is not None else None,
                num_new_tokens=seq.num_output_tokens, new_text=seq.output_text,
                cumulative_logprob=req.cumulative_logprobs[i], num_emitted_tokens=seq.num_output_tokens))
        return outs

    def _make_output(self, req: Request, now: float) -> RequestOutput:
        if req.beam is not None:
            out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                                self._beam_output(req) if req.finished else [], finished=req.finished,
                                prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs_done else None)
            out.num_generated_tokens = sum(len(c.token_ids) for c in out.outputs)  # the returned beams
            if out.finished:
                out.metrics["e2e_s"] = now - req.arrival_time
                out.metrics["arrival_time"] = req.arrival_time  # time.monotonic(): anchors the phases (tracing)
                del self.requests[req.request_id]
            return out
        if req.params.num_samples > req.params.n:
            outs = self._best_of_output(req) if req.finished else []
        else:
            outs = [self._sample_output(req, i, seq) for i, seq in enumerate(req.seqs)]
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished=req.finished,
                            prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs_done else None,
                            num_generated_tokens=sum(s.num_output_tokens for s in req.seqs))
        first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        if first:
            out.metrics["ttft_s"] = min(first) - req.arrival_time
        scheduled = [s.first_scheduled_time for s in req.seqs if s.first_scheduled_time is not None]
        if scheduled:
            out.metrics["queue_s"] = min(scheduled) - req.arrival_time
        if out.finished:
            out.metrics["e2e_s"] = now - req.arrival_time
            out.metrics["arrival_time"] = req.arrival_time  # time.monotonic(): anchors the phases (tracing)
            del self.requests[req.request_id]
        return out

    def _sample_output(self, req: Request, i: int, seq: Sequence) -> CompletionOutput:
        """Sample i's output; new_text is what it adds since the last output, less the tail a stop string may still
        be forming (held back until it cannot be one), and num_emitted_tokens counts the tokens within the text
        handed out so far, so that a stream sends each token's logprobs with its text."""
        hold = max((len(s) for s in req.params.stop_list), default=1) - 1
        end = len(seq.output_text) if seq.is_finished else max(req.emitted_text[i], len(seq.output_text) - hold)
        n_tok = seq.num_output_tokens
        emitted = n_tok if seq.is_finished else bisect.bisect_right(req.text_ends[i], end)
        out = CompletionOutput(
            index=i, text=seq.output_text, token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            logprobs=seq.logprobs if req.params.logprobs is not None else None,
            num_new_tokens=n_tok - req.emitted_tokens[i], new_text=seq.output_text[req.emitted_text[i]:end],
            cumulative_logprob=req.cumulative_logprobs[i], num_emitted_tokens=emitted)
        req.emitted_text[i], req.emitted_tokens[i] = end, n_tok
        return out

    def stats(self) -> dict[str, float | int | list[int]]:
        pool = self.kv.pool
        spec = self.spec.stats.as_dict() if self.spec is not None else {}
        return spec | {
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_in_use": pool.num_in_use,
            "kv_blocks_peak": pool.peak_in_use,
            "kv_cache_usage": self.kv.usage,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefill_backlog_tokens": self.scheduler.prefill_backlog_tokens(),
            "peak_running": self.peak_running,
            "kv_slots_reserved": self.kv_slots_reserved,
            "kv_slots_used": self.kv_slots_used,
            "kv_waste_ratio": 1 - self.kv_slots_used / self.kv_slots_reserved if self.kv_slots_reserved else 0.0,
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "num_cow_copies": self.kv.num_cow_copies,
            "num_failed_requests": self.num_failed_requests,
            "num_preemptions_recompute": self.scheduler.preemptions_by_mode["recompute"],
            "num_preemptions_swap": self.scheduler.preemptions_by_mode["swap"],
            "num_swapped": len(self.scheduler.swapped),
            "num_swapped_out_blocks": self.kv.host_pool.num_in_use if self.kv.host_pool else 0,
            "blocks_swapped_out": self.kv.blocks_swapped_out,
            "blocks_swapped_in": self.kv.blocks_swapped_in,
        }
