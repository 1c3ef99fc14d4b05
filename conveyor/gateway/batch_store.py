"""The Batch API's durable state: files, batches and one row per batch line, in one SQLite database.

Storage: WAL mode with `synchronous=FULL`. WAL lets the API read while the worker writes; FULL makes every commit
(an upload, a batch created, one line's answer) survive a power loss as well as a `kill -9`, so a batch the client
was told about is never lost and a line answered is never answered again. The cost is one fsync per commit, small
next to the generation each line's commit records.

Threads: every method is synchronous; callers run them off the event loop (asyncio.to_thread). Each thread gets its
own connection (WAL readers never block the writer); a write takes the database's write lock up front
(`BEGIN IMMEDIATE`, waiting up to BUSY_TIMEOUT_S), so check-then-write sequences (the per-tenant token limit, a
line answered exactly once, finalizing a batch once) are atomic, across processes too. Gateways that share one file
share its batches (each worker runs any of them, and tenants are matched by name): give each its own db_path
unless they serve the same tenants.

File contents are stored in chunks of CHUNK_BYTES (never a whole file in one row), and read back chunk by chunk.

Timestamps are Unix seconds (integers in API objects, as OpenAI's). Every API-side method takes the tenant's name and
sees only that tenant's rows: another tenant's id is NotFound, exactly like an id that does not exist.
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from conveyor.model.builtin import cache_dir

CHUNK_BYTES = 1 << 20
BUSY_TIMEOUT_S = 30.0
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID_CHARS = 512
MAX_EST_TOKENS = 1 << 40  # an estimate is capped (an absurd max_tokens is the replica's 400, not an overflow)
MAX_REPORTED_ERRORS = 100  # a failed batch's `errors.data` lists at most this many lines
# completion tokens assumed for a line that sets no limit, when its model has no default_max_tokens: the API's own
# default for a completion, and a conservative share of a context for a chat reply
DEFAULT_COMPLETION_TOKENS = {"/v1/completions": 16, "/v1/chat/completions": 1024}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(
    n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files(tenant, n);
CREATE TABLE IF NOT EXISTS file_chunks(file_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY(file_id, seq));
CREATE TABLE IF NOT EXISTS batches(
    n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL,
    output_file_id TEXT, error_file_id TEXT, errors TEXT, metadata TEXT,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, expires_at INTEGER NOT NULL, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    queued_tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches(tenant, n);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches(status, n);
CREATE TABLE IF NOT EXISTS lines(
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, url TEXT, body TEXT, est_tokens INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'done', 'error')), result TEXT, finished_at REAL,
    PRIMARY KEY(batch_id, idx));
CREATE INDEX IF NOT EXISTS lines_by_state ON lines(batch_id, state, idx);
"""
SCHEMA_VERSION = "1"


def default_path() -> Path:
    """Where the gateway keeps its batch store when batch.db_path is not set: <cache dir>/gateway-batches.sqlite3
    (cache dir: $CONVEYOR_CACHE_DIR, else $XDG_CACHE_HOME/conveyor, else ~/.cache/conveyor)."""
    return cache_dir() / "gateway-batches.sqlite3"


class BatchStoreError(ValueError):
    """A request the store refuses: `param` names the request field at fault, `code` is OpenAI-style."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class NotFound(BatchStoreError):
    """No such file or batch for this tenant (another tenant's id included)."""


class LimitExceeded(BatchStoreError):
    """The tenant's batch_queued_tokens would be exceeded."""


class StorageFull(BatchStoreError):
    """The tenant's stored files would pass batch.max_tenant_bytes."""


@dataclass(frozen=True)
class Line:
    """One request of a batch, ready to dispatch: body is the request's JSON object (with its `model`)."""
    batch_id: str
    idx: int
    custom_id: str
    url: str
    body: dict
    est_tokens: int


@dataclass(frozen=True)
class LinePolicy:
    """What create_batch checks lines against: the models this tenant may use (names and aliases) mapped to their
    default_max_tokens (None: none configured), the most lines a batch may have, and the tenant's limit on queued
    batch tokens (None: unlimited)."""
    models: dict[str, int | None]
    max_lines: int
    queued_tokens_limit: int | None = None
    max_tenant_bytes: int | None = None  # the tenant's stored bytes (see BatchStore.tenant_bytes); None: unlimited


def estimate_tokens(endpoint: str, body: dict, default_max_tokens: int | None) -> int:
    """A line's token estimate for the queued-tokens limit: prompt characters / 4 (for chat, the characters of
    the messages' text contents, plus 4 tokens a message; a prompt of token ids counts its ids) plus the completion
    limit (max_completion_tokens, max_tokens, else the model's default_max_tokens, else
    DEFAULT_COMPLETION_TOKENS[endpoint]) times `n`. At least 1, at most MAX_EST_TOKENS."""
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        prompt, sequences = math.ceil(sum(map(_message_chars, messages)) / 4) + 4 * len(messages), 1
    else:
        prompts = _prompts(body.get("prompt", ""))
        prompt, sequences = sum(map(_prompt_tokens, prompts)), max(1, len(prompts))
    limit = next((v for v in (body.get("max_completion_tokens"), body.get("max_tokens"), default_max_tokens)
                  if _is_count(v)), DEFAULT_COMPLETION_TOKENS[endpoint])
    n = body.get("n") if _is_count(body.get("n")) and body.get("n") > 0 else 1
    return min(MAX_EST_TOKENS, max(1, prompt + limit * n * sequences))  # every prompt of a completion generates


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _message_chars(message) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # parts: {"type": "text", "text": ...}
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _prompts(prompt) -> list:
    """A completion's prompts: a string, a list of token ids, or a list of either (several prompts)."""
    return prompt if isinstance(prompt, list) and not all(_is_count(t) for t in prompt) else [prompt]


def _prompt_tokens(p) -> int:
    """One prompt's tokens: its ids, else its characters / 4."""
    return len(p) if isinstance(p, list) and all(_is_count(t) for t in p) else \
        math.ceil(len(p if isinstance(p, str) else json.dumps(p)) / 4)


def file_object(row: sqlite3.Row) -> dict:
    """OpenAI's file object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def batch_object(row: sqlite3.Row) -> dict:
    """OpenAI's batch object."""
    obj = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
           "errors": json.loads(row["errors"]) if row["errors"] else None, "input_file_id": row["input_file_id"],
           "completion_window": row["completion_window"], "status": row["status"],
           "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"]}
    for k in ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at"):
        obj[k] = row[k]
    obj["request_counts"] = {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}
    obj["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    return obj


class BatchStore:
    """Files, batches and lines in the SQLite database at `path` (created with its folder if missing). Raises
    OSError naming the path when it cannot be opened or created."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        try:
            self._open()
        except (OSError, sqlite3.Error) as e:
            self.close()
            raise OSError(f"the batch store {self.path} cannot be opened: {e}") from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        c = self._conn()
        c.execute("PRAGMA journal_mode=WAL")
        with self._write() as w:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                w.execute(stmt)
            w.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = w.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}, this gateway reads {SCHEMA_VERSION}")

    # ---- connections and transactions ----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, kind, exc, tb) -> None:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> BatchStore._Tx:
        """A write transaction (the write lock taken at once); committed when the block ends, else rolled back."""
        return BatchStore._Tx(self._conn())

    def close(self) -> None:
        """Close every thread's connection."""
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()

    # ---- files ---------------------------------------------------------------------------------------------------
    def create_file(self, tenant: str, filename: str, purpose: str, content: BinaryIO, *,
                    now: float | None = None, max_tenant_bytes: int | None = None) -> dict:
        """Store `content` (read to its end, CHUNK_BYTES at a time) as a new file of `tenant`; its file object.
        StorageFull (nothing stored) when the tenant's stored bytes (tenant_bytes) and this file would pass
        `max_tenant_bytes`."""
        file_id = "file-" + secrets.token_hex(12)
        with self._write() as c:
            size = self._put_chunks(c, file_id, iter(lambda: content.read(CHUNK_BYTES), b""))
            self._check_storage(c, tenant, size, max_tenant_bytes, "file")
            c.execute("INSERT INTO files(id, tenant, filename, purpose, bytes, created_at) VALUES (?,?,?,?,?,?)",
                      (file_id, tenant, filename, purpose, size, int(now if now is not None else time.time())))
            return file_object(self._file_row(c, tenant, file_id))

    def _check_storage(self, c: sqlite3.Connection, tenant: str, adding: int, limit: int | None, param: str) -> None:
        if limit is None:
            return
        held = self.tenant_bytes(tenant, c)
        if held + adding > limit:
            raise StorageFull(f"storage limit reached: you store {held} bytes and this needs {adding} more; at most "
                              f"{limit} bytes are kept per tenant (batch.max_tenant_bytes); delete files with "
                              "DELETE /v1/files/{id}", param, "storage_limit_exceeded")

    def tenant_bytes(self, tenant: str, c: sqlite3.Connection | None = None) -> int:
        """What `tenant` stores: its files (uploads and batch outputs) and its batches' copies of their lines (bodies
        and answers, kept with the batch even after its input file is deleted)."""
        c = c or self._conn()
        files = c.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant=?", (tenant,)).fetchone()[0]
        lines = c.execute("SELECT COALESCE(SUM(LENGTH(CAST(l.body AS BLOB)) + COALESCE(LENGTH(CAST(l.result AS BLOB)), "
                          "0)), 0) FROM lines l JOIN batches b ON l.batch_id = b.id WHERE b.tenant=?",
                          (tenant,)).fetchone()[0]
        return files + lines

    def _put_chunks(self, c: sqlite3.Connection, file_id: str, chunks: Iterator[bytes]) -> int:
        size = 0
        for seq, data in enumerate(chunks):
            self._put_chunk(c, file_id, seq, data)
            size += len(data)
        return size

    def _put_chunk(self, c: sqlite3.Connection, file_id: str, seq: int, data: bytes) -> None:
        c.execute("INSERT INTO file_chunks VALUES (?,?,?)", (file_id, seq, data))

    def _file_row(self, c: sqlite3.Connection, tenant: str, file_id: str, param: str = "file_id") -> sqlite3.Row:
        row = c.execute("SELECT * FROM files WHERE id=? AND tenant=?", (file_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"No such File object: {file_id[:100]}", param, "file_not_found")
        return row

    def get_file(self, tenant: str, file_id: str) -> dict:
        """The file object; NotFound when `tenant` has no such file."""
        return file_object(self._file_row(self._conn(), tenant, file_id))

    def list_files(self, tenant: str, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000) -> dict:
        """OpenAI's list of file objects, newest first, after the file `after` (NotFound if unknown)."""
        c = self._conn()
        below = self._cursor(c, "files", tenant, after)
        rows = c.execute("SELECT * FROM files WHERE tenant=? AND n<? AND (? IS NULL OR purpose=?) ORDER BY n DESC "
                         "LIMIT ?", (tenant, below, purpose, purpose, limit + 1)).fetchall()
        return _page([file_object(r) for r in rows], limit)

    def file_content(self, tenant: str, file_id: str) -> bytes:
        """The whole content of a file (for small files; file_chunk streams); NotFound as get_file."""
        c = self._conn()
        self._file_row(c, tenant, file_id)
        return b"".join(r[0] for r in c.execute("SELECT data FROM file_chunks WHERE file_id=? ORDER BY seq",
                                                (file_id,)))

    def file_chunk(self, tenant: str, file_id: str, seq: int) -> bytes | None:
        """Chunk `seq` (0-based) of the file's content, None past its end. NotFound when tenant has no such file."""
        c = self._conn()
        self._file_row(c, tenant, file_id)
        row = c.execute("SELECT data FROM file_chunks WHERE file_id=? AND seq=?", (file_id, seq)).fetchone()
        return None if row is None else row[0]

    def delete_file(self, tenant: str, file_id: str) -> dict:
        """Delete the file and its content (batches made from it keep their lines); OpenAI's deletion object."""
        with self._write() as c:
            self._file_row(c, tenant, file_id)
            c.execute("DELETE FROM file_chunks WHERE file_id=?", (file_id,))
            c.execute("DELETE FROM files WHERE id=?", (file_id,))
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches: the API side -----------------------------------------------------------------------------------
    def create_batch(self, tenant: str, input_file_id: str, endpoint: str, completion_window: str, window_s: float,
                     metadata: dict[str, str] | None, policy: LinePolicy, *, now: float | None = None) -> dict:
        """A batch of the lines of `tenant`'s file `input_file_id`, in_progress (or failed when no line is usable:
        `errors` says why). Invalid lines are recorded answered with an error (see _check_line). Raises NotFound
        (no such file), BatchStoreError (a file that is not purpose `batch`, more than policy.max_lines lines),
        LimitExceeded (the tenant's queued batch tokens would pass policy.queued_tokens_limit), StorageFull (its
        stored bytes and the lines' copy, about the file's size, would pass policy.max_tenant_bytes)."""
        assert endpoint in ENDPOINTS, endpoint
        now = int(now if now is not None else time.time())
        batch_id = "batch_" + secrets.token_hex(16)
        c = self._conn()
        f = self._file_row(c, tenant, input_file_id, "input_file_id")
        if f["purpose"] != "batch":
            raise BatchStoreError(f"the file {input_file_id} has purpose {f['purpose']!r}; a batch needs a file "
                                  "of purpose 'batch'", "input_file_id", "invalid_file_purpose")
        total, queued_tokens, errors = self._scan(c, batch_id, input_file_id, endpoint, policy)
        status = "in_progress" if queued_tokens else "failed"  # a queued line estimates at least 1 token
        with self._write() as c:
            self._file_row(c, tenant, input_file_id, "input_file_id")  # still there
            if status == "in_progress":  # the rows again, streamed into the table: never all in memory
                self._check_limit(c, tenant, queued_tokens, policy.queued_tokens_limit)
                self._check_storage(c, tenant, f["bytes"], policy.max_tenant_bytes, "input_file_id")
                c.executemany("INSERT INTO lines VALUES (?,?,?,?,?,?,?,?,?)",
                              (row for row, _ in self._rows(c, batch_id, input_file_id, endpoint, policy)))
                bad = c.execute("SELECT COUNT(*) FROM lines WHERE batch_id=? AND state='error'",
                                (batch_id,)).fetchone()[0]
                errors = None
            else:  # nothing to do: the batch fails, its errors say why, and it keeps no lines
                total = bad = 0
                errors = {"object": "list", "data": errors or [
                    {"code": "empty_file", "message": "the input file has no requests", "param": None,
                     "line": None}]}
            c.execute("INSERT INTO batches(id, tenant, endpoint, input_file_id, completion_window, status, errors, "
                      "metadata, created_at, in_progress_at, expires_at, failed_at, total, failed, queued_tokens) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (batch_id, tenant, endpoint, input_file_id, completion_window, status,
                       json.dumps(errors) if errors else None, json.dumps(metadata) if metadata else None,
                       now, now if status == "in_progress" else None, now + math.ceil(window_s),
                       now if status == "failed" else None, total, bad, queued_tokens))
            return batch_object(self._batch_row(c, tenant, batch_id))

    def _scan(self, c: sqlite3.Connection, batch_id: str, file_id: str, endpoint: str,
              policy: LinePolicy) -> tuple[int, int, list[dict]]:
        """A first pass over the file's lines, before the write lock is taken (a big file takes seconds): how many,
        their estimated tokens, the first MAX_REPORTED_ERRORS errors."""
        total, tokens, errors = 0, 0, []
        for row, err in self._rows(c, batch_id, file_id, endpoint, policy):
            total += 1
            tokens += row[5]
            if err is not None and len(errors) < MAX_REPORTED_ERRORS:
                errors.append(err)
        return total, tokens, errors

    def _check_limit(self, c: sqlite3.Connection, tenant: str, tokens: int, limit: int | None) -> None:
        if limit is None:
            return
        held = self._queued_tokens(c, tenant)
        if held + tokens > limit:
            raise LimitExceeded(f"Enqueued token limit reached: this batch needs about {tokens} tokens and "
                                f"{held} are already queued in your batches; the limit (batch_queued_tokens) is "
                                f"{limit}. Retry once some in-progress batches have completed.", None,
                                "token_limit_exceeded")

    def _input_lines(self, c: sqlite3.Connection, file_id: str) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, bytes) of each non-blank line of the file, read chunk by chunk."""
        rest, number, seq = b"", 0, 0
        while (row := c.execute("SELECT data FROM file_chunks WHERE file_id=? AND seq=?",
                                (file_id, seq)).fetchone()) is not None:
            seq += 1
            *whole, rest = (rest + row[0]).split(b"\n")
            for raw in whole:
                number += 1
                if raw.strip():
                    yield number, raw
        if rest.strip():
            yield number + 1, rest

    def _rows(self, c: sqlite3.Connection, batch_id: str, file_id: str, endpoint: str,
              policy: LinePolicy) -> Iterator[tuple[tuple, dict | None]]:
        """Each input line's row of the lines table (valid: queued; invalid: answered with its error) and its error
        with its line number, or None. Raises BatchStoreError past policy.max_lines."""
        seen: set[str] = set()
        for idx, (number, raw) in enumerate(self._input_lines(c, file_id)):
            if idx >= policy.max_lines:
                raise BatchStoreError(f"the file has more than {policy.max_lines} requests, the most a batch may "
                                      "have (batch.max_lines)", "input_file_id", "too_many_requests")
            line, err = _check_line(raw, number, endpoint, policy, seen)
            cid = line.get("custom_id")
            custom_id = cid if isinstance(cid, str) and _encodable(cid) else None
            if err is None:
                seen.add(custom_id)
                body = line["body"]
                est = estimate_tokens(endpoint, body, policy.models[body["model"]])
                yield (batch_id, idx, custom_id, line["url"], json.dumps(body), est, "queued", None, None), None
            else:
                result = json.dumps({"error": {"code": err["code"], "message": err["message"]}})
                yield (batch_id, idx, custom_id, None, None, 0, "error", result, time.time()), {**err, "line": number}

    def _batch_row(self, c: sqlite3.Connection, tenant: str, batch_id: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM batches WHERE id=? AND tenant=?", (batch_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"No batch found with id '{batch_id[:100]}'", "batch_id", "batch_not_found")
        return row

    def get_batch(self, tenant: str, batch_id: str) -> dict:
        """The batch object; NotFound when `tenant` has no such batch."""
        return batch_object(self._batch_row(self._conn(), tenant, batch_id))

    def list_batches(self, tenant: str, after: str | None = None, limit: int = 20) -> dict:
        """OpenAI's list of the tenant's batches, newest first, after the batch `after` (NotFound if unknown):
        {"object": "list", "data", "first_id", "last_id", "has_more"}."""
        c = self._conn()
        below = self._cursor(c, "batches", tenant, after)
        rows = c.execute("SELECT * FROM batches WHERE tenant=? AND n<? ORDER BY n DESC LIMIT ?",
                         (tenant, below, limit + 1)).fetchall()
        return _page([batch_object(r) for r in rows], limit)

    def _cursor(self, c: sqlite3.Connection, table: str, tenant: str, after: str | None) -> int:
        if after is None:
            return 1 << 62
        row = c.execute(f"SELECT n FROM {table} WHERE id=? AND tenant=?", (after, tenant)).fetchone()
        if row is None:
            kind = {"files": "file", "batches": "batch"}[table]
            raise NotFound(f"`after` names no {kind} of yours: {after[:100]!r}", "after", "not_found")
        return row[0]

    def cancel_batch(self, tenant: str, batch_id: str, *, now: float | None = None) -> dict:
        """Move an in-progress batch to cancelling (the worker dispatches no more of its lines; finalize_ready then
        ends it as cancelled). Cancelling a cancelling or cancelled batch returns it unchanged; a batch that already
        ended otherwise raises BatchStoreError."""
        now = int(now if now is not None else time.time())
        with self._write() as c:
            row = self._batch_row(c, tenant, batch_id)
            if row["status"] in ("validating", "in_progress"):
                c.execute("UPDATE batches SET status='cancelling', cancelling_at=? WHERE id=?", (now, batch_id))
            elif row["status"] not in ("cancelling", "cancelled"):
                raise BatchStoreError(f"the batch is {row['status']}; only a batch in progress can be cancelled",
                                      "batch_id", "batch_not_cancellable")
            return batch_object(self._batch_row(c, tenant, batch_id))

    # ---- batches: the worker side --------------------------------------------------------------------------------
    def active_batches(self) -> list[dict]:
        """Batches in_progress or cancelling, oldest first: dicts of id, tenant, endpoint, status, expires_at."""
        rows = self._conn().execute("SELECT id, tenant, endpoint, status, expires_at FROM batches "
                                    "WHERE status IN ('in_progress', 'cancelling') ORDER BY n").fetchall()
        return [dict(r) for r in rows]

    def pending_lines(self, batch_id: str, limit: int, exclude: set[int] | frozenset[int] = frozenset(),
                      models: Collection[str] | None = None) -> list[Line]:
        """Up to `limit` lines of the batch not answered yet, in input order, skipping the indices in `exclude`
        (the caller's lines in flight) and, when `models` is given, the lines whose body.model is not in it (lines
        of a model that can take none now must not hide the lines of another behind them)."""
        out: list[Line] = []
        only = None if models is None else json.dumps(sorted(models))
        cur = self._conn().execute("SELECT idx, custom_id, url, body, est_tokens FROM lines "
                                   "WHERE batch_id=? AND state='queued' AND (? IS NULL OR json_extract(body, "
                                   "'$.model') IN (SELECT value FROM json_each(?))) ORDER BY idx",
                                   (batch_id, only, only))
        for r in cur:
            if len(out) >= limit:
                break
            if r["idx"] not in exclude:
                out.append(Line(batch_id, r["idx"], r["custom_id"], r["url"], json.loads(r["body"]), r["est_tokens"]))
        cur.close()
        return out

    def record_result(self, batch_id: str, idx: int, status_code: int, body: dict, request_id: str) -> bool:
        """Record line idx's response (state done for a 2xx, else error), exactly once, in one transaction.
        False when the line was already answered (a duplicate after a crash, or a batch that expired or was
        cancelled meanwhile): nothing changes."""
        ok = 200 <= status_code < 300
        result = json.dumps({"status_code": status_code, "request_id": request_id, "body": body})
        with self._write() as c:
            row = c.execute("UPDATE lines SET state=?, result=?, finished_at=? WHERE batch_id=? AND idx=? "
                            "AND state='queued' RETURNING est_tokens",
                            ("done" if ok else "error", result, time.time(), batch_id, idx)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE batches SET completed=completed+?, failed=failed+?, queued_tokens=queued_tokens-? "
                      "WHERE id=?", (int(ok), int(not ok), row[0], batch_id))
        return True

    def finalize_ready(self, now: float | None = None, busy: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """End every batch that is done: all lines answered (→ finalizing → completed), cancelling and not in
        `busy` (the batch ids with lines in flight; → cancelled), or in progress past expires_at (→ expired). Their
        output and error files are written in the same transaction that ends each. The ids ended. Idempotent and
        crash-safe: each batch ends in one transaction, and a batch left `finalizing` is finished by the next call."""
        now = time.time() if now is None else now
        c = self._conn()
        due = c.execute("SELECT id, status, expires_at, total, completed, failed FROM batches "
                        "WHERE status IN ('in_progress', 'finalizing', 'cancelling') ORDER BY n").fetchall()
        ended = []
        for r in due:
            if r["status"] == "cancelling":
                target = None if r["id"] in busy else "cancelled"
            elif r["status"] == "finalizing" or r["completed"] + r["failed"] == r["total"]:
                target = "completed"
            else:
                target = "expired" if r["expires_at"] <= now else None
            if target is not None and self._end(r["id"], r["status"], target, int(now)):
                ended.append(r["id"])
        return ended

    def _end(self, batch_id: str, status: str, target: str, now: int) -> bool:
        if target == "completed" and status == "in_progress":
            with self._write() as c:  # visible as finalizing while the files are written
                c.execute("UPDATE batches SET status='finalizing', finalizing_at=? WHERE id=? "
                          "AND status='in_progress'", (now, batch_id))
            status = "finalizing"
        with self._write() as c:
            row = c.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
            if row["status"] != status:  # another caller ended it meanwhile
                return False
            if target != "completed":
                self._close_queued(c, batch_id, target, now)
            out_id, err_id = self._write_results(c, row, now)
            c.execute(f"UPDATE batches SET status=?, {target}_at=?, output_file_id=?, error_file_id=?, "
                      "queued_tokens=0 WHERE id=?", (target, now, out_id, err_id, batch_id))
        return True

    def _close_queued(self, c: sqlite3.Connection, batch_id: str, target: str, now: int) -> None:
        """Unanswered lines of an expired or cancelled batch: answered with an error, never dispatched."""
        code = "batch_expired" if target == "expired" else "batch_cancelled"
        why = "the batch expired" if target == "expired" else "the batch was cancelled"
        err = json.dumps({"error": {"code": code, "message": f"{why} before this request was processed"}})
        n = c.execute("UPDATE lines SET state='error', result=?, finished_at=? WHERE batch_id=? AND state='queued'",
                      (err, now, batch_id)).rowcount
        c.execute("UPDATE batches SET failed=failed+? WHERE id=?", (n, batch_id))

    def _write_results(self, c: sqlite3.Connection, batch: sqlite3.Row, now: int) -> tuple[str | None, str | None]:
        """The output file (2xx answers) and the error file (the rest), in input order; None for an empty one."""
        writers = {s: _FileWriter(c, self, batch["tenant"], f"{batch['id']}_{kind}.jsonl", now)
                   for s, kind in (("done", "output"), ("error", "error"))}
        for r in c.execute("SELECT idx, custom_id, state, result FROM lines WHERE batch_id=? ORDER BY idx",
                           (batch["id"],)):
            assert r["state"] != "queued", (batch["id"], r["idx"])
            writers[r["state"]].add(_output_line(batch["id"], r["idx"], r["custom_id"], json.loads(r["result"])))
        return writers["done"].close(), writers["error"].close()

    def queued_tokens(self, tenant: str) -> int:
        """Estimated tokens of the tenant's lines not yet answered in its in-progress batches."""
        return self._queued_tokens(self._conn(), tenant)

    def _queued_tokens(self, c: sqlite3.Connection, tenant: str) -> int:
        return c.execute("SELECT COALESCE(SUM(queued_tokens), 0) FROM batches WHERE tenant=? "
                         "AND status='in_progress'", (tenant,)).fetchone()[0]

    def counts(self) -> dict:
        """{"batches": {status: n for every status}, "lines_queued": lines not answered in in-progress and
        cancelling batches} (for the gateway's metrics)."""
        c = self._conn()
        by = dict.fromkeys(STATUSES, 0)
        by.update(c.execute("SELECT status, COUNT(*) FROM batches GROUP BY status").fetchall())
        queued = c.execute("SELECT COALESCE(SUM(total - completed - failed), 0) FROM batches "
                           "WHERE status IN ('in_progress', 'cancelling')").fetchone()[0]
        return {"batches": by, "lines_queued": queued}


class _FileWriter:
    """Lines of JSON written as a new file's chunks, CHUNK_BYTES at a time; no file when nothing was added."""

    def __init__(self, c: sqlite3.Connection, store: BatchStore, tenant: str, filename: str, now: int) -> None:
        self.c, self.store, self.tenant, self.filename, self.now = c, store, tenant, filename, now
        self.id = "file-" + secrets.token_hex(12)
        self.buf = bytearray()
        self.seq = self.size = 0

    def add(self, obj: dict) -> None:
        try:
            self.buf += json.dumps(obj, ensure_ascii=False).encode() + b"\n"
        except UnicodeEncodeError:  # a lone surrogate somewhere: escaped, as JSON allows
            self.buf += json.dumps(obj).encode() + b"\n"
        if len(self.buf) >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        self.store._put_chunk(self.c, self.id, self.seq, bytes(self.buf))
        self.seq, self.size, self.buf = self.seq + 1, self.size + len(self.buf), bytearray()

    def close(self) -> str | None:
        if self.buf:
            self._flush()
        if not self.size:
            return None
        self.c.execute("INSERT INTO files(id, tenant, filename, purpose, bytes, created_at) VALUES (?,?,?,?,?,?)",
                       (self.id, self.tenant, self.filename, "batch_output", self.size, self.now))
        return self.id


def _page(data: list[dict], limit: int) -> dict:
    more = len(data) > limit
    data = data[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _output_line(batch_id: str, idx: int, custom_id: str | None, result: dict) -> dict:
    """One line of an output or error file, in OpenAI's shape; its id is stable across finalize retries."""
    rid = "batch_req_" + hashlib.sha256(f"{batch_id}:{idx}".encode()).hexdigest()[:32]
    if "status_code" in result:
        return {"id": rid, "custom_id": custom_id, "response": result, "error": None}
    return {"id": rid, "custom_id": custom_id, "response": None, "error": result["error"]}


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a JSON escape like \ud800)
        return False
    return True


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_line(raw: bytes, number: int, endpoint: str, policy: LinePolicy,
                seen: set[str]) -> tuple[dict, dict | None]:
    """(the line's JSON object, or {}; None or its error {"code", "message", "param"}). A line is valid when it is
    a JSON object with a new non-empty custom_id, method POST, url equal to the batch's endpoint, and a body object
    that names a model the tenant may use and does not ask to stream."""
    def bad(code: str, message: str, param: str | None = None, line: dict | None = None) -> tuple[dict, dict]:
        return line or {}, {"code": code, "message": f"line {number}: {message}", "param": param}
    try:
        line = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return bad("invalid_json", "not valid JSON (UTF-8, finite numbers)")
    if not isinstance(line, dict):
        return bad("invalid_request", "a line must be a JSON object")
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS or not _encodable(cid):
        return bad("missing_custom_id", f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} characters "
                   "(no lone surrogates)", "custom_id", line)
    if cid in seen:
        return bad("duplicate_custom_id", f"custom_id {cid[:100]!r} is used by an earlier line", "custom_id", line)
    if line.get("method") != "POST":
        return bad("invalid_method", "method must be POST", "method", line)
    if line.get("url") != endpoint:
        return bad("invalid_url", f"url must be the batch's endpoint {endpoint}", "url", line)
    body = line.get("body")
    if not isinstance(body, dict):
        return bad("invalid_body", "body must be a JSON object", "body", line)
    if not isinstance(body.get("model"), str):
        return bad("missing_model", "body.model must name a model", "body.model", line)
    if body["model"] not in policy.models:
        return bad("model_not_found", f"the model {body['model'][:100]!r} does not exist", "body.model", line)
    if body.get("stream") not in (None, False):
        return bad("invalid_body", "streaming is not supported in a batch", "body.stream", line)
    return line, None
