"""The gateway's hot routes past FastAPI: POST /v1/completions and /v1/chat/completions go straight from a pure ASGI
middleware to the gateway's handler, skipping the router's walk over every route, FastAPI's dependency solving and
its per-request exit stacks and exception wrappers (about a fifth of the gateway's CPU per request in the profile).

`FrontedFastAPI` puts it, behind the overload guard, in front of FastAPI's whole middleware stack: the hot routes
also skip the server-error, telemetry and body-limit middlewares and their wrappers around every `send` (a tenth of
the CPU per streamed request in the profile). Nothing is lost: the handlers answer every refusal and bug themselves in
OpenAI's JSON (the gateway's `_guarded`), an exception that escapes one anyway is answered by `on_error` (the
gateway's 500 handler), and the body's size is bounded by the handler's own reader. Any other method or path (a 405
for GET on a hot path, a 404, a trailing slash's redirect) and any request under a root_path goes on to FastAPI
unchanged."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class HotRoutes:
    """Pure ASGI middleware: `routes` maps an exact path to the handler of its POST."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler], on_error: ErrorHandler) -> None:
        self.app, self.routes, self.on_error = app, routes, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            handler = self.routes.get(scope["path"])
        if handler is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except Exception as e:  # a bug past the handler's own guard: still OpenAI's JSON, never uvicorn's text
            response = await self.on_error(request, e)
        await response(scope, receive, send)


class FrontedFastAPI(FastAPI):
    """FastAPI with `front(stack)` (pure ASGI middleware) wrapped around its whole middleware stack, server-error
    middleware included, where `add_middleware` would put it inside. Lifespan events pass through the front."""

    def __init__(self, front: Callable[[ASGIApp], ASGIApp], **kwargs) -> None:
        super().__init__(**kwargs)
        self.front = front

    def build_middleware_stack(self) -> ASGIApp:
        return self.front(super().build_middleware_stack())
