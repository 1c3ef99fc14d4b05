"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models[/{id}], vLLM's /tokenize and
/detokenize, /health, /metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
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
from conveyor.engine.structured_output import CompileBusy
from conveyor.http_limits import valid_request_id
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.server.logprobs import LogprobFormatter
from conveyor.server.metrics import ServerMetrics
from conveyor.sampling_params import StructuredOutputsParams
from conveyor.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, RequestError,
                                      TokenizeRequest, chat_dicts, find_invalid_text)
from conveyor.tools import (ToolError, ToolRequest, ToolStream, chat_message, check_tool_messages,
                            render_chat)
from conveyor.tracing import Tracing, record_request

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
    """Request handling around one AsyncEngine; `app` is the FastAPI application. `served_model_name` is the name
    clients send as `model` (several are aliases of one model; responses carry the first, as vLLM's do).
    `lenient_request_fields`: unknown top-level request fields are ignored (logged at debug) instead of a 400."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, served_model_name: str | list[str],
                 api_key: str | None = None, max_body_bytes: int = 4 << 20,
                 lenient_request_fields: bool = False, tracing: Tracing | None = None) -> None:
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        assert names and all(isinstance(n, str) and n for n in names), names
        self.engine = engine
        self.metrics = metrics
        self.model_names = names
        self.model_name = names[0]
        self.lenient_request_fields = lenient_request_fields
        self.tracing = tracing  # None: no spans
        self._auth = None if api_key is None else f"Bearer {api_key}".encode()
        self.draining = False
        self.created = int(time.time())
        self.tokenizer = engine.engine.tokenizer
        self.logprobs = LogprobFormatter(self.tokenizer)
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
        app.get("/v1/models/{model_id:path}")(self.model)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics_endpoint)
        return app

    async def _lifespan(self, app: FastAPI):
        self.engine.start()
        try:
            yield
        finally:  # also when cancelled (run-batch's Ctrl-C): an engine thread left running aborts the exit
            self.engine.shutdown()

    async def _on_api_error(self, request: Request, e: APIError) -> Response:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    async def _on_validation_error(self, request: Request, e: RequestValidationError) -> Response:
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        param = _param_path(list(err.get("loc", ()))[1:], e.body, err.get("type"))
        msg = err.get("msg", "invalid request")
        return error_response(400, f"{param or 'body'}: {msg}", param)

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

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "conveyor",
                "root": self.model_name, "max_model_len": self.engine.engine.max_model_len}

    async def models(self, request: Request) -> JSONResponse:
        self._check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.model_names]})

    async def model(self, model_id: str, request: Request) -> JSONResponse:
        """GET /v1/models/{model_id}: one model (ids may contain slashes); 404 for a name not served."""
        self._check_auth(request)
        if model_id not in self.model_names:
            raise APIError(404, f"the model {model_id[:100]!r} does not exist", "model", "model_not_found")
        return JSONResponse(self._model_card(model_id))

    # ---- tokenizer endpoints (vLLM's shapes) -------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest, request: Request) -> JSONResponse:
        """{"prompt"} or {"messages", "add_generation_prompt"} -> {"count", "max_model_len", "tokens"} (and
        "token_strs" with return_token_strs)."""
        self._check_request(request, body)
        try:
            tools = body.tool_request()
            if body.messages is not None:
                messages = body.chat_messages()
                check_tool_messages(messages)
                self._need_chat_template()
                ids = await self._render_chat(messages, body, body.special_tokens(), tools)
            elif body.prompt is not None:
                ids = await asyncio.to_thread(self._encode, body.prompt, body.special_tokens())
            else:
                raise RequestError("give a prompt or messages", "prompt")
        except (RequestError, ToolError) as e:
            raise APIError(400, str(e), e.param) from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.engine.engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:
            raise RequestError(f"the prompt could not be tokenized ({type(e).__name__})", "prompt") from None

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> JSONResponse:
        """{"tokens": [ids]} -> {"prompt": text}; ids outside the vocabulary are a 400 (param tokens)."""
        self._check_request(request, body)
        vocab = min(self.engine.engine.vocab_size, len(self.tokenizer))  # the model's rows may pad the vocabulary
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
        try:
            text = await asyncio.to_thread(self.tokenizer.decode, body.tokens)
        except Exception as e:
            raise APIError(400, f"the tokens could not be decoded ({type(e).__name__})", "tokens") from None
        return JSONResponse({"prompt": text})

    # ---- completions -------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._admit(request, body)
        params = self._params(body)
        return await self._respond(request, body, body.prompts(), params, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._admit(request, body)
        try:
            messages = chat_dicts(body.messages)
            body.check_chat_options()
            tools = body.tool_request()
            check_tool_messages(messages)
        except (RequestError, ToolError) as e:
            raise APIError(400, str(e), e.param) from None
        self._need_chat_template()
        await self._check_tool_schemas(tools)
        params = self._params(body)
        ids = await self._render_chat(messages, body, False, tools)
        return await self._respond(request, body, [{"prompt_token_ids": ids}], params, chat=True, tools=tools)

    def _need_chat_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model has no chat template; use /v1/completions", "messages")

    async def _check_tool_schemas(self, tools: ToolRequest | None) -> None:
        """Each function's parameters compiled by the grammar engine (cached, so a schema costs once), also under
        tool_choice "auto", which does not constrain: a schema it refuses is a 400 naming the function's
        parameters, not a failure later (or never). Off the event loop."""
        if tools is None or tools.mode == "none":
            return
        for i, f in enumerate(tools.functions):
            try:
                await self.engine.engine.grammars.compile_async(StructuredOutputsParams(json=f.parameters))
            except CompileBusy as e:
                raise _engine_error(EngineOverloaded(str(e))) from None
            except ValueError as e:
                raise APIError(400, f"tools.{i}.function.parameters: {e}", f"tools.{i}.function.parameters") from None

    async def _render_chat(self, messages: list[dict], opts: ChatCompletionRequest | TokenizeRequest,
                           add_special_tokens: bool, tools: ToolRequest | None = None) -> list[int]:
        """Token ids of the conversation through the chat template with the request's chat options, off the event
        loop (a long conversation takes a while); a template that raises on these messages is a 400."""
        try:
            return await asyncio.to_thread(self._chat_ids, messages, opts, add_special_tokens, tools)
        except Exception as e:
            raise APIError(400, f"the messages could not be rendered with the chat template "
                                f"({type(e).__name__}: {str(e)[:200]})", "messages") from None

    def _chat_ids(self, messages: list[dict], opts: ChatCompletionRequest | TokenizeRequest, add_special_tokens: bool,
                  tools: ToolRequest | None) -> list[int]:
        text = render_chat(self.tokenizer, messages, tools, opts.add_generation_prompt,  # tool messages render too
                           continue_final_message=opts.continue_final_message,
                           template_kwargs=opts.chat_template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_auth(self, request: Request) -> None:
        if self._auth is None:
            return
        sent = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent (ASGI decodes latin-1)
        if not hmac.compare_digest(sent, self._auth):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def _check_request(self, request: Request, body) -> None:
        """Auth, model, unknown fields, then text: raises APIError (401, 404, 400)."""
        self._check_auth(request)
        self._check_body(body)

    def _check_body(self, body) -> None:
        if body.model is not None and body.model not in self.model_names:
            raise APIError(404, f"the model {body.model[:100]!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.model_names))[:300]}", "model", "model_not_found")
        unknown = body.unknown_fields()
        if unknown and not self.lenient_request_fields:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0][:100]}", unknown[0][:100],
                           "unrecognized_argument")
        if unknown:
            log.debug("ignored unknown request fields: %s", ", ".join(u[:100] for u in unknown[:20]))
        bad = find_invalid_text(body.model_dump())
        if bad is not None:
            raise APIError(400, f"{bad}: not valid UTF-8 text (a lone surrogate)", bad, "invalid_text")

    def _admit(self, request: Request, body: CompletionRequest | ChatCompletionRequest) -> None:
        """Auth, request id, draining, model, fields, text, then what cannot be honoured: raises APIError (401, 400,
        503, 404)."""
        self._check_auth(request)
        rid = request.headers.get("x-request-id")
        if rid is not None and not valid_request_id(rid):
            raise APIError(400, "X-Request-Id must be 1-128 visible ASCII characters", code="invalid_request_id")
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        self._check_body(body)
        refused = body.unsupported()
        if refused is not None:
            raise APIError(400, str(refused), refused.param, "unsupported_parameter")

    def _params(self, body: CompletionRequest | ChatCompletionRequest):
        try:
            return body.to_sampling_params()
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None

    async def _respond(self, request: Request, body, prompts: list[Any], params, chat: bool,
                       tools: ToolRequest | None = None) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        prefix = "chatcmpl" if chat else "cmpl"
        opts = body.stream_options
        ctx = _Ctx(rid=rid, response_id=f"{prefix}-{rid}", created=int(time.time()), chat=chat, n=params.n,
                   logprobs=params.logprobs, started=time.monotonic(), echo=getattr(body, "echo", False),
                   prompt_logprobs=body.prompt_logprobs, include_usage=bool(opts and opts.include_usage),
                   continuous_usage=bool(opts and opts.include_usage and opts.continuous_usage_stats), tools=tools,
                   headers=request.headers, params=params)
        start = asyncio.create_task(self._start(rid, prompts, params, body, chat))
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
            return StreamingResponse(self._stream(ctx, gens), media_type="text/event-stream", headers=headers)
        return await self._complete(request, ctx, gens, headers)

    async def _start(self, rid: str, prompts: list[Any], params, body,
                     chat: bool) -> list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]:
        """Queue each prompt and wait for its first output, so that validation, admission and engine errors come
        before any header (as APIError). Returns (first output, the rest) per prompt."""
        started = []
        try:
            for i, p in enumerate(prompts):
                gen = self.engine.generate(f"{rid}:{uuid.uuid4().hex[:8]}:{i}", p, params, body.cache_salt)
                try:
                    first = await anext(gen)
                except BaseException:
                    await gen.aclose()
                    raise
                started.append((first, gen))
        except BaseException as e:  # also cancelled: every queued request is aborted
            await _close_all([g for _, g in started])
            if isinstance(e, ValueError):
                raise APIError(400, str(e), body.param_of(str(e)) or ("messages" if chat else "prompt")) from None
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
        choices = [self._choice(ctx, i, out, c) for i, out in enumerate(outs) for c in out.outputs]
        self._log(ctx, outs, "ok")
        body = {"id": ctx.response_id, "object": "chat.completion" if ctx.chat else "text_completion",
                "created": ctx.created, "model": self.model_name, "choices": choices, "usage": _usage(outs)}
        if ctx.chat and ctx.prompt_logprobs is not None:  # vLLM: one list for the conversation, at the top
            body["prompt_logprobs"] = self._prompt_logprobs(ctx, outs[0])
        return JSONResponse(body, headers=headers)

    def _choice(self, ctx: _Ctx, prompt_idx: int, out: RequestOutput, c: CompletionOutput) -> dict:
        index = prompt_idx * ctx.n + c.index
        if ctx.chat:
            message, reason = chat_message(ctx.tools, c.text, c.finish_reason)
            return {"index": index, "message": message,
                    "logprobs": {"content": self.logprobs.chat(c.token_ids, c.logprobs or [], ctx.logprobs)}
                    if ctx.logprobs is not None else None,
                    "finish_reason": reason}
        text, lps, offset = c.text, None, 0
        if ctx.echo:
            text = self._prompt_text(out) + text
            if ctx.logprobs is not None:
                lps, offset = self.logprobs.completion_prompt(out.prompt_token_ids, out.prompt_logprobs)
        if ctx.logprobs is not None:
            gen, _ = self.logprobs.completion(c.token_ids, c.logprobs or [], offset)
            lps = _concat_logprobs(lps, gen)
        choice = {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": lps}
        if ctx.prompt_logprobs is not None:  # vLLM: per choice on completions
            choice["prompt_logprobs"] = self._prompt_logprobs(ctx, out)
        return choice

    def _prompt_text(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)

    def _prompt_logprobs(self, ctx: _Ctx, out: RequestOutput) -> list | None:
        if out.prompt_logprobs is None:
            return None
        return self.logprobs.prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, ctx.prompt_logprobs)

    async def _stream(self, ctx: _Ctx, gens: list) -> AsyncIterator[str]:
        outs: dict[int, RequestOutput] = {}
        states: dict[tuple[int, int], _ChoiceState] = {}
        status = "client_disconnected"
        try:
            async for i, out in _merge(gens):
                outs[i] = out
                for c in out.outputs:
                    st = states.setdefault((i, c.index), _ChoiceState())
                    if st.done or not (c.new_text or c.finished or (ctx.echo and not st.started)):
                        continue
                    st.done = c.finished
                    chunk = self._chunk(ctx, i, out, c, st)
                    if chunk is None:  # all of the new text is held back by the tool-call parser
                        continue
                    if ctx.include_usage:  # every chunk has the key; null until the last, unless continuous
                        chunk["usage"] = _usage(list(outs.values())) if ctx.continuous_usage else None
                    yield _sse(chunk)
            status = "ok"
            if ctx.include_usage:
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

    def _chunk(self, ctx: _Ctx, prompt_idx: int, out: RequestOutput, c: CompletionOutput,
               st: _ChoiceState) -> dict | None:
        """The chunk for choice c with its new text and the logprobs of the tokens that text completes (a token's
        logprobs travel with its text, also when text is held back for a possible stop string)."""
        index = prompt_idx * ctx.n + c.index
        end = c.num_emitted_tokens  # all of them once finished
        new_ids, new_lps = c.token_ids[st.tokens_sent:end], (c.logprobs or [])[st.tokens_sent:end]
        st.tokens_sent = max(st.tokens_sent, end)
        first = not st.started
        st.started = True
        choice = self._chat_delta(ctx, index, c, st, first, new_ids, new_lps) if ctx.chat else \
            self._text_delta(ctx, index, out, c, st, first, new_ids, new_lps)
        if choice is None:
            return None
        return {"id": ctx.response_id, "object": _chunk_object(ctx), "created": ctx.created,
                "model": self.model_name, "choices": [choice]}

    def _chat_delta(self, ctx: _Ctx, index: int, c: CompletionOutput, st: _ChoiceState, first: bool,
                    new_ids: list[int], new_lps: list[dict[int, float]]) -> dict | None:
        """A chat chunk's choice: content and tool-call deltas (conveyor.tools.ToolStream); None when there is
        nothing to send (the tool-call parser holds all of the new text back)."""
        st.tool_stream = st.tool_stream or ToolStream(ctx.tools)
        fields, reason = st.tool_stream.delta(c.new_text, c.finish_reason)
        if not (fields or first or reason or ctx.logprobs is not None):
            return None
        delta: dict[str, Any] = {"role": "assistant", **fields} if first else fields
        return {"index": index, "delta": delta, "finish_reason": reason,
                "logprobs": {"content": self.logprobs.chat(new_ids, new_lps, ctx.logprobs)}
                if ctx.logprobs is not None else None}

    def _text_delta(self, ctx: _Ctx, index: int, out: RequestOutput, c: CompletionOutput, st: _ChoiceState,
                    first: bool, new_ids: list[int], new_lps: list[dict[int, float]]) -> dict:
        """A completion chunk's choice: with echo the first one starts with the prompt (and its logprobs); text
        offsets go on from the previous chunk's."""
        text, lps = c.new_text, None
        if first and ctx.echo:
            text = self._prompt_text(out) + text
            if ctx.logprobs is not None:
                lps, st.text_offset = self.logprobs.completion_prompt(out.prompt_token_ids, out.prompt_logprobs)
        if ctx.logprobs is not None:
            gen, st.text_offset = self.logprobs.completion(new_ids, new_lps, st.text_offset)
            lps = _concat_logprobs(lps, gen)
        return {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": lps}

    # ---- logs --------------------------------------------------------------------------------------------------
    def _log(self, ctx: _Ctx, outs: list[RequestOutput], status: str) -> None:
        if self.tracing is not None:
            record_request(self.tracing.tracer, ctx.headers, ctx.started, ctx.rid, self.model_name, ctx.params, outs,
                           status)
        ttfts = [o.metrics["ttft_s"] for o in outs if "ttft_s" in o.metrics]
        request_log.info(json.dumps({
            "event": "request", "request_id": ctx.rid, "status": status,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens": sum(o.num_generated_tokens for o in outs),
            "finish_reasons": [c.finish_reason for o in outs for c in o.outputs],
            "ttft_s": round(min(ttfts), 6) if ttfts else None,
            "total_s": round(time.monotonic() - ctx.started, 6)}))


class _ChoiceState:
    """What a stream has sent of one choice: whether its first chunk went out, the tokens whose logprobs went out,
    the text offset the next token's logprob starts at, whether it has finished."""

    def __init__(self) -> None:
        self.started = False
        self.tokens_sent = 0
        self.text_offset = 0
        self.done = False
        self.tool_stream: ToolStream | None = None  # chat: turns its text into content and tool-call deltas


def _param_path(loc: list, body: Any, err_type: str | None) -> str | None:
    """The dotted path ("response_format.type") of the sent field a validation error is about: pydantic's loc
    without the union-member tags it adds ("early_stopping.bool"); a missing field is named too."""
    path, obj = [], body
    for item in loc:
        if isinstance(obj, dict) and isinstance(item, str) and item in obj:
            obj = obj[item]
        elif isinstance(obj, list) and isinstance(item, int) and 0 <= item < len(obj):
            obj = obj[item]
        elif err_type == "missing" and isinstance(obj, dict):
            path.append(str(item))
            break
        else:
            break
        path.append(str(item))
    return ".".join(path)[:200] or None


def _concat_logprobs(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in b}


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


def _chunk_object(ctx: _Ctx) -> str:
    return "chat.completion.chunk" if ctx.chat else "text_completion"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(outs: list[RequestOutput]) -> dict:
    """OpenAI's usage; completion_tokens counts every generated token, best_of's candidates not returned too (as
    OpenAI bills them)."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(o.num_generated_tokens for o in outs)
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
