"""Streaming `multipart/form-data` uploads (`POST /v1/files`) over python-multipart's push parser.

Small form fields are kept in memory (each at most MAX_FIELD_BYTES); the one file part is written to a file object
as its bytes arrive, and its size is checked as it streams, so an upload is never held in memory whole and an
oversized one is refused as soon as it passes the limit. (Starlette's `request.form()` spools files too, but puts no
bound on a file's size.)
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 4096
MAX_HEAD_BYTES = 16 << 10  # one header line of a part
MAX_FORM_BYTES = 64 << 10  # all part headers and small fields together (a chunked body has no Content-Length)


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
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary", b"")
    if kind != b"multipart/form-data":
        raise MultipartError("the body must be multipart/form-data (fields `file` and `purpose`)")
    if not 1 <= len(boundary) <= 70:
        raise MultipartError("the multipart/form-data Content-Type needs a boundary of 1-70 characters")
    return boundary


async def read_form(chunks: AsyncIterator[bytes], boundary: bytes, sink: BinaryIO, file_field: str,
                    max_file_bytes: int) -> Form:
    """Read a multipart body from `chunks`: the part named `file_field` is written to `sink`, other parts are kept
    as text fields (the last one of a name wins). Raises FileTooLarge once the file passes max_file_bytes, and
    MultipartError for a malformed or truncated body, an oversized field or header, more than MAX_FORM_BYTES of
    part headers and fields in all, or a second file part."""
    reader = _Reader(sink, file_field, max_file_bytes)
    parser = MultipartParser(boundary, reader.callbacks(), max_header_size=MAX_HEAD_BYTES)
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise MultipartError(f"malformed multipart body: {e}") from None
    if not reader.ended:
        raise MultipartError("the multipart body ended before its closing boundary")
    return reader.form


class _Reader:
    """The parser's callbacks: collect each part's headers, then route its bytes to the sink or a field."""

    def __init__(self, sink: BinaryIO, file_field: str, max_file_bytes: int) -> None:
        self.sink, self.file_field, self.max_file_bytes = sink, file_field, max_file_bytes
        self.form = Form()
        self.ended = False
        self.headers: dict[bytes, bytes] = {}
        self.header_field, self.header_value = bytearray(), bytearray()
        self.part: str | None = None  # the current part's field name
        self.value = bytearray()
        self.form_bytes = 0  # part headers and field values so far: bounded, whatever the number of parts

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end,
                "on_end": self._finished}

    def _begin(self) -> None:
        self.headers, self.part, self.value = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self.header_value += data[start:end]

    def _count(self, n: int) -> None:
        self.form_bytes += n
        if self.form_bytes > MAX_FORM_BYTES:
            raise MultipartError(f"the form's part headers and fields exceed {MAX_FORM_BYTES} bytes in all (beyond "
                                 "the file)")

    def _header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        kind, params = parse_options_header(self.headers.get(b"content-disposition"))
        if kind != b"form-data" or b"name" not in params:
            raise MultipartError("every multipart part needs Content-Disposition: form-data with a name")
        self.part = params[b"name"].decode("utf-8", "replace")
        if self.part == self.file_field:
            if self.form.filename is not None:
                raise MultipartError(f"only one `{self.file_field}` part is allowed", self.file_field)
            name = params.get(b"filename", b"").decode("utf-8", "replace")
            self.form.filename = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1][:255] or "upload.jsonl"

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.part == self.file_field:
            self.form.file_bytes += end - start
            if self.form.file_bytes > self.max_file_bytes:
                raise FileTooLarge(f"the file exceeds {self.max_file_bytes} bytes (batch.max_file_bytes)",
                                   self.file_field)
            self.sink.write(data[start:end])
        else:
            self._count(end - start)
            self.value += data[start:end]
            if len(self.value) > MAX_FIELD_BYTES:
                raise MultipartError(f"the form field {self.part[:64]!r} exceeds {MAX_FIELD_BYTES} bytes", self.part)

    def _end(self) -> None:
        if self.part is not None and self.part != self.file_field:
            self.form.fields[self.part] = self.value.decode("utf-8", "replace")
        self.part = None

    def _finished(self) -> None:
        self.ended = True
