"""`conveyor run-batch`: a file of OpenAI batch requests answered on the local engine, as vLLM's `run-batch`.

Input: OpenAI's batch JSONL, one `{"custom_id", "method": "POST", "url", "body"}` per line, url one of ENDPOINTS.
Output: one line per input line in OpenAI's batch output shape, `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}`, or `"response": null, "error": {"code", "message"}` for a line that is not
a request. Each request runs through the HTTP server's own app (conveyor.server.api.Server) in-process, over an ASGI
transport, so that it means exactly what it means to `conveyor serve`. Lines run concurrently, answers are appended
and flushed as they arrive (not in input order), and a rerun with the same -o skips the lines already answered.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_LINE_FIELDS = {"custom_id", "method", "url", "body"}
_OVERLOAD_RETRIES = 120  # an overloaded answer (the grammar compiler is busy) is retried this often, once a second


class BatchFileError(ValueError):
    """A problem with a whole file (unreadable input, unwritable output, duplicate custom_ids): nothing runs."""


@dataclass(frozen=True)
class Request:
    """One valid line: POST body to url."""
    line_no: int
    custom_id: str
    url: str
    body: dict


@dataclass(frozen=True)
class BadLine:
    """A line that is not a request; custom_id None when it has none to answer under."""
    line_no: int
    custom_id: str | None
    code: str
    message: str


# ---- input ---------------------------------------------------------------------------------------------------------
def read_input(path: str) -> list[str]:
    """The lines of -i (`-` is stdin; a UTF-8 BOM is dropped). Raises BatchFileError when it cannot be read or is
    not UTF-8."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchFileError(f"cannot read -i {path}: {_reason(e)}") from None
    return text.split("\n")  # not splitlines(): a JSON string may hold U+2028 and other line separators


def parse_lines(lines: Iterable[str]) -> list[Request | BadLine]:
    """Each non-blank line (numbered from 1) as a Request or a BadLine, in order. Raises BatchFileError when a
    custom_id is used twice (answers are matched to requests by it, here and on resume)."""
    items, first_seen = [], {}
    for no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        item = parse_line(no, text)
        cid = item.custom_id
        if cid is not None and cid in first_seen:
            raise BatchFileError(f"custom_id {cid[:100]!r} is used on lines {first_seen[cid]} and {no}; "
                                 f"custom_ids must be unique")
        if cid is not None:
            first_seen[cid] = no
        items.append(item)
    return items


def parse_line(no: int, text: str) -> Request | BadLine:
    """One input line as a Request, or a BadLine saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
        return BadLine(no, None, "invalid_json", f"line {no}: not valid JSON ({_reason(e)})")
    if not isinstance(obj, dict):
        return BadLine(no, None, "invalid_request", f"line {no}: not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return BadLine(no, None, "missing_custom_id", f"line {no}: custom_id must be a non-empty string")
    problem = _line_problem(obj)
    if problem is not None:
        code, message = problem
        return BadLine(no, cid, code, f"line {no}: {message}")
    return Request(no, cid, obj["url"], obj["body"])


def _line_problem(obj: dict) -> tuple[str, str] | None:
    """(error code, message) of a line with a custom_id that still is not a request, else None."""
    unknown = sorted(set(obj) - _LINE_FIELDS)
    if unknown:
        return "invalid_request", f"unknown field {unknown[0][:100]!r} (a line has custom_id, method, url, body)"
    if obj.get("method") != "POST":
        return "invalid_method", f"method must be \"POST\", not {str(obj.get('method'))[:20]!r}"
    if obj.get("url") not in ENDPOINTS:
        return "invalid_url", f"url {str(obj.get('url'))[:100]!r} is not supported; use one of {', '.join(ENDPOINTS)}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "body must be a JSON object (the request)"
    if body.get("stream") not in (None, False):
        return "invalid_body", "stream is not supported in a batch (every answer is one response)"
    return None


# ---- output and resume ---------------------------------------------------------------------------------------------
@dataclass
class Answered:
    """What an earlier run wrote to -o: the custom_ids answered and how many lines without one."""
    custom_ids: set[str]
    anonymous: int


def prepare_output(path: str, input_path: str) -> tuple[Answered, BinaryIO]:
    """Open -o for appending (created if missing), locked against another run-batch on the same file, and read what
    it already answers. A torn last line (a run killed while writing it) is cut off, so that it is written again.
    Returns what is answered and the open, locked file (for Writer). Raises BatchFileError when -o cannot be
    written, is the input, is being written by another run, or holds a line that run-batch did not write."""
    if input_path != "-" and os.path.exists(path) and os.path.exists(input_path) and \
            os.path.samefile(path, input_path):
        raise BatchFileError(f"-o {path} is the input file")
    try:
        f = open(path, "ab+")
    except OSError as e:
        raise BatchFileError(f"cannot write -o {path}: {_reason(e)}") from None
    try:
        _lock(f, path)
        f.seek(0)
        done, end = _scan_output(f, path)
        f.truncate(end)
    except OSError as e:
        f.close()
        raise BatchFileError(f"cannot write -o {path}: {_reason(e)}") from None
    except BatchFileError:
        f.close()
        raise
    return done, f


def _lock(f: BinaryIO, path: str) -> None:
    """An exclusive lock on -o for this run (released when f closes): two runs appending to one file would answer
    each line twice."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BatchFileError(f"-o {path} is being written by another run-batch; wait for it to end or give "
                             f"another -o") from None


def _scan_output(f, path: str) -> tuple[Answered, int]:
    """(what the lines answer, the byte offset after the last whole line)."""
    done, end = Answered(set(), 0), 0
    lines = f.read().split(b"\n")
    for no, raw in enumerate(lines[:-1], 1):  # the part after the last newline is torn (or empty)
        cid = _answered_id(raw)
        if cid is False:
            raise BatchFileError(f"-o {path}: line {no} is not a run-batch output line; give another -o")
        if cid is None:
            done.anonymous += 1
        else:
            done.custom_ids.add(cid)
        end += len(raw) + 1
    return done, end


def _answered_id(raw: bytes) -> str | None | bool:
    """The custom_id of an output line (None: a line that had none), False when it is not an output line."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    cid = obj.get("custom_id", False) if isinstance(obj, dict) else False
    return cid if cid is None or isinstance(cid, str) else False


def pending(items: list[Request | BadLine], done: Answered) -> list[Request | BadLine]:
    """The items not answered yet. Lines without a custom_id are written first, in input order, so the first
    done.anonymous of them are the ones answered."""
    todo, anonymous = [], 0
    for item in items:
        if item.custom_id is None:
            anonymous += 1
            if anonymous <= done.anonymous:
                continue
        elif item.custom_id in done.custom_ids:
            continue
        todo.append(item)
    return todo


class Writer:
    """Appends one JSON line per answer to -o, flushed at once (a kill loses at most the lines in flight)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f  # prepare_output's file, opened for appending and locked

    def write(self, record: dict) -> None:
        try:
            text = json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # text that is not valid UTF-8 (a lone surrogate): escaped, still valid JSON
            text = json.dumps(record).encode()
        self.f.write(text + b"\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def error_record(line: BadLine) -> dict:
    """The output line of a line that is not a request."""
    return {"id": _batch_request_id(), "custom_id": line.custom_id, "response": None,
            "error": {"code": line.code, "message": line.message}}


def response_record(req: Request, request_id: str, status: int, body: object) -> dict:
    """The output line of a request the server answered (any status: its errors are the server's)."""
    return {"id": _batch_request_id(), "custom_id": req.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def _batch_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# ---- running ------------------------------------------------------------------------------------------------------
class EngineFailed(Exception):
    """The engine stopped: the lines not answered are left for a rerun."""


class Progress:
    """The progress bar on stderr: lines done of all lines, generated tokens/s of this run."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc="run-batch", unit="line", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.done = done
        self.tokens = 0
        self.errors = 0  # answers that are errors (bad lines, 4xx)
        self.failed = 0  # requests the server failed (5xx), not answered
        self.first_failure: str | None = None

    def line_done(self, tokens: int, ok: bool) -> None:
        self.done += 1
        self.tokens += tokens
        self.errors += not ok
        self.bar.set_postfix_str(f"{self.tokens_per_s:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def server_error(self, req: Request, body: object) -> None:
        """A request the server failed (5xx): counted, the first one's message kept for the final report."""
        self.failed += 1
        if self.first_failure is None:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(body)[:200]
            self.first_failure = f"custom_id {req.custom_id[:100]!r}: {message}"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.t0, 1e-9)

    def close(self) -> None:
        self.bar.close()


async def run_all(server, todo: list[Request | BadLine], writer: Writer, max_concurrency: int,
                  progress: Progress) -> None:
    """Answer every item of todo: bad lines first (in order), then the requests through server.app, at most
    max_concurrency at once. Raises EngineFailed when the engine stops (the rest stay unanswered)."""
    import httpx

    for item in todo:
        if isinstance(item, BadLine):
            writer.write(error_record(item))
            progress.line_done(0, ok=False)
    queue = [item for item in todo if isinstance(item, Request)][::-1]
    async with server.app.router.lifespan_context(server.app):  # starts and stops the engine loop, as serving does
        # a bug in a handler is a 500 answer (left for a rerun), as over HTTP, not an exception here
        transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None) as client:
            workers = [asyncio.create_task(_worker(client, queue, writer, progress))
                       for _ in range(min(max_concurrency, len(queue)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)


async def _worker(client, queue: list[Request], writer: Writer, progress: Progress) -> None:
    while queue:
        req = queue.pop()
        request_id, status, body = await _post(client, req)
        if status >= 500:  # the server failed, not the request: no answer is written, a rerun tries it again
            progress.server_error(req, body)
            continue
        writer.write(response_record(req, request_id, status, body))
        usage = body.get("usage") if isinstance(body, dict) else None
        progress.line_done(usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0, ok=status == 200)


async def _post(client, req: Request) -> tuple[str, int, object]:
    """(request id, status, JSON body) of the server's answer to req. An overloaded answer is retried; raises
    EngineFailed when the engine has stopped."""
    request_id = uuid.uuid4().hex
    content = json.dumps(req.body).encode()  # ASCII: text that is not valid UTF-8 reaches the server's own check
    headers = {"content-type": "application/json", "x-request-id": request_id}
    for _ in range(_OVERLOAD_RETRIES):
        r = await client.post(req.url, content=content, headers=headers)
        try:
            body = r.json()
        except ValueError:  # every answer of the server is JSON; kept as text should one not be
            body = r.text
        code = body.get("error", {}).get("code") if isinstance(body, dict) and r.status_code >= 500 else None
        if code == "engine_dead":
            raise EngineFailed(body["error"]["message"])
        if code != "overloaded":
            break
        await asyncio.sleep(float(r.headers.get("retry-after", 1)))
    return request_id, r.status_code, body


def build_server(a: argparse.Namespace):
    """The HTTP server's app around the engine the engine flags describe (as `conveyor serve` builds it). Raises
    ValueError for bad engine flags."""
    from conveyor.cli import build_llm
    from conveyor.engine.async_engine import AsyncEngine
    from conveyor.server.api import Server
    from conveyor.server.metrics import ServerMetrics

    engine = build_llm(a).engine
    names = a.served_model_name or [engine.model_name]
    metrics = ServerMetrics.for_engine(engine, names[0])
    # no HTTP clients to protect from a long queue: the lines in flight are the bound
    async_engine = AsyncEngine(engine, max_waiting_requests=1 << 30, on_step=metrics.on_step)
    return Server(async_engine, metrics, names)


# ---- command line -------------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    """run-batch's flags: the files, concurrency, and serve's engine flags."""
    from conveyor.cli import add_engine_args
    from conveyor.vllm_flags import Bounded

    p.add_argument("-i", "--input-file", required=True,
                   help="OpenAI batch JSONL: one {custom_id, method, url, body} per line ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True,
                   help="answers, one JSON line each, appended as they arrive (not in input order); a rerun with "
                        "the same file answers only the lines not in it yet")
    p.add_argument("--max-concurrency", type=int, default=None, action=Bounded, lo=1,
                   help="most requests in flight at once (default: twice --max-num-seqs, so that the engine's batch "
                        "stays full while finished lines are written and new ones start)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model names a request's body may name (default: --model)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    add_engine_args(p)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The loggers named log warnings and errors only, for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cmd_run_batch(a: argparse.Namespace) -> int:
    """Exit 0 once every line is answered (requests the server refused with a 4xx included), 2 for a problem with
    the files or flags (nothing runs), 1 when lines are left unanswered: the server failed them (5xx), the engine
    stopped, or the run was interrupted (rerun to resume)."""
    try:
        items = parse_lines(read_input(a.input_file))
        done, out = prepare_output(a.output_file, a.input_file)
    except BatchFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    writer = Writer(out)
    try:
        todo = pending(items, done)
        if not todo:
            print(f"# nothing to do: all {len(items)} lines are answered in {a.output_file}", file=sys.stderr)
            return 0
        try:
            server = build_server(a)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _run(a, server, writer, todo, len(items))
    finally:
        writer.close()


def _run(a: argparse.Namespace, server, writer: Writer, todo: list[Request | BadLine], total: int) -> int:
    progress = Progress(total, total - len(todo), not a.disable_tqdm)
    stopped = None
    try:
        with _quiet("conveyor.requests", "httpx"):  # a log line per request would bury the progress bar
            asyncio.run(run_all(server, todo, writer, a.max_concurrency or 2 * a.max_num_seqs, progress))
    except EngineFailed as e:
        stopped = f"the engine stopped ({e})"
    except KeyboardInterrupt:
        stopped = "interrupted"
    except OSError as e:  # writing -o failed (a full disk)
        stopped = f"cannot write -o ({_reason(e)})"
    finally:
        progress.close()  # before anything else is printed: the bar's last refresh would follow it
    if stopped is not None:
        print(f"error: {stopped}; {progress.done} of {total} lines are answered in {a.output_file}: run the same "
              f"command again to answer the rest", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - progress.t0
    print(f"# {progress.done - (total - len(todo))} lines answered ({progress.errors} with an error) in "
          f"{elapsed:.2f}s, {progress.tokens} tokens generated ({progress.tokens_per_s:.1f} tokens/s); "
          f"{progress.done} of {total} lines in {a.output_file}", file=sys.stderr)
    if progress.failed:
        print(f"error: the server failed {progress.failed} requests (first: {progress.first_failure}); they are not "
              f"in {a.output_file}: run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
