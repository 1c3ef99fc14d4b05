"""OpenAI's Files and Batch endpoints on the gateway, over the BatchStore; the batch worker (batch_worker.py) runs
the lines. Every call is authenticated like the gateway's other endpoints (API key → tenant, one of its concurrency
slots while the call runs), sees only its tenant's files and batches (another tenant's id is a 404, as an unknown
one), and answers every error in OpenAI's JSON with `param` where one field is at fault.

  POST   /v1/files                 multipart: `file` (a JSONL of {"custom_id", "method", "url", "body"} lines) and
                                   `purpose` (only "batch"); streamed to a spool file while its size is checked
  GET    /v1/files                 ?purpose=&after=&limit= (newest first)
  GET    /v1/files/{id}            DELETE /v1/files/{id}       GET /v1/files/{id}/content (streamed from the store)
  POST   /v1/batches               {"input_file_id", "endpoint", "completion_window", "metadata"}
  GET    /v1/batches               ?after=&limit= (newest first)
  GET    /v1/batches/{id}          POST /v1/batches/{id}/cancel

These calls are not model requests: they take no rate-limit tokens or requests. Store calls run in threads.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

import conveyor.gateway.app as gateway_app
from conveyor.gateway.batch_store import (ENDPOINTS, BatchStore, BatchStoreError, LimitExceeded, LinePolicy,
                                          NotFound, StorageFull)
from conveyor.gateway.config import TenantConfig
from conveyor.gateway.multipart import FileTooLarge, MultipartError, boundary_of, read_form
from conveyor.http_limits import BodyTimeout, BodyTooLarge, read_body

log = logging.getLogger("conveyor.gateway")
MAX_WINDOW_S = 7 * 86_400
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits
MAX_JSON_BODY = 64 << 10  # POST /v1/batches
FORM_OVERHEAD_BYTES = 64 << 10  # multipart framing and small fields, beyond the file itself
SPOOL_BYTES = 1 << 20  # an upload is kept in memory up to this, then in a temporary file
_WINDOW = re.compile(r"([1-9][0-9]{0,6})([hms])")


def parse_completion_window(window) -> float:
    """Seconds of a completion_window: "24h" as OpenAI's, and for tests and operators any `<n>h`, `<n>m` or `<n>s`
    up to 7 days. Raises ValueError saying what is accepted."""
    m = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    seconds = int(m[1]) * {"h": 3600, "m": 60, "s": 1}[m[2]] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ValueError("completion_window must be '24h' (or <n>h, <n>m, <n>s of at most 7 days)")
    return float(seconds)


def check_metadata(metadata) -> dict[str, str] | None:
    """OpenAI's metadata: None, or up to 16 string pairs (keys up to 64 characters, values up to 512). Raises
    ValueError."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY and len(v) <= MAX_METADATA_VALUE
            for k, v in metadata.items()):
        raise ValueError(f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs (keys up to "
                         f"{MAX_METADATA_KEY} characters, values up to {MAX_METADATA_VALUE})")
    return metadata


def install(app: FastAPI, gw: gateway_app.Gateway) -> None:
    """Add the Files and Batch routes to the gateway's app; they use gw.batch_store (opened at start)."""
    api = BatchAPI(gw)
    for path, handler, method in (
            ("/v1/files", api.upload, "POST"), ("/v1/files", api.list_files, "GET"),
            ("/v1/files/{file_id}", api.get_file, "GET"), ("/v1/files/{file_id}", api.delete_file, "DELETE"),
            ("/v1/files/{file_id}/content", api.file_content, "GET"),
            ("/v1/batches", api.create_batch, "POST"), ("/v1/batches", api.list_batches, "GET"),
            ("/v1/batches/{batch_id}", api.get_batch, "GET"),
            ("/v1/batches/{batch_id}/cancel", api.cancel_batch, "POST")):
        app.add_api_route(path, handler, methods=[method])


def _reject(status: int, reason: str, message: str, code: str | None = None, param: str | None = None,
            headers: dict[str, str] | None = None) -> gateway_app._Reject:
    return gateway_app._Reject(status, reason, message, code, headers, param)


def _store_reject(e: BatchStoreError) -> gateway_app._Reject:
    if isinstance(e, NotFound):
        return _reject(404, "not_found", e.message, e.code, e.param)
    if isinstance(e, LimitExceeded):
        return _reject(429, "batch_queued_tokens", e.message, e.code, e.param)
    if isinstance(e, StorageFull):
        return _reject(429, "batch_storage", e.message, e.code, e.param)
    return _reject(400, "bad_request", e.message, e.code, e.param)


class BatchAPI:
    def __init__(self, gw: gateway_app.Gateway) -> None:
        self.gw = gw

    @property
    def store(self) -> BatchStore:
        return self.gw.batch_store

    async def _serve(self, request: Request, work: Callable[[TenantConfig], Awaitable[Response]]) -> Response:
        """work(tenant)'s response, after authentication; every refusal in OpenAI's error JSON, logged and counted
        like the gateway's others, and the tenant's concurrency slot freed whichever way the call ends."""
        ctx = gateway_app.Ctx(rid=uuid.uuid4().hex, started=time.monotonic())
        return await self.gw._guarded(ctx, self._call(request, ctx, work))

    async def _call(self, request: Request, ctx: gateway_app.Ctx,
                    work: Callable[[TenantConfig], Awaitable[Response]]) -> Response:
        gw = self.gw
        try:
            response = await work(await gw._admit_client(request, ctx))
        except BatchStoreError as e:
            raise _store_reject(e) from None
        except sqlite3.Error as e:  # locked past the busy timeout, disk full, unreadable: retry later
            log.error(json.dumps({"event": "batch_store_error", "request_id": ctx.rid,
                                  "error": f"{type(e).__name__}: {e}"[:300]}))
            raise _reject(503, "batch_store_unavailable", "the batch store is unavailable; retry shortly",
                          headers={"retry-after": "5"}) from None
        gw._release(ctx, 0)
        gw._access_log(ctx, response.status_code, None)
        response.headers["x-request-id"] = ctx.rid
        return response

    async def _store(self, fn, *args, **kw):
        return await asyncio.to_thread(fn, *args, **kw)

    # ---- files ---------------------------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        async def work(tenant: TenantConfig) -> Response:
            limit = self.gw.cfg.batch.max_file_bytes
            length = request.headers.get("content-length")
            if length is not None and (not (length.isascii() and length.isdigit())
                                       or int(length) > limit + FORM_OVERHEAD_BYTES):
                raise _reject(413, "too_large", f"the file exceeds {limit} bytes (batch.max_file_bytes)",
                              "file_too_large", "file", {"connection": "close"})
            try:
                boundary = boundary_of(request.headers.get("content-type"))
            except MultipartError as e:
                raise _reject(400, "bad_request", e.message, "invalid_request") from None
            with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
                form = await self._read_upload(request, boundary, spool, limit)
                purpose = form.fields.get("purpose")
                if purpose != "batch":
                    raise _reject(400, "bad_request", "purpose is required and must be 'batch' (the only purpose "
                                  "this gateway stores)" if purpose is None else f"purpose {purpose[:64]!r} is not "
                                  "supported; use 'batch'", "invalid_purpose", "purpose")
                if form.filename is None:
                    raise _reject(400, "bad_request", "the form needs a `file` part", "missing_file", "file")
                spool.seek(0)
                obj = await self._store(self.store.create_file, tenant.name, form.filename, purpose, spool,
                                        max_tenant_bytes=self.gw.cfg.batch.max_tenant_bytes)
            return JSONResponse(obj)
        return await self._serve(request, work)

    async def _read_upload(self, request: Request, boundary: bytes, spool, limit: int):
        try:
            return await read_form(request.stream(), boundary, spool, "file", limit)
        except FileTooLarge as e:
            raise _reject(413, "too_large", e.message, "file_too_large", "file", {"connection": "close"}) from None
        except MultipartError as e:
            raise _reject(400, "bad_request", e.message, "invalid_request", e.param) from None
        except ClientDisconnect:
            raise _reject(499, "client_gone", "the client went away while sending the file") from None

    async def list_files(self, request: Request) -> Response:
        async def work(tenant: TenantConfig) -> Response:
            q = request.query_params
            if q.get("order", "desc") != "desc":
                raise _reject(400, "bad_request", "only order=desc (newest first) is supported", param="order")
            limit = _int_param(q, "limit", 10_000, 10_000)
            return JSONResponse(await self._store(self.store.list_files, tenant.name, q.get("purpose"),
                                                  q.get("after"), limit))
        return await self._serve(request, work)

    async def get_file(self, request: Request, file_id: str) -> Response:
        return await self._serve(request, lambda t: self._json(self.store.get_file, t.name, file_id))

    async def delete_file(self, request: Request, file_id: str) -> Response:
        return await self._serve(request, lambda t: self._json(self.store.delete_file, t.name, file_id))

    async def file_content(self, request: Request, file_id: str) -> Response:
        async def work(tenant: TenantConfig) -> Response:
            first = await self._store(self.store.file_chunk, tenant.name, file_id, 0)  # NotFound before a byte goes
            return StreamingResponse(self._chunks(tenant.name, file_id, first), media_type="application/octet-stream")
        return await self._serve(request, work)

    async def _chunks(self, tenant: str, file_id: str, first: bytes | None) -> AsyncIterator[bytes]:
        chunk, seq = first, 0
        while chunk is not None:
            yield chunk
            seq += 1
            try:
                chunk = await self._store(self.store.file_chunk, tenant, file_id, seq)
            except NotFound:  # deleted while being read: the response ends short
                return

    # ---- batches -------------------------------------------------------------------------------------------------
    async def create_batch(self, request: Request) -> Response:
        async def work(tenant: TenantConfig) -> Response:
            body = await self._json_body(request)
            file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
            if not isinstance(file_id, str) or not file_id:
                raise _reject(400, "bad_request", "input_file_id is required (a file id)", "invalid_request",
                              "input_file_id")
            if endpoint not in ENDPOINTS:
                raise _reject(400, "bad_request", f"endpoint must be one of {', '.join(ENDPOINTS)}",
                              "invalid_request", "endpoint")
            try:
                window_s = parse_completion_window(body.get("completion_window"))
            except ValueError as e:
                raise _reject(400, "bad_request", str(e), "invalid_request", "completion_window") from None
            try:
                metadata = check_metadata(body.get("metadata"))
            except ValueError as e:
                raise _reject(400, "bad_request", str(e), "invalid_request", "metadata") from None
            obj = await self._store(self.store.create_batch, tenant.name, file_id, endpoint,
                                    body["completion_window"], window_s, metadata, self._policy(tenant))
            return JSONResponse(obj)
        return await self._serve(request, work)

    def _policy(self, tenant: TenantConfig) -> LinePolicy:
        """The models this tenant may name in a line (names, aliases, `auto` when it may use it) with their
        default_max_tokens, and its limits."""
        cfg = self.gw.cfg
        models = {n: m.default_max_tokens for m in cfg.models for n in (m.name, *m.aliases) if cfg.may_use(tenant, n)}
        if cfg.auto_route is not None and cfg.may_use(tenant, "auto"):
            models["auto"] = None
        return LinePolicy(models, cfg.batch.max_lines, tenant.batch_queued_tokens, cfg.batch.max_tenant_bytes)

    async def _json_body(self, request: Request) -> dict:
        try:
            raw = await read_body(request.stream(), MAX_JSON_BODY, self.gw.cfg.client_read_timeout_s)
        except BodyTooLarge as e:
            raise _reject(413, "too_large", str(e), "body_too_large", headers={"connection": "close"}) from None
        except BodyTimeout as e:
            raise _reject(408, "client_timeout", str(e), "request_timeout", headers={"connection": "close"}) from None
        except ClientDisconnect:
            raise _reject(499, "client_gone", "the client went away while sending the body") from None
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode()  # no lone surrogates: they could be neither stored nor sent
        except (ValueError, RecursionError):
            raise _reject(400, "bad_request", "the body is not valid JSON (UTF-8, no lone surrogates)",
                          "invalid_json") from None
        if not isinstance(body, dict):
            raise _reject(400, "bad_request", "the body must be a JSON object", "invalid_request")
        return body

    async def list_batches(self, request: Request) -> Response:
        async def work(tenant: TenantConfig) -> Response:
            q = request.query_params
            limit = _int_param(q, "limit", 20, 100)
            return JSONResponse(await self._store(self.store.list_batches, tenant.name, q.get("after"), limit))
        return await self._serve(request, work)

    async def get_batch(self, request: Request, batch_id: str) -> Response:
        return await self._serve(request, lambda t: self._json(self.store.get_batch, t.name, batch_id))

    async def cancel_batch(self, request: Request, batch_id: str) -> Response:
        return await self._serve(request, lambda t: self._json(self.store.cancel_batch, t.name, batch_id))

    async def _json(self, fn, *args) -> Response:
        return JSONResponse(await self._store(fn, *args))


def _int_param(query, name: str, default: int, most: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise _reject(400, "bad_request", f"{name} must be an integer in 1-{most}", "invalid_request", name)
    return int(raw)
