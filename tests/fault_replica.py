"""A fault-injecting front for a real `conveyor serve` replica, run as its own process by gateway tests.

Everything is forwarded to the upstream replica (streams included) except:
- a request whose body contains POISON-500 is answered 500 in plain text (a request the replica cannot serve and
  does not reject with a 4xx, which a gateway must not take for a broken replica);
- `POST /_fault {"health": 503}` makes /health answer that status until set back (a replica that goes and comes);
- `GET /_fault` reports how many requests of each kind it saw.

Usage: python tests/fault_replica.py PORT UPSTREAM_URL
"""
from __future__ import annotations

import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

state = {"health": 200, "poisoned": 0, "forwarded": 0}


def build(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=60, trust_env=False)

    async def fault(request: Request) -> Response:
        if request.method == "POST":
            state.update(await request.json())
        return JSONResponse(state)

    async def health(request: Request) -> Response:
        if state["health"] != 200:
            return JSONResponse({"error": {"message": "down (injected)"}}, status_code=state["health"])
        r = await client.get("/health")
        return Response(r.content, r.status_code, media_type="application/json")

    async def metrics(request: Request) -> Response:
        r = await client.get("/metrics")
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    async def forward(request: Request) -> Response:
        body = await request.body()
        if b"POISON-500" in body:
            state["poisoned"] += 1
            return PlainTextResponse("Internal Server Error", status_code=500)
        state["forwarded"] += 1
        headers = {k: v for k, v in request.headers.items() if k in ("content-type", "x-request-id",
                                                                     "authorization")}
        resp = await client.send(client.build_request("POST", request.url.path, content=body, headers=headers),
                                 stream=True)

        async def chunks():
            try:
                async for c in resp.aiter_raw():
                    yield c
            finally:
                await resp.aclose()
        return StreamingResponse(chunks(), resp.status_code, media_type=resp.headers.get("content-type"))

    return Starlette(routes=[Route("/_fault", fault, methods=["GET", "POST"]), Route("/health", health),
                             Route("/metrics", metrics),
                             Route("/v1/completions", forward, methods=["POST"]),
                             Route("/v1/chat/completions", forward, methods=["POST"])])


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
