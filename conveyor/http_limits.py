"""Limits on what a client may make an HTTP server wait for (slowloris and oversized bodies), shared by
`conveyor serve` and `conveyor gateway`.

uvicorn closes idle keep-alive connections but has no deadline once a request's first byte is in: a client sending
its head or body a byte at a time holds the connection for as long as it likes.

- `timed_h11(read_timeout, ...)`: a uvicorn `http=` protocol (h11) with one read deadline per phase of a request:
  its head must arrive within `read_timeout` seconds of the connection opening (or of the previous response
  ending), its body within `body_timeout` of its head. Past a deadline it answers 408 in OpenAI's error JSON (if
  part of a request came and no response is under way) and closes the connection; the app sees a disconnect.
  Malformed HTTP gets OpenAI's error JSON too, instead of uvicorn's plain text.
- `timed_httptools(...)`: the same deadlines and answers for uvicorn's httptools protocol (a faster parser), and
  a bound on a request's head (MAX_HEAD_BYTES, h11's own; httptools has none): past it 431 and close.
- `timed_http(parser, ...)` / `event_loop(loop)`: the protocol class and the uvicorn `loop=` for a configured
  `http` ("auto" | "h11" | "httptools") and `loop` ("auto" | "asyncio" | "uvloop"); "auto" picks httptools and
  uvloop when they are installed, else h11 and asyncio.
- `read_body(chunks, max_bytes, timeout_s)`: read a request body incrementally in the app, stopping at `max_bytes`
  (nothing beyond it is buffered) or when the whole body has not arrived within `timeout_s`.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from collections.abc import AsyncIterator, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
MAX_HEAD_BYTES = 16 * 1024  # a request's head: h11's own bound (max_incomplete_event_size), kept with httptools


def valid_request_id(rid: str) -> bool:
    """A client's X-Request-Id is used as is only when it is 1-128 visible ASCII characters: it goes into headers,
    logs and every streamed event, so a long or odd one would be copied thousands of times."""
    return _REQUEST_ID.fullmatch(rid) is not None


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


class _ReadDeadlines:
    """What the timed protocols share: the expiry of a read deadline and OpenAI-JSON answers to malformed HTTP. A
    subclass arms `_deadline` per phase and says, in `_reading_state()`, whether it is reading a request's head
    (else its body) and whether that phase has begun (a byte of the head arrived; the body's response not started)."""

    read_timeout: float = 30.0  # seconds, for the head; set per server with timed_h11() / timed_httptools()
    body_timeout: float = 30.0  # seconds, for the body
    on_timeout: Callable[[], None] | None = None  # called when a partly sent head is cut off (the app never saw it)
    _deadline: asyncio.TimerHandle | None

    def _reading_state(self) -> tuple[bool, bool]:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        reading_head, started = self._reading_state()
        if started:  # an idle connection is closed quietly, as keep-alive does: a 408 could cross a new request
            what = "headers" if reading_head else "body"
            self.transport.write(raw_error(408, "Request Timeout", "timeout_error", "request_timeout",
                                           f"the request {what} did not arrive within "
                                           f"{self.read_timeout if reading_head else self.body_timeout:g} s"))
        self.logger.info("closed a connection: request %s not received in time", "head" if reading_head else "body")
        self.transport.close()
        if started and reading_head and self.on_timeout is not None:
            self.on_timeout()

    def send_400_response(self, msg: str) -> None:  # malformed HTTP: OpenAI's error JSON, not plain text
        self._cancel()
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            self.transport.write(raw_error(400, "Bad Request", "invalid_request_error", "invalid_http",
                                           f"malformed HTTP request: {msg}"))
        self.transport.close()


class TimedH11Protocol(_ReadDeadlines, H11Protocol):
    """H11Protocol plus one read deadline per phase of a request (its head, then its body); see the module doc."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: tuple | None = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Arm a fresh deadline whenever reading enters a new phase (a request's head, its body); drop it once the
        request is in."""
        state = self.conn.their_state
        phase = (state, self.cycle)
        if phase == self._phase:
            return
        self._phase = phase
        self._cancel()
        if state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            timeout = self.read_timeout if state is h11.IDLE else self.body_timeout
            self._deadline = self.loop.call_later(timeout, self._expired)

    def _reading_state(self) -> tuple[bool, bool]:
        reading_head = self.conn.their_state is h11.IDLE
        return reading_head, bool(self.conn.trailing_data[0]) if reading_head else not self.cycle.response_started


def timed_h11(read_timeout: float, body_timeout: float | None = None,
              on_timeout: Callable[[], None] | None = None) -> type[TimedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...): `read_timeout` seconds for a request's head,
    `body_timeout` (default the same) for its body; on_timeout() is called for each connection cut off mid-head."""
    assert read_timeout > 0 and (body_timeout is None or body_timeout > 0), (read_timeout, body_timeout)
    return type("TimedH11Protocol", (TimedH11Protocol,),
                {"read_timeout": read_timeout, "body_timeout": body_timeout or read_timeout,
                 "on_timeout": staticmethod(on_timeout) if on_timeout else None})


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if _installed("httptools"):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
else:  # the fallback is h11 (timed_http)
    HttpToolsProtocol = asyncio.Protocol  # type: ignore[misc,assignment]


class TimedHttpToolsProtocol(_ReadDeadlines, HttpToolsProtocol):  # type: ignore[misc,valid-type]
    """HttpToolsProtocol plus the read deadlines and error answers of TimedH11Protocol. httptools reports a
    request's phases through parser callbacks (message begin, headers complete, message complete) where h11 has
    states, so the phase is kept here: "head" (reading the next request's head), "body", or None (a request is
    in and being answered)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = None
        self._head_begun = False  # a byte of the next request's head arrived
        self._head_bytes = 0  # bytes received while reading the next request's head
        super().connection_made(transport)
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        # httptools buffers a head (and one header's value) whatever its size: bounded here, as h11 bounds it
        if self._reading == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading == "head" and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._cancel()
            self.transport.write(raw_error(431, "Request Header Fields Too Large", "invalid_request_error",
                                           "request_header_fields_too_large",
                                           f"the request head exceeds {MAX_HEAD_BYTES} bytes"))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel()
        self._reading = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._reading == "body":  # a pipelined request whose body waited for this response: a fresh deadline
            self._arm("body")
        elif self._reading is None and self.cycle.response_complete:
            self._arm("head")

    def _arm(self, phase: str) -> None:
        self._cancel()
        self._reading = phase
        if phase == "head":
            self._head_begun, self._head_bytes = False, 0
        if not self.transport.is_closing():
            timeout = self.read_timeout if phase == "head" else self.body_timeout
            self._deadline = self.loop.call_later(timeout, self._expired)


    def _reading_state(self) -> tuple[bool, bool]:
        reading_head = self._reading == "head"
        return reading_head, self._head_begun if reading_head else not self.cycle.response_started


def timed_httptools(read_timeout: float, body_timeout: float | None = None,
                    on_timeout: Callable[[], None] | None = None) -> type[TimedHttpToolsProtocol]:
    """As timed_h11, for httptools (which must be installed)."""
    assert _installed("httptools"), "httptools is not installed"
    assert read_timeout > 0 and (body_timeout is None or body_timeout > 0), (read_timeout, body_timeout)
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,),
                {"read_timeout": read_timeout, "body_timeout": body_timeout or read_timeout,
                 "on_timeout": staticmethod(on_timeout) if on_timeout else None})


def timed_http(parser: str, read_timeout: float, body_timeout: float | None = None,
               on_timeout: Callable[[], None] | None = None) -> type[asyncio.Protocol]:
    """The uvicorn `http=` protocol for `parser` ("auto": httptools when installed, else h11; "h11"; "httptools"),
    with the read deadlines of timed_h11. Raises ValueError for an unknown parser or httptools not installed."""
    if parser == "auto":
        parser = "httptools" if _installed("httptools") else "h11"
    if parser == "h11":
        return timed_h11(read_timeout, body_timeout, on_timeout)
    if parser == "httptools" and _installed("httptools"):
        return timed_httptools(read_timeout, body_timeout, on_timeout)
    raise ValueError(f"http parser {parser!r} is not available (h11, or httptools when installed)")


def event_loop(loop: str) -> str:
    """uvicorn's `loop=` for `loop` ("auto": uvloop when installed, else asyncio; "asyncio"; "uvloop"). Raises
    ValueError for an unknown loop, or uvloop not installed."""
    if loop == "auto":
        return "uvloop" if _installed("uvloop") else "asyncio"
    if loop == "asyncio" or (loop == "uvloop" and _installed("uvloop")):
        return loop
    raise ValueError(f"event loop {loop!r} is not available (asyncio, or uvloop when installed)")
