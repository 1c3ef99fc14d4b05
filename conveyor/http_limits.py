"""Limits on what a client may make an HTTP server wait for (slowloris and oversized bodies), shared by
`conveyor gateway` and usable by `conveyor serve`.

- `header_timeout_protocol(timeout_s)`: a uvicorn HTTP protocol (h11) that closes a connection whose request
  headers have not all arrived within `timeout_s` of its first byte (or of the connection opening), answering
  408 in OpenAI's error JSON (a connection that sent nothing is just closed), that answers malformed HTTP with
  OpenAI's error JSON rather than plain text, and that closes a connection once a response has gone out before the
  request body was read to its end (so a client cannot trickle the rest of a refused body forever).
- `read_body(chunks, max_bytes, timeout_s)`: read a request body incrementally, stopping at `max_bytes` (nothing
  beyond it is buffered) or when the whole body has not arrived within `timeout_s`.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int, timeout_s: float) -> bytes:
    """The whole body from `chunks` (e.g. Starlette's `request.stream()`). Raises BodyTooLarge as soon as more
    than max_bytes arrived, BodyTimeout when it has not all arrived within timeout_s (seconds)."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLarge(f"the request body exceeds {max_bytes} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(parts)


def raw_error(status: int, reason: str, kind: str, code: str, message: str) -> bytes:
    """A whole response in OpenAI's error JSON that ends the connection, written past h11 (whose state may not
    allow a response yet)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))


def header_timeout_protocol(timeout_s: float, on_timeout: Callable[[], None] | None = None) -> type[H11Protocol]:
    """A uvicorn `http=` protocol class enforcing `timeout_s` on request headers; on_timeout() is called for each
    connection closed that way (for a metric)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is a slowloris too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # (part of) the next request's head
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is complete
                self._disarm()

        def on_response_complete(self) -> None:
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) \
                    and not self.transport.is_closing():
                self.transport.close()  # answered before the body was read: no reason to read the rest
                return
            super().on_response_complete()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            partial = bool(self.conn.trailing_data[0])  # part of a head came; one that sent nothing just closes
            if partial:
                self.transport.write(raw_error(408, "Request Timeout", "timeout_error", "client_timeout",
                                               f"the request headers did not arrive within {timeout_s:g} s"))
            self.transport.close()
            if partial and on_timeout is not None:
                on_timeout()

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: OpenAI's error JSON, not plain text
            self._disarm()
            if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
                self.transport.write(raw_error(400, "Bad Request", "invalid_request_error", "invalid_http",
                                               f"malformed HTTP request: {msg}"))
            self.transport.close()

    return HeaderTimeoutProtocol
