"""Attacks on the Batch API found by a fresh user (issue 16 items 1-2), each kept as a regression test: an upload
of many small form fields (chunked, so no Content-Length bounds it) must be refused, not held in memory; an
unknown `after` cursor names what it looked for. No server: the multipart reader and the store on their own."""
from __future__ import annotations

import asyncio
import io

import pytest

from conveyor.gateway.batch_store import BatchStore, NotFound
from conveyor.gateway.multipart import MAX_FORM_BYTES, MultipartError, read_form

BOUNDARY = b"BB"


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--BB\r\nContent-Disposition: " + disp.encode() + b"\r\n\r\n" + value + b"\r\n"


async def _chunks(parts: list[bytes]):
    for p in parts:
        yield p
    yield b"--BB--\r\n"


def _read(parts: list[bytes], sink: io.BytesIO, max_file_bytes: int = 1 << 20):
    return asyncio.run(read_form(_chunks(parts), BOUNDARY, sink, "file", max_file_bytes))


def test_many_small_fields_are_refused_not_kept():
    """Each field is under its own 4096-byte bound, but 1000 distinct ones (~4 MB) once all were kept in memory."""
    fields = [_part(f"f{i}", b"v" * 4000) for i in range(1000)]
    with pytest.raises(MultipartError, match="exceed 65536 bytes in all"):
        _read([*fields, _part("purpose", b"batch"), _part("file", b"{}", "a.jsonl")], io.BytesIO())


def test_many_long_field_names_are_refused():
    """Empty values under distinct 8 KB names: the names were kept as the fields' keys, without bound."""
    fields = [_part(f"{i}" + "n" * 8000, b"") for i in range(100)]
    with pytest.raises(MultipartError, match="in all"):
        _read([*fields, _part("file", b"{}", "a.jsonl")], io.BytesIO())


def test_file_bytes_do_not_count_against_the_form_bound():
    sink = io.BytesIO()
    content = b'{"custom_id": "x"}\n' * ((MAX_FORM_BYTES // 19) + 100)
    form = _read([_part("purpose", b"batch"), _part("file", content, "in.jsonl")], sink)
    assert form.fields == {"purpose": "batch"} and form.filename == "in.jsonl"
    assert sink.getvalue() == content and form.file_bytes == len(content) > MAX_FORM_BYTES


def test_unknown_after_names_what_it_looked_for(tmp_path):
    store = BatchStore(tmp_path / "b.sqlite3")
    try:
        with pytest.raises(NotFound, match="names no batch of yours") as e:
            store.list_batches("a", after="batch_nope")
        assert e.value.param == "after"
        with pytest.raises(NotFound, match="names no file of yours"):
            store.list_files("a", after="file-nope")
    finally:
        store.close()
