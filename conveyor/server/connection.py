"""uvicorn's h11 protocol with read deadlines, so a client that dribbles its request cannot hold a connection.

uvicorn closes idle keep-alive connections but has no deadline once a request's first byte is in: a client sending
its head or body a byte at a time holds the connection (and, with `limit_concurrency`, a slot) for as long as it
likes. Here a request's head must arrive within `read_timeout` seconds of the connection opening (or of the previous
response ending), and its body within `read_timeout` seconds of its head. Past a deadline the server answers 408 in
OpenAI's error JSON (if part of a request came and no response is under way) and closes the connection. The app sees
the client as disconnected. Malformed HTTP gets OpenAI's error JSON too, instead of uvicorn's plain text.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from conveyor.server.api import error_body


def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    """A complete response that ends the connection, written past h11 (its state may not allow a response)."""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


class TimedH11Protocol(H11Protocol):
    """H11Protocol plus one read deadline per phase of a request (its head, then its body); see the module doc."""

    read_timeout: float = 30.0  # seconds; set per server with timed_h11()

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

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

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
            self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        reading_head = self.conn.their_state is h11.IDLE
        started = bool(self.conn.trailing_data[0]) if reading_head else not self.cycle.response_started
        if started:  # an idle connection is closed quietly, as keep-alive does: a 408 could cross a new request
            msg = f"the request was not received within {self.read_timeout:g} s"
            self.transport.write(_raw_response(408, "Request Timeout", error_body(408, msg, code="request_timeout")))
        self.logger.info("closed a connection: request %s not received in time", "head" if reading_head else "body")
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._cancel()
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            body = error_body(400, f"malformed HTTP request: {msg}", code="invalid_http")
            self.transport.write(_raw_response(400, "Bad Request", body))
        self.transport.close()


def timed_h11(read_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...)."""
    assert read_timeout > 0, read_timeout
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": read_timeout})
