"""The gateway's hot routes past FastAPI: POST /v1/completions and /v1/chat/completions go straight from a pure ASGI
middleware to the gateway's handler, skipping the router's walk over every route, FastAPI's dependency solving and
its per-request exit stacks and exception wrappers (about a fifth of the gateway's CPU per request in the profile).

Nothing is lost on these routes: the handlers answer every refusal and bug themselves in OpenAI's JSON (the
gateway's `_guarded`), this middleware sits inside the overload guard, and an error raised while the response is sent
still reaches FastAPI's outer server-error middleware and its handler. Any other method or path (a 405 for GET on a
hot path, a 404, a trailing slash's redirect) and any request under a root_path goes on to FastAPI unchanged."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """Pure ASGI middleware: `routes` maps an exact path to the handler of its POST."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            handler = self.routes.get(scope["path"])
        if handler is None:
            await self.app(scope, receive, send)
            return
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)
