"""A streaming reader of `multipart/form-data` request bodies, for file uploads (`POST /v1/files`).

Small form fields are kept in memory (each at most MAX_FIELD_BYTES); the one file part is written to a file object
as its bytes arrive, and its size is checked as it streams, so an upload is never held in memory whole and an
oversized one is refused as soon as it passes the limit. (Starlette's own form parser needs python-multipart.)
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO

MAX_FIELD_BYTES = 4096
MAX_HEAD_BYTES = 16 << 10  # a part's headers
MAX_PREAMBLE_BYTES = 64 << 10
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """A body that is not the multipart form expected; `param` names the form field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class FileTooLarge(MultipartError):
    pass


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # None: the body had no file part
    file_bytes: int = 0


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type; MultipartError when it is not one."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("the body must be multipart/form-data (fields `file` and `purpose`)")
    params = _params(content_type[len("multipart/form-data"):])
    b = params.get("boundary", "")
    if not 1 <= len(b) <= 70 or not b.isascii():
        raise MultipartError("the multipart/form-data Content-Type needs a boundary of 1-70 ASCII characters")
    return b.encode()


def _params(rest: str) -> dict[str, str]:
    out = {}
    for name, value in _PARAM.findall(rest):
        value = value.strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[name.lower()] = value
    return out


async def read_form(chunks: AsyncIterator[bytes], boundary: bytes, sink: BinaryIO, file_field: str,
                    max_file_bytes: int) -> Form:
    """Read a multipart body from `chunks`: the part named `file_field` is written to `sink`, other parts are kept
    as text fields (the last one of a name wins). Raises FileTooLarge once the file passes max_file_bytes, and
    MultipartError for a malformed or truncated body, an oversized field or head, or a second file part."""
    reader = _Reader(b"\r\n--" + boundary, sink, file_field, max_file_bytes)
    async for chunk in chunks:
        reader.feed(chunk)
    if reader.state != "end":
        raise MultipartError("the multipart body ended before its closing boundary")
    return reader.form


class _Reader:
    """The parser's state machine: preamble → (delimiter → head → content)* → end. `buf` holds what is not yet
    consumed; content is handed on except for a tail that could be the start of the next delimiter."""

    def __init__(self, delim: bytes, sink: BinaryIO, file_field: str, max_file_bytes: int) -> None:
        self.delim, self.sink, self.file_field, self.max_file_bytes = delim, sink, file_field, max_file_bytes
        self.buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
        self.state, self.skipped = "preamble", 0
        self.form = Form()
        self.part: str | None = None  # the current part's field name
        self.value = bytearray()

    def feed(self, data: bytes) -> None:
        if self.state == "end":
            return  # an epilogue is ignored
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume what the state allows; False when more input is needed."""
        if self.state == "preamble":
            i = self.buf.find(self.delim)
            if i < 0:
                self._drop(len(self.buf) - len(self.delim) + 1, MAX_PREAMBLE_BYTES, "preamble")
                return False
            del self.buf[:i + len(self.delim)]
            self.state = "delimiter"
        elif self.state == "delimiter":
            return self._after_delimiter()
        elif self.state == "head":
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    raise MultipartError("a multipart part's headers are too long")
                return False
            self._start_part(bytes(self.buf[:i]))
            del self.buf[:i + 4]
            self.state = "content"
        elif self.state == "content":
            i = self.buf.find(self.delim)
            if i < 0:
                keep = len(self.delim) - 1
                if len(self.buf) > keep:
                    self._content(bytes(self.buf[:-keep]))
                    del self.buf[:-keep]
                return False
            self._content(bytes(self.buf[:i]))
            del self.buf[:i + len(self.delim)]
            self._end_part()
            self.state = "delimiter"
        return self.state != "end"

    def _after_delimiter(self) -> bool:
        line_end = self.buf.find(b"\r\n")
        if self.buf.startswith(b"--"):
            self.state = "end"
            return False
        if line_end < 0:
            if len(self.buf) > 256:
                raise MultipartError("malformed multipart body: garbage after a boundary")
            return False
        if self.buf[:line_end].strip(b" \t"):  # only transport padding may follow a boundary
            raise MultipartError("malformed multipart body: garbage after a boundary")
        del self.buf[:line_end + 2]
        self.state = "head"
        return True

    def _drop(self, n: int, limit: int, what: str) -> None:
        if n > 0:
            del self.buf[:n]
            self.skipped += n
            if self.skipped > limit:
                raise MultipartError(f"malformed multipart body: no boundary found in its {what}")

    def _start_part(self, head: bytes) -> None:
        disposition = None
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        if disposition is None or not disposition.strip().lower().startswith("form-data"):
            raise MultipartError("every multipart part needs Content-Disposition: form-data")
        params = _params(disposition.strip()[len("form-data"):])
        self.part = params.get("name")
        if self.part is None:
            raise MultipartError("a multipart part has no name")
        if self.part == self.file_field:
            if self.form.filename is not None:
                raise MultipartError(f"only one `{self.file_field}` part is allowed", self.file_field)
            name = params.get("filename", "").encode("latin-1").decode("utf-8", "replace")
            self.form.filename = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1][:255] or "upload.jsonl"
        self.value = bytearray()

    def _content(self, data: bytes) -> None:
        if self.part == self.file_field:
            self.form.file_bytes += len(data)
            if self.form.file_bytes > self.max_file_bytes:
                raise FileTooLarge(f"the file exceeds {self.max_file_bytes} bytes (batch.max_file_bytes)",
                                   self.file_field)
            self.sink.write(data)
        else:
            self.value += data
            if len(self.value) > MAX_FIELD_BYTES:
                raise MultipartError(f"the form field {self.part[:64]!r} exceeds {MAX_FIELD_BYTES} bytes", self.part)

    def _end_part(self) -> None:
        if self.part != self.file_field:
            self.form.fields[self.part] = self.value.decode("utf-8", "replace")
        self.part = None
