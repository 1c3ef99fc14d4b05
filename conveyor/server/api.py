"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded, RequestFailed
from conveyor.http_limits import valid_request_id
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.server.metrics import ServerMetrics
from conveyor.server.protocol import ChatCompletionRequest, CompletionRequest, find_invalid_text

log = logging.getLogger("conveyor.server")
request_log = logging.getLogger("conveyor.requests")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error JSON. ASCII-escaped, so any text (even a lone surrogate from the request) encodes."""
    return json.dumps({"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                                 "param": param, "code": code}}).encode()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status, headers=headers,
                    media_type="application/json")


class BodyTooLarge(StarletteHTTPException):
    """Raised from receive() once a body passes the limit. An HTTPException, because FastAPI re-raises those from
    its body parsing (anything else becomes a 400 there) and the app's handler then answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware: 413 for a body over max_bytes, by Content-Length before any of it is read, or by counting a
    streamed (chunked) body as it arrives, so at most max_bytes plus one read is ever held."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            e = BodyTooLarge(self.max_bytes)
            return await error_response(413, e.detail, code="body_too_large")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        await self.app(scope, limited_receive, send)


class Server:
    """Request handling around one AsyncEngine; `app` is the FastAPI application."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, served_model_name: str,
                 api_key: str | None = None, max_body_bytes: int = 4 << 20) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = served_model_name
        self._auth = None if api_key is None else f"Bearer {api_key}".encode()
        self.draining = False
        self.created = int(time.time())
        self.tokenizer = engine.engine.tokenizer
        self.app = self._build_app(max_body_bytes)

    # ---- app ---------------------------------------------------------------------------------------------------
    def _build_app(self, max_body_bytes: int) -> FastAPI:
        app = FastAPI(title="Conveyor", lifespan=self._lifespan)
        app.add_exception_handler(APIError, self._on_api_error)
        app.add_exception_handler(RequestValidationError, self._on_validation_error)
        app.add_exception_handler(StarletteHTTPException, self._on_http_error)
        app.add_exception_handler(Exception, self._on_unexpected)
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics_endpoint)
        return app

    async def _lifespan(self, app: FastAPI):
        self.engine.start()
        yield
        self.engine.shutdown()

    async def _on_api_error(self, request: Request, e: APIError) -> Response:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    async def _on_validation_error(self, request: Request, e: RequestValidationError) -> Response:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        msg = err.get("msg", "invalid request")
        return error_response(400, f"{'.'.join(loc) or 'body'}: {msg}", ".".join(loc) or None)

    async def _on_http_error(self, request: Request, e: StarletteHTTPException) -> Response:
        msg = f"route {request.url.path[:200]} not found" if e.status_code == 404 else str(e.detail)
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(e.status_code)
        return error_response(e.status_code, msg, code=code, headers=e.headers)

    async def _on_unexpected(self, request: Request, e: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, "internal server error")

    # ---- plain endpoints ---------------------------------------------------------------------------------------
    async def health(self) -> Response:
        if not self.engine.alive or time.monotonic() - self.engine.heartbeat > 60:
            return error_response(503, "engine loop is not running")
        return JSONResponse({"status": "draining" if self.draining else "ok"})

    async def metrics_endpoint(self) -> Response:
        self.metrics.refresh_idle(self.engine.engine)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> JSONResponse:
        self._check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "conveyor",
             "max_model_len": self.engine.engine.max_model_len}]})

    # ---- completions -------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._admit(request, body)
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        params = self._params(body, body.max_tokens, body.logprobs)
        prompts = body.prompts()
        return await self._respond(request, body, prompts, params, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._admit(request, body)
        try:
            logprobs = body.chat_logprobs()
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model has no chat template; use /v1/completions", "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._params(body, max_tokens, logprobs)
        try:  # off the event loop: a long conversation takes a while to render and tokenize
            ids = await asyncio.to_thread(self._chat_ids, messages, body.add_generation_prompt)
        except Exception as e:  # a template may raise on messages it does not accept
            raise APIError(400, f"the messages could not be rendered with the chat template "
                                f"({type(e).__name__}: {str(e)[:200]})", "messages") from None
        return await self._respond(request, body, [{"prompt_token_ids": ids}], params, chat=True)

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_auth(self, request: Request) -> None:
        if self._auth is None:
            return
        sent = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent (ASGI decodes latin-1)
        if not hmac.compare_digest(sent, self._auth):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def _admit(self, request: Request, body: CompletionRequest | ChatCompletionRequest) -> None:
        """Auth, model, draining, then text: raises APIError (401, 404, 503, 400)."""
        self._check_auth(request)
        rid = request.headers.get("x-request-id")
        if rid is not None and not valid_request_id(rid):
            raise APIError(400, "X-Request-Id must be 1-128 visible ASCII characters", code="invalid_request_id")
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model[:100]!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        bad = find_invalid_text(body.model_dump())
        if bad is not None:
            raise APIError(400, f"{bad}: not valid UTF-8 text (a lone surrogate)", bad, "invalid_text")

    def _params(self, body, max_tokens: int | None, logprobs: int | None):
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _respond(self, request: Request, body, prompts: list[Any], params, chat: bool) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        prefix = "chatcmpl" if chat else "cmpl"
        ctx = _Ctx(rid=rid, response_id=f"{prefix}-{rid}", created=int(time.time()), chat=chat, n=params.n,
                   logprobs=params.logprobs, started=time.monotonic())
        start = asyncio.create_task(self._start(rid, prompts, params, body.cache_salt, chat))
        gone = asyncio.create_task(_wait_disconnect(request))
        await asyncio.wait({start, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # the client left while its requests waited for their turn: they leave the queue
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            self._log(ctx, [], "client_disconnected")
            return Response(status_code=499)
        gone.cancel()
        gens = [_prepend(first, gen) for first, gen in start.result()]
        headers = {"X-Request-Id": rid}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(ctx, gens, include_usage), media_type="text/event-stream",
                                     headers=headers)
        return await self._complete(request, ctx, gens, headers)

    async def _start(self, rid: str, prompts: list[Any], params, cache_salt: str | None,
                     chat: bool) -> list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]:
        """Queue each prompt and wait for its first output, so that validation, admission and engine errors come
        before any header (as APIError). Returns (first output, the rest) per prompt."""
        started = []
        try:
            for i, p in enumerate(prompts):
                gen = self.engine.generate(f"{rid}:{uuid.uuid4().hex[:8]}:{i}", p, params, cache_salt)
                try:
                    first = await anext(gen)
                except BaseException:
                    await gen.aclose()
                    raise
                started.append((first, gen))
        except BaseException as e:  # also cancelled: every queued request is aborted
            await _close_all([g for _, g in started])
            if isinstance(e, ValueError):
                raise APIError(400, str(e), "prompt" if not chat else "messages") from None
            if isinstance(e, (EngineOverloaded, EngineDead, RequestFailed)):
                raise _engine_error(e) from None
            raise
        return started

    async def _complete(self, request: Request, ctx: _Ctx, gens: list, headers: dict) -> Response:
        finals: dict[int, RequestOutput] = {}

        async def collect() -> None:
            async for i, out in _merge(gens):
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(collect())
        gone = asyncio.create_task(_wait_disconnect(request))
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client went away: cancelling closes the generators, which abort the requests
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._log(ctx, list(finals.values()), "client_disconnected")
            return Response(status_code=499)
        gone.cancel()
        try:
            task.result()
        except (EngineDead, RequestFailed) as e:
            err = _engine_error(e)
            self._log(ctx, list(finals.values()), err.code)
            raise err from None
        outs = [finals[i] for i in sorted(finals)]
        choices = [self._choice(ctx, i, c) for i, out in enumerate(outs) for c in out.outputs]
        self._log(ctx, outs, "ok")
        return JSONResponse({"id": ctx.response_id, "object": "chat.completion" if ctx.chat else "text_completion",
                             "created": ctx.created, "model": self.model_name, "choices": choices,
                             "usage": _usage(outs)}, headers=headers)

    def _choice(self, ctx: _Ctx, prompt_idx: int, c: CompletionOutput) -> dict:
        index = prompt_idx * ctx.n + c.index
        if ctx.chat:
            return {"index": index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, ctx.logprobs) if ctx.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason}
        return {"index": index, "text": c.text, "finish_reason": c.finish_reason,
                "logprobs": self._completion_logprobs(c.token_ids, c.logprobs, 0) if ctx.logprobs is not None
                else None}

    async def _stream(self, ctx: _Ctx, gens: list, include_usage: bool) -> AsyncIterator[str]:
        outs: dict[int, RequestOutput] = {}
        sent_role: set[int] = set()
        done: set[tuple[int, int]] = set()
        tokens_sent: dict[tuple[int, int], int] = {}
        status = "client_disconnected"
        try:
            async for i, out in _merge(gens):
                outs[i] = out
                for c in out.outputs:
                    if (i, c.index) in done or (not c.new_text and not c.finished):
                        continue
                    if c.finished:
                        done.add((i, c.index))
                    start = tokens_sent.get((i, c.index), 0)
                    tokens_sent[(i, c.index)] = len(c.token_ids)
                    yield _sse(self._chunk(ctx, i, c, start, sent_role))
            status = "ok"
            if include_usage:
                final = [outs[i] for i in sorted(outs)]
                yield _sse({"id": ctx.response_id, "object": _chunk_object(ctx), "created": ctx.created,
                            "model": self.model_name, "choices": [], "usage": _usage(final)})
        except (EngineDead, RequestFailed) as e:  # headers are out: the error goes as an event
            err = _engine_error(e)
            status = err.code
            yield _sse({"error": {"message": err.message, "type": _ERROR_TYPES[err.status], "param": None,
                                  "code": err.code}})
        except Exception:
            status = "internal_error"
            log.exception("stream failed")
            yield _sse({"error": {"message": "internal server error", "type": "internal_error", "param": None,
                                  "code": None}})
        finally:
            self._log(ctx, list(outs.values()), status)
        yield "data: [DONE]\n\n"

    def _chunk(self, ctx: _Ctx, prompt_idx: int, c: CompletionOutput, start: int, sent_role: set[int]) -> dict:
        """The chunk for choice c carrying its new text and the logprobs of its tokens from `start` on."""
        index = prompt_idx * ctx.n + c.index
        new_ids = c.token_ids[start:]
        new_lps = (c.logprobs or [])[start:]
        if ctx.chat:
            delta: dict[str, Any] = {"content": c.new_text}
            if index not in sent_role:
                sent_role.add(index)
                delta = {"role": "assistant", "content": c.new_text}
            choice = {"index": index, "delta": delta, "finish_reason": c.finish_reason,
                      "logprobs": self._chat_logprobs(new_ids, new_lps, ctx.logprobs) if ctx.logprobs is not None
                      else None}
        else:
            choice = {"index": index, "text": c.new_text, "finish_reason": c.finish_reason,
                      "logprobs": self._completion_logprobs(new_ids, new_lps, 0) if ctx.logprobs is not None
                      else None}
        return {"id": ctx.response_id, "object": _chunk_object(ctx), "created": ctx.created,
                "model": self.model_name, "choices": [choice]}

    # ---- logprobs ----------------------------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, ids: list[int], lps: list[dict[int, float]] | None, offset: int) -> dict:
        lps = lps or []
        tokens = [self._token_text(t) for t in ids]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [_finite(lp[t]) for t, lp in zip(ids, lps)],
                "top_logprobs": [{self._token_text(k): _finite(v) for k, v in lp.items()} for lp in lps],
                "text_offset": offsets}

    def _chat_logprobs(self, ids: list[int], lps: list[dict[int, float]] | None, top_n: int) -> dict:
        content = []
        for t, lp in zip(ids, lps or []):
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({**self._token_entry(t, lp[t]),
                            "top_logprobs": [self._token_entry(k, v) for k, v in top]})
        return {"content": content}

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    # ---- logs --------------------------------------------------------------------------------------------------
    def _log(self, ctx: _Ctx, outs: list[RequestOutput], status: str) -> None:
        ttfts = [o.metrics["ttft_s"] for o in outs if "ttft_s" in o.metrics]
        request_log.info(json.dumps({
            "event": "request", "request_id": ctx.rid, "status": status,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
            "finish_reasons": [c.finish_reason for o in outs for c in o.outputs],
            "ttft_s": round(min(ttfts), 6) if ttfts else None,
            "total_s": round(time.monotonic() - ctx.started, 6)}))


class _Ctx:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _engine_error(e: Exception) -> APIError:
    """The HTTP error for an engine-side failure of a request."""
    if isinstance(e, EngineOverloaded):
        return APIError(503, str(e), code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return APIError(503, str(e), code="engine_dead", headers={"Retry-After": "5"})
    assert isinstance(e, RequestFailed), e
    return APIError(500, str(e), code="engine_step_failed")


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token the model gives no chance is reported as -9999.0, as OpenAI does."""
    return logprob if math.isfinite(logprob) else -9999.0


def _chunk_object(ctx: _Ctx) -> str:
    return "chat.completion.chunk" if ctx.chat else "text_completion"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _prepend(first: RequestOutput, gen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        if not first.finished:
            async for out in gen:
                yield out
    finally:
        await gen.aclose()


async def _close_all(gens: list) -> None:
    for g in gens:
        await g.aclose()


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they arrive, tagged with their prompt index."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen) -> None:
        try:
            async for out in gen:
                await q.put((i, out, None))
        except Exception as e:
            await q.put((i, None, e))
        finally:
            await q.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        live = len(tasks)
        while live:
            i, out, err = await q.get()
            if err is not None:
                raise err
            if out is None:
                live -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
