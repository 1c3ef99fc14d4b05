"""Attacks on the Batch API found by a fresh user (issue 16 items 1-2), each kept as a regression test: an upload
of many small form fields (chunked, so no Content-Length bounds it) must be refused, not held in memory; an
unknown `after` cursor names what it looked for; lines of a model that can take none do not hide the lines of
another. No server: the multipart reader, the store and the worker on real gateway parts."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json

import pytest

from conveyor.gateway.admission import ModelQueue
from conveyor.gateway.app import Gateway
from conveyor.gateway.batch_store import BatchStore, LinePolicy, NotFound
from conveyor.gateway.batch_worker import BatchWorker
from conveyor.gateway.config import parse_config
from conveyor.gateway.multipart import MAX_FORM_BYTES, MultipartError, read_form
from conveyor.gateway.picker import Breaker, Pool, Replica

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


def _lines(*models: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{m}-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": m, "prompt": "x", "max_tokens": 2}}).encode() + b"\n"
                    for i, m in enumerate(models))


def test_lines_of_a_model_with_room_are_not_hidden_behind_others(tmp_path):
    """40 lines for a model scaled to zero, then 10 for a served one: the served model's lines were never sent
    while the first 2 x max_in_flight pending lines all named the other (20 s of a live run: none done)."""
    cfg = parse_config({"models": [{"name": "m", "replicas": []}, {"name": "dead", "replicas": []}],
                        "tenants": [{"name": "t", "api_key_sha256": hashlib.sha256(b"k").hexdigest()}],
                        "batch": {"max_in_flight": 4}})

    async def go() -> None:
        gw = Gateway(cfg)
        for name in ("m", "dead"):
            pool = Pool(name, 8, client=None)
            gw.pools[name], gw.queues[name] = pool, ModelQueue(name, pool, 16, 0.5, 60.0)
        gw.pools["m"].replicas["r1"] = Replica("r1", Breaker(3, 5.0), started=True)
        store = BatchStore(tmp_path / "b.sqlite3")
        f = store.create_file("t", "in.jsonl", "batch", io.BytesIO(_lines(*["dead"] * 40, *["m"] * 10)))
        batch = store.create_batch("t", f["id"], "/v1/completions", "24h", 86400.0, None,
                                   LinePolicy({"m": None, "dead": None}, 100))
        worker = BatchWorker(gw, store)
        await worker._fill(store.active_batches()[0], {"m": 3, "dead": 0})
        assert worker.in_flight[batch["id"]] == {40, 41, 42}  # the first three lines of m
        assert [x.idx for x in store.pending_lines(batch["id"], 2, {40}, ["m"])] == [41, 42]
        await worker.stop()  # the lines in flight are cancelled: they stay queued
        assert len(store.pending_lines(batch["id"], 100)) == 50
        store.close()
        for pool in gw.pools.values():
            await pool.close()
        await gw.client.aclose()

    asyncio.run(go())
