"""Runs the engine loop on its own thread so model compute never blocks the asyncio event loop.

The event loop talks to the engine thread through a command queue (add, abort); the engine thread hands each step's
outputs back with one `call_soon_threadsafe` per step. Requests are validated (and tokenized) before they are queued,
so a bad request fails at once, before any response header is sent. A structured output's grammar is compiled first,
on the grammar compiler's workers (awaited without holding a thread; a busy compiler is EngineOverloaded), then
validation runs in a worker thread; the compiled grammar travels with the queued add, so the engine loop never
compiles.

Failures: a request that fails inside a step is ended by the engine and its client gets RequestFailed; the loop goes
on. `max_step_failures` steps in a row in which every request failed (a broken device, not a bad request), or any
error outside a step, stop the loop for good: every open request gets EngineDead and `on_dead` is called, so the
process can exit and be restarted by its supervisor.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor.engine.engine import Engine, Prompt
from conveyor.engine.structured_output import CompileBusy
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams

if TYPE_CHECKING:
    from conveyor.engine.structured_output import Grammar

log = logging.getLogger("conveyor.async_engine")


class EngineOverloaded(Exception):
    """The waiting queue is full, or the grammar compiler is busy: try again later (HTTP 503)."""


class EngineDead(Exception):
    """The engine loop has stopped or failed (HTTP 503)."""


class RequestFailed(Exception):
    """The engine failed while running this request (a step raised); it was ended and the engine serves on."""


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    text: str | None
    params: SamplingParams
    cache_salt: str | None
    grammar: Grammar | None = None  # params.structured_outputs compiled


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting_requests: int = 1024,
                 on_step: Callable[[Engine, list[RequestOutput], float | None], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None, max_step_failures: int = 5) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_step = on_step
        self.on_dead = on_dead  # called on the engine thread once the loop has failed for good
        self.max_step_failures = max_step_failures
        self._step_failures = 0  # consecutive
        self._reserved = 0  # requests past the waiting-queue check that are not queued yet (being validated)
        self._cmds: queue.SimpleQueue[_Add | str] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.heartbeat = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stop.is_set()

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._cmds.qsize() + self._reserved

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs until it finishes. Raises ValueError for a request that can never
        be served, EngineOverloaded when the waiting queue is full, RequestFailed when a step running it failed,
        EngineDead when the loop is gone. Leaving the iteration early (client gone, task cancelled) aborts the
        request in the engine."""
        if not self.alive:
            raise EngineDead("the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.num_waiting >= self.max_waiting_requests:
            raise EngineOverloaded(f"the waiting queue is full ({self.max_waiting_requests} requests)")
        # from here the request counts as waiting and owns its id, before any await lets another request check
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._reserved += 1
        queued = False
        try:
            grammar = await self._compile(params)
            text, ids = await asyncio.to_thread(self.engine.validate, prompt, params, cache_salt)
            self._cmds.put(_Add(request_id, ids, text, params, cache_salt, grammar))
            queued = True
        finally:
            self._reserved -= 1
            if not queued:
                self._streams.pop(request_id, None)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def _compile(self, params: SamplingParams) -> Grammar | None:
        """The structured output's grammar, compiled on the grammar workers without holding a thread while it waits
        (a client that leaves stops waiting at once, and a compilation nobody waits for is dropped before it starts),
        so that validate (in a worker thread) finds it cached. A busy compiler is EngineOverloaded (retryable)."""
        if not isinstance(params, SamplingParams) or params.structured_outputs is None:
            return None  # validate says what is wrong with params
        params.validate()
        try:
            return await self.engine.grammars.compile_async(params.structured_outputs)
        except CompileBusy as e:
            raise EngineOverloaded(str(e)) from None

    def abort(self, request_id: str) -> None:
        self._cmds.put(request_id)
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                aborted = self._drain_commands()
                if aborted and self.on_step:
                    self.on_step(self.engine, aborted, None)  # None: no step ran
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                t0 = time.monotonic()
                outs = self.engine.step()
                if not self.engine.last_step_num_seqs:  # a batching mode is waiting for its batch to fill
                    self._wake.wait(timeout=0.002)
                    self._wake.clear()
                if outs:
                    self._loop.call_soon_threadsafe(self._deliver, outs)
                if self.on_step:
                    self.on_step(self.engine, outs, time.monotonic() - t0)
                self._count_failures()
        except BaseException as e:  # the loop is dead: fail every open request rather than hang it
            log.exception("engine loop failed")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineDead(f"engine loop failed ({type(e).__name__})"))
            if self.on_dead:
                self.on_dead(e)

    def _count_failures(self) -> None:
        """Raises EngineDead after max_step_failures steps in a row in which every request failed."""
        if self.engine.last_step_all_failed:
            self._step_failures += 1
            if self._step_failures >= self.max_step_failures:
                raise EngineDead(f"{self._step_failures} engine steps in a row failed every request they ran")
        elif self.engine.last_step_num_seqs:
            self._step_failures = 0

    def _drain_commands(self) -> list[RequestOutput]:
        """Apply queued adds and aborts; returns the final outputs of aborted requests."""
        aborted = []
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return aborted
            if isinstance(cmd, str):
                out = self.engine.abort_request(cmd)
                if out is not None:
                    aborted.append(out)
                continue
            if cmd.grammar is not None:  # in case the cache dropped it meanwhile: add_request must not compile
                self.engine.grammars.keep(cmd.params.structured_outputs, cmd.grammar)
            try:
                self.engine.add_request(cmd.request_id, {"prompt_token_ids": cmd.prompt}, cmd.params,
                                        prompt_text=cmd.text, cache_salt=cmd.cache_salt)
            except ValueError as e:  # e.g. the id was reused while the first request was still being aborted
                self._loop.call_soon_threadsafe(self._deliver_error, cmd.request_id, e)
            except Exception as e:  # validated already, so a bug; this request fails, the others go on
                log.error("adding a request failed", exc_info=e)
                if cmd.request_id in self.engine.requests:
                    self.engine.abort_request(cmd.request_id)
                self._loop.call_soon_threadsafe(self._deliver_error, cmd.request_id,
                                                RequestFailed(f"the engine could not add this request "
                                                              f"({type(e).__name__})"))

    # ---- back on the event loop --------------------------------------------------------------------------------
    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(RequestFailed(out.error) if out.error else out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
