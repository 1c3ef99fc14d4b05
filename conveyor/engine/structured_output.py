"""Structured outputs: a grammar per request, applied as a token mask to each constrained row of a step's logits.

The grammar engine is xgrammar (chosen with bench/grammar_engines.py, on this project's 2-core VM): it takes every
constraint kind (JSON schema, regex, EBNF/GBNF and Lark grammars, choices as a grammar alternation, any JSON), its
masks cost 1-2 us per token on SmolLM2's 49,152-token vocabulary (llguidance: 17-44 us median, 0.5-0.8 ms p99;
outlines-core has no context-free grammars and rejected a valid string for `[0-9]{1,3}(\\.[0-9])?`), it fills the
bitmasks of a whole batch in one call, and compiling a schema takes 1-12 ms (cached here; llguidance compiles
lazily in ~1-2 ms, outlines-core takes 26-237 ms). Its compiler releases the GIL. A mask's cost depends on the
grammar, not only on the vocabulary: a large bounded repetition such as `([A-Za-z]{1,12}[ ,.]){1000}` takes ~30 ms
per mask on SmolLM2's vocabulary (the compile deadline below does not bound that; max_tokens does).

The token-mask approach (XGrammar, Dong et al. 2024; llguidance): a pushdown automaton over bytes is advanced by
each sampled token; before sampling, the automaton says which vocabulary tokens may come next, as a bitmask (bit j of
int32 word j // 32 is token j), and the other tokens' logits become -inf. xgrammar precomputes, per grammar
position, the tokens whose acceptance does not depend on the parser stack, so a step only checks the few others.

Design:
- `GrammarCompiler` (one per engine) compiles a StructuredOutputsParams into an xgrammar CompiledGrammar through a
  bounded LRU cache keyed by `StructuredOutputsParams.key()`. Compilation runs on a small pool of worker threads
  with a deadline: a constraint that does not compile, or not within the deadline, is a ValueError naming the
  problem (the server maps it to a 400); a too-slow key is remembered and refused at once afterwards. The server
  compiles in a worker thread before it queues a request (AsyncEngine), so the engine loop never compiles.
- `GrammarState` (one per sequence, on `Sequence.grammar`) is the matcher for that sequence's output so far. The
  engine advances it when it appends a token (never inside the forward, which may run again on part of a batch);
  it lives with the sequence's tokens, so recompute and swap preemption keep it as it is. Each of n samples has its
  own state.
- `apply_grammar_masks` fills one bitmask for all constrained rows of a step (one call) and adds it, as 0 / -inf
  through a byte lookup table, to those rows in place (one op on the logits' device; rows without a grammar are
  not touched, and a step without one does no mask work at all).
  Tokens the tokenizer does not have (model vocabulary padding) and special tokens other than EOS are never allowed.
  When the grammar is complete and allows nothing but EOS, the sequence finishes with "stop" at once (without
  sampling the EOS); where it may go on or end (`[0-9]+`), EOS is one of the allowed tokens.
- The sampler applies the mask after min_tokens, penalties and logit_bias; a logit_bias cannot force a token the
  grammar bans, and where the grammar allows only tokens that min_tokens bans (EOS, stop_token_ids), the grammar
  wins. Logprobs stay those of the raw distribution.

JSON is generated in json.dumps' default layout (", " and ": " separators, no other whitespace), so a weak or random
model cannot spend its tokens on whitespace, and no token with a raw control character (bytes 0x00-0x1f) is ever
allowed in it: JSON has none outside string escapes, but xgrammar 0.2.9's rule for a string with a maxLength lets
them through (json.loads then rejects the output); a schema's properties are generated in their schema order, and in
strict mode (the default, as OpenAI's `strict: true`) no property or item beyond the schema's is generated.
`json_object` is any JSON object. Grammars with `::=` rules are read as GBNF (xgrammar's EBNF), others as Lark.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar as xgr

from conveyor.engine.json_schema_support import check_json_schema
from conveyor.sampling_params import StructuredOutputsParams

_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[06:01:42] /project/cpp/regex_converter.cc:94: "


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. token_filter: an int32 bitmask row ANDed with every mask the grammar yields (None: no
    filter), for tokens the grammar engine would allow wrongly."""
    compiled: xgr.CompiledGrammar
    token_filter: torch.Tensor | None = None


class CompileBusy(Exception):
    """Every grammar worker of the constraint's lane is busy and its queue is full, or the constraint waited in that
    queue past compile_queue_timeout_s: nothing is wrong with the request, try again later (HTTP 503)."""


@dataclass
class GrammarConfig:
    """cache_size: compiled grammars kept (LRU), holding at most cache_bytes (the newest is always kept);
    compile_timeout_s: longest a compilation may run (from when a worker starts it, not counting its wait in the
    queue) before the request is refused as too complex; compile_threads: worker threads compiling large constraints
    at once (a refused compilation still runs to its end on its worker, so this bounds the CPU that hostile grammars
    can take); small_compile_threads: a separate lane for constraints of at most small_constraint_chars characters
    (most JSON schemas, regexes and choices), so that they are not starved behind slow large grammars;
    compile_queue_size: compilations a lane holds waiting for a worker before it refuses more with CompileBusy;
    compile_queue_timeout_s: longest a request waits for its compilation to start before CompileBusy."""
    cache_size: int = 256
    cache_bytes: int = 256 << 20
    compile_timeout_s: float = 10.0
    compile_threads: int = 2
    small_compile_threads: int = 1
    small_constraint_chars: int = 4096
    compile_queue_size: int = 128  # a bound on memory (each holds a constraint of <= 256 KiB); the wait is the limit
    compile_queue_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("cache_size", "cache_bytes", "compile_threads", "small_compile_threads",
                     "small_constraint_chars", "compile_queue_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("compile_timeout_s", "compile_queue_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be positive, got {v!r}")


@dataclass
class _Lane:
    """A pool of compile workers and the number of its compilations not started yet."""
    pool: concurrent.futures.ThreadPoolExecutor
    queued: int = 0


@dataclass(eq=False)
class _Job:
    """One compilation, shared by every request for its key. started: set to the monotonic start time when a
    worker picks it up; future: the executor's (the Grammar, or the ValueError); waiters: requests waiting on it."""
    key: str
    lane: _Lane
    started: concurrent.futures.Future
    future: concurrent.futures.Future | None = None
    waiters: int = 0


class GrammarCompiler:
    """Compiles structured output constraints for one tokenizer and model vocabulary; thread-safe.

    A compilation is shared by all requests for its key, runs on its lane's pool (small or large constraints), and is
    cancelled if every request waiting on it has left before it started. A request is refused as too complex only
    when its key's compilation has run for compile_timeout_s; the compilation still runs to its end and, if it
    succeeds, its grammar is cached and served like any other (a key is never refused for good). A full lane queue,
    or a wait for a worker past compile_queue_timeout_s, is CompileBusy (retryable), never blamed on the request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int],
                 config: GrammarConfig | None = None) -> None:
        """vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary: padding)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.config = config or GrammarConfig()
        self._lock = threading.RLock()  # a done future's callback runs at once, in the thread that holds it
        self._xgr_compiler: xgr.GrammarCompiler | None = None  # built on first use (reads the whole vocabulary)
        self._no_control_chars: torch.Tensor | None = None  # the JSON kinds' token filter, built with the compiler
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_bytes = 0
        self._pending: dict[str, _Job] = {}
        self._too_slow: set[str] = set()  # pending keys whose compilation has run past the deadline
        self._errors: OrderedDict[str, str] = OrderedDict()  # keys that did not compile: their error (LRU)
        self._large = _Lane(self._executor(self.config.compile_threads))
        self._small = _Lane(self._executor(self.config.small_compile_threads))
        self.num_compiled = 0  # compilations run (cache misses), for tests and stats

    @staticmethod
    def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="conveyor-grammar")

    def compile(self, so: StructuredOutputsParams) -> Grammar:
        """The compiled grammar of so, from the cache or compiled now (blocking). Raises ValueError for a constraint
        that does not compile or whose compilation has run past compile_timeout_s, CompileBusy when no worker could
        start it in time."""
        job = self._acquire(so)
        if isinstance(job, Grammar):
            return job
        try:
            try:
                start = job.started.result(timeout=self.config.compile_queue_timeout_s)
            except concurrent.futures.TimeoutError:
                raise self._busy(so) from None
            try:
                return job.future.result(timeout=self._remaining(start))
            except concurrent.futures.TimeoutError:
                raise self._timed_out(so, job) from None
        finally:
            self._release(job)

    async def compile_async(self, so: StructuredOutputsParams) -> Grammar:
        """compile() for an asyncio caller, without holding a thread while it waits: a cancelled caller stops
        waiting at once, and a compilation that nobody waits for any more and has not started is cancelled."""
        job = self._acquire(so)
        if isinstance(job, Grammar):
            return job
        try:
            try:
                start = await _wait_future(job.started, self.config.compile_queue_timeout_s)
            except TimeoutError:
                raise self._busy(so) from None
            try:
                return await _wait_future(job.future, self._remaining(start))
            except TimeoutError:
                raise self._timed_out(so, job) from None
        finally:
            self._release(job)

    def keep(self, so: StructuredOutputsParams, compiled: Grammar) -> None:
        """Put a grammar compiled earlier (in another thread) back in the cache, so compile() finds it."""
        with self._lock:
            self._insert(so.key(), compiled)

    def _lane(self, so: StructuredOutputsParams) -> _Lane:
        return self._small if len(so.key()) <= self.config.small_constraint_chars else self._large

    def _acquire(self, so: StructuredOutputsParams) -> Grammar | _Job:
        """The cached grammar of so, or its compilation (started or queued now) with one more waiter. Raises
        ValueError for a key known not to compile or running past its deadline, CompileBusy for a full queue."""
        if so.kind == "json":
            check_json_schema(so.json)
        key = so.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            if key in self._errors:
                self._errors.move_to_end(key)
                raise ValueError(self._errors[key])
            if key in self._too_slow:
                raise ValueError(self._too_slow_message(so))
            job = self._pending.get(key)
            if job is None:
                lane = self._lane(so)
                if lane.queued >= self.config.compile_queue_size:
                    raise self._busy(so)
                job = _Job(key, lane, concurrent.futures.Future())
                lane.queued += 1
                job.future = lane.pool.submit(self._run, job, so)
                self._pending[key] = job
                job.future.add_done_callback(lambda f, job=job: self._finished(job))
            job.waiters += 1
            return job

    def _release(self, job: _Job) -> None:
        """A waiter has left; the last one cancels a compilation that has not started."""
        with self._lock:
            job.waiters -= 1
            if job.waiters == 0 and not job.started.done():
                job.future.cancel()  # fails (harmlessly) if a worker has just taken it

    def _run(self, job: _Job, so: StructuredOutputsParams) -> Grammar:
        with self._lock:
            job.lane.queued -= 1
            job.started.set_result(time.monotonic())
        return self._compile(so)

    def _remaining(self, start: float) -> float:
        return max(0.0, start + self.config.compile_timeout_s - time.monotonic())

    def _busy(self, so: StructuredOutputsParams) -> CompileBusy:
        return CompileBusy(f"the structured_outputs.{so.kind} compiler is busy: every worker is taken and "
                           f"{self.config.compile_queue_size} compilations are queued or the queue is slower than "
                           f"{self.config.compile_queue_timeout_s:g} s; try again later")

    def _timed_out(self, so: StructuredOutputsParams, job: _Job) -> ValueError:
        """The error for a waiter whose key's compilation ran past the deadline; the key is refused at once until
        that compilation ends (then its grammar, or its error, is what the key gets)."""
        with self._lock:
            if self._pending.get(job.key) is job:
                self._too_slow.add(job.key)
        return ValueError(self._too_slow_message(so))

    def _too_slow_message(self, so: StructuredOutputsParams) -> str:
        return (f"structured_outputs.{so.kind} is too complex: it did not compile within "
                f"{self.config.compile_timeout_s:g} s")

    def _finished(self, job: _Job) -> None:
        fut = job.future
        with self._lock:
            if self._pending.get(job.key) is job:
                del self._pending[job.key]
            self._too_slow.discard(job.key)
            if fut.cancelled():
                job.lane.queued -= 1
                return
            self.num_compiled += 1
            error = fut.exception()
            if error is None:
                self._insert(job.key, fut.result())
            elif isinstance(error, ValueError):
                self._errors[job.key] = str(error)
                while len(self._errors) > self.config.cache_size:
                    self._errors.popitem(last=False)

    def _insert(self, key: str, compiled: Grammar) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= old.compiled.memory_size_bytes
        self._cache[key] = compiled
        self._cache_bytes += compiled.compiled.memory_size_bytes
        while len(self._cache) > 1 and (len(self._cache) > self.config.cache_size
                                        or self._cache_bytes > self.config.cache_bytes):
            self._cache_bytes -= self._cache.popitem(last=False)[1].compiled.memory_size_bytes

    def _compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._xgr_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=max(self.vocab_size, len(self.tokenizer)),
                    stop_token_ids=self.eos_token_ids)
                self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                self._no_control_chars = _token_filter(info, lambda b: not any(c < 0x20 for c in b))
            return self._xgr_compiler

    def _compile(self, so: StructuredOutputsParams) -> Grammar:
        compiled = self._compile_xgr(so)
        grammar = Grammar(compiled, self._no_control_chars if so.kind in ("json", "json_object") else None)
        if not GrammarState(grammar).allowed().any():  # e.g. a character class of no character
            raise ValueError(f"structured_outputs.{so.kind} matches no output: no token can start it")
        return grammar

    def _compile_xgr(self, so: StructuredOutputsParams) -> xgr.CompiledGrammar:
        c = self._compiler()
        try:
            match so.kind:
                case "json":
                    if so.json is False:
                        raise ValueError("the schema false matches nothing")
                    return c.compile_json_schema(json.dumps(so.json), any_whitespace=False)
                case "json_object":
                    return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
                case "regex":
                    return c.compile_regex(so.regex)
                case "choice":
                    return c.compile_grammar(choice_grammar(so.choice))
                case "grammar":
                    return c.compile_grammar(so.grammar) if "::=" in so.grammar else c.compile_lark(so.grammar)
        except Exception as e:  # xgrammar's parse and conversion errors, or what a constraint makes it raise
            msg = _XGR_PREFIX.sub("", str(e).strip()).splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"structured_outputs.{so.kind} is not valid: {msg[:500]}") from None
        raise AssertionError(f"unknown structured output kind {so.kind}")


async def _wait_future(fut: concurrent.futures.Future, timeout: float):
    """fut's result, awaited at most timeout seconds (TimeoutError); cancelling the awaiting task or timing out
    leaves fut itself alone (its owner decides whether to cancel it)."""
    waited = asyncio.wrap_future(fut)
    waited.add_done_callback(lambda f: f.cancelled() or f.exception())  # an error nobody awaits any more is not logged
    return await asyncio.wait_for(asyncio.shield(waited), timeout)


def _token_filter(info: xgr.TokenizerInfo, keep) -> torch.Tensor:
    """An int32 bitmask row over info's vocabulary: the tokens whose bytes keep(bytes) accepts, and the stop tokens."""
    ok = torch.tensor([keep(b) for b in info.decoded_vocab] + [False] * (info.vocab_size - len(info.decoded_vocab)))
    ok[info.stop_token_ids] = True
    return _pack(ok)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """The int32 bitmask row of a bool tensor (bit j % 32 of word j // 32 is bits[j]); the inverse of _unpack."""
    words = torch.zeros((bits.numel() + 31) // 32 * 32, dtype=torch.int64)
    words[:bits.numel()] = bits.long()
    words = (words.view(-1, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def choice_grammar(choices: list[str]) -> str:
    """A GBNF grammar whose language is exactly the given strings (JSON string escapes are GBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarState:
    """One sequence's position in its grammar: the output so far, as the grammar's matcher has accepted it."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.token_filter = grammar.token_filter
        self.vocab_size = grammar.compiled.tokenizer_info.vocab_size  # the logits' width, or the tokenizer's if wider
        self.done = False  # the grammar allows nothing more but EOS: the sequence should end

    def accept(self, token: int) -> None:
        """Advance over a sampled token. Raises ValueError if the grammar does not allow it (the sampler's mask
        makes that a bug, or a token forced past the grammar's end)."""
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the structured output's grammar here")
        self.done = self.matcher.is_terminated() or (self.matcher.is_completed() and self._only_eos())

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many leading proposals (speculative decoding) the grammar allows in a row; none after one that ends
        it (a stop token). The matcher is left as it was."""
        n = 0
        while n < len(drafts) and not self.matcher.is_terminated() and self.matcher.accept_token(drafts[n]):
            n += 1
        if n:
            self.matcher.rollback(n)
        return n

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS among them where it may end)."""
        mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(mask)
        if self.token_filter is not None:
            mask[0] &= self.token_filter
        return _unpack(mask[0], self.vocab_size)

    def _only_eos(self) -> bool:
        allowed = self.allowed()
        allowed[self.matcher.stop_token_ids] = False
        return not bool(allowed.any())


def _bit(j: int) -> int:
    """Bit j (0..31) of an int32 bitmask word, as a signed int32 value."""
    return (1 << j) - (1 << 32 if j == 31 else 0)


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """Bool tensor [n] of the bits of an int32 bitmask row (bit j % 32 of word j // 32 is token j)."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((words[:, None] >> shifts) & 1).flatten()[:n].bool()


@functools.cache
def _batch_matcher() -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher(max_threads="auto")  # half the cores: the fill runs while torch waits


@functools.cache
def _byte_bias(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: for each value of a bitmask byte, 0 for its set bits and -inf for the others."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf")).to(device)


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState],
                        drafts: list[tuple[int, ...]] | None = None) -> None:
    """Set to -inf, in place, every logit of logits[rows[i]] that states[i]'s grammar does not allow next, after
    drafts[i] (speculative proposals the row's position follows; the grammar must allow them, see valid_prefix).

    logits: [batch, vocab] float32 on CPU or CUDA. A bitmask [len(rows), ceil(vocab / 32)] int32 is filled for all
    rows in one call (xgrammar, on CPU), turned into an additive mask of 0 / -inf by a byte lookup table (one
    embedding op, on logits' device) and added in one index_add_; the other rows are left as they are. This is about
    twice as fast as xgrammar's CPU kernel on SmolLM2's vocabulary, and device-agnostic."""
    assert len(rows) == len(states) and rows and sys.byteorder == "little"
    bitmask = xgr.allocate_token_bitmask(len(rows), states[0].vocab_size)
    plain = [i for i in range(len(rows)) if not drafts or not drafts[i]]
    if plain:
        _batch_matcher().batch_fill_next_token_bitmask([states[i].matcher for i in plain], bitmask, plain)
    for i in range(len(rows)):
        if drafts and drafts[i]:  # the matcher advanced over the proposals, then put back
            m = states[i].matcher
            for t in drafts[i]:
                assert m.accept_token(t), "a proposal the grammar rejects reached the sampler"
            if m.is_terminated():  # a proposal ended the grammar: the sequence ends there, this row is never used
                bitmask[i] = 0
                for t in m.stop_token_ids:
                    bitmask[i, t // 32] |= _bit(t % 32)
            else:
                m.fill_next_token_bitmask(bitmask, i)
            m.rollback(len(drafts[i]))
    filtered = [i for i, s in enumerate(states) if s.token_filter is not None]
    if filtered:
        bitmask[filtered] &= torch.stack([states[i].token_filter for i in filtered])
    # byte k of int32 word w holds the bits of tokens 32 w + 8 k ... 32 w + 8 k + 7 (little-endian)
    words = bitmask.to(logits.device, non_blocking=True).view(torch.uint8).int()
    bias = torch.nn.functional.embedding(words, _byte_bias(logits.device)).view(len(rows), -1)
    assert bias.shape[1] >= logits.shape[1]
    logits.index_add_(0, torch.tensor(rows, device=logits.device), bias[:, :logits.shape[1]])
