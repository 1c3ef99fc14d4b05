"""The batch store on its own (conveyor/gateway/batch_store.py): line validation at create, the per-tenant queued
token limit, exactly-once answers, finalize (idempotent, and finished by the next call after a crash mid-way),
expiry, cancel, pagination, tenant isolation, and that everything survives reopening the database."""
from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from conveyor.gateway.batch_store import (BatchStore, BatchStoreError, LimitExceeded, LinePolicy, NotFound,
                                          StorageFull, estimate_tokens)

CHAT = "/v1/chat/completions"
POLICY = LinePolicy({"m": None, "m-alias": 8}, max_lines=100)


def _line(cid, model="m", url=CHAT, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"hi {cid}"}], **body}}


def _jsonl(*lines) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


@pytest.fixture
def store(tmp_path):
    s = BatchStore(tmp_path / "b.sqlite3")
    yield s
    s.close()


def _batch(store: BatchStore, content: bytes, tenant="a", policy=POLICY, window_s=86400.0, now=None) -> dict:
    f = store.create_file(tenant, "in.jsonl", "batch", io.BytesIO(content))
    return store.create_batch(tenant, f["id"], CHAT, "24h", window_s, {"k": "v"}, policy, now=now)


def _answer_all(store: BatchStore, batch_id: str, status: int = 200) -> None:
    for line in store.pending_lines(batch_id, 10_000):
        assert store.record_result(batch_id, line.idx, status, {"echo": line.custom_id}, f"req-{line.idx}")


def _content(store: BatchStore, tenant: str, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in store.file_content(tenant, file_id).decode().splitlines()]


def test_create_records_invalid_lines_as_answered_errors(store):
    bad = [b"{not json", b"[1, 2]", {"method": "POST", "url": CHAT, "body": {"model": "m"}},
           _line("ok1"), {**_line("x"), "method": "GET"}, _line("y", url="/v1/completions"),
           {**_line("z"), "body": [1]}, {**_line("w"), "body": {"messages": []}}, _line("v", model="nope"),
           _line("u", stream=True), b'{"custom_id": "s\\ud800", "body": {"model": "m"}}',
           b'{"custom_id": "n", "body": {"model": "m", "t": NaN}}', _line("sur", x="\ud800")]
    content = _jsonl(_line("ok0"), *bad, _line("ok0")) + b"\n  \n" + json.dumps(_line("ok2")).encode()  # no final \n
    b = _batch(store, content)
    assert b["status"] == "in_progress" and b["errors"] is None and b["metadata"] == {"k": "v"}
    assert b["request_counts"] == {"total": 16, "completed": 0, "failed": 12}
    pending = store.pending_lines(b["id"], 100)
    assert [(x.idx, x.custom_id) for x in pending] == [(0, "ok0"), (4, "ok1"), (13, "sur"), (15, "ok2")]
    assert pending[2].body["x"] == "\ud800"  # a lone surrogate inside a body is kept (the replica judges it)
    assert store.record_result(b["id"], 13, 400, {"error": {"message": "bad \ud800"}}, "r")
    _answer_all(store, b["id"])
    assert store.finalize_ready() == [b["id"]]
    b = store.get_batch("a", b["id"])
    errors = _content(store, "a", b["error_file_id"])
    assert [e["error"] and e["error"]["code"] for e in errors] == [
        "invalid_json", "invalid_request", "missing_custom_id", "invalid_method", "invalid_url", "invalid_body",
        "missing_model", "model_not_found", "invalid_body", "missing_custom_id", "invalid_json", None,
        "duplicate_custom_id"]
    assert errors[11]["response"]["body"]["error"]["message"] == "bad \ud800"  # written escaped
    del errors[11]
    assert all(e["response"] is None and e["id"].startswith("batch_req_") for e in errors)
    assert errors[0]["error"]["message"].startswith("line 2: ")
    out = _content(store, "a", b["output_file_id"])
    assert [(o["custom_id"], o["response"]["status_code"], o["response"]["body"], o["error"]) for o in out] == [
        ("ok0", 200, {"echo": "ok0"}, None), ("ok1", 200, {"echo": "ok1"}, None), ("ok2", 200, {"echo": "ok2"}, None)]
    assert out[0]["response"]["request_id"] == "req-0"


def test_unusable_inputs(store):
    for content, code in ((b"", "empty_file"), (b"\n\n", "empty_file"), (b"garbage\n", "invalid_json"),
                          (_jsonl(_line("a", url="/v1/completions")), "invalid_url")):
        b = _batch(store, content)
        assert b["status"] == "failed" and b["failed_at"] is not None and b["output_file_id"] is None
        assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert b["errors"]["data"][0]["code"] == code
    assert store.active_batches() == []
    f = store.create_file("a", "x.jsonl", "fine-tune", io.BytesIO(_jsonl(_line("a"))))
    with pytest.raises(BatchStoreError, match="purpose") as e:
        store.create_batch("a", f["id"], CHAT, "24h", 60, None, POLICY)
    assert e.value.param == "input_file_id"
    with pytest.raises(NotFound):
        store.create_batch("a", "file-nope", CHAT, "24h", 60, None, POLICY)
    with pytest.raises(BatchStoreError, match="more than 2 requests"):
        _batch(store, _jsonl(*(_line(str(i)) for i in range(3))), policy=LinePolicy({"m": None}, max_lines=2))
    assert store.counts()["batches"]["failed"] == 4 and sum(store.counts()["batches"].values()) == 4


def test_a_tenants_files_are_bounded_by_max_tenant_bytes(store):
    """One tenant cannot fill the disk that every tenant's batches need; a refused upload stores nothing."""
    store.create_file("a", "1.jsonl", "batch", io.BytesIO(b"x" * 600), max_tenant_bytes=1000)
    with pytest.raises(StorageFull) as e:
        store.create_file("a", "2.jsonl", "batch", io.BytesIO(b"y" * 500), max_tenant_bytes=1000)
    assert e.value.param == "file" and e.value.code == "storage_limit_exceeded"
    assert [f["filename"] for f in store.list_files("a")["data"]] == ["1.jsonl"]
    store.create_file("b", "3.jsonl", "batch", io.BytesIO(b"z" * 900), max_tenant_bytes=1000)  # per tenant
    store.delete_file("a", store.list_files("a")["data"][0]["id"])
    store.create_file("a", "2.jsonl", "batch", io.BytesIO(b"y" * 500), max_tenant_bytes=1000)  # room again


def test_batches_copies_of_their_lines_count_toward_max_tenant_bytes(store):
    """A batch keeps its own copy of its input's lines: twenty batches of one file (then deleted) must not store
    twenty times the limit."""
    limit = 8000
    policy = LinePolicy({"m": None}, max_lines=100, max_tenant_bytes=limit)
    f = store.create_file("a", "in.jsonl", "batch", io.BytesIO(_jsonl(_line("x", pad="p" * 1500))),
                          max_tenant_bytes=limit)
    made = 0
    with pytest.raises(StorageFull) as e:
        for _ in range(20):
            store.create_batch("a", f["id"], CHAT, "24h", 86400.0, None, policy)
            made += 1
    assert e.value.param == "input_file_id" and 1 <= made < 20
    assert store.tenant_bytes("a") <= limit
    held = store.tenant_bytes("a")
    store.delete_file("a", f["id"])
    assert store.tenant_bytes("a") == held - f["bytes"]  # the batches' lines still count
    assert store.tenant_bytes("b") == 0


def test_token_estimate_and_the_queued_tokens_limit(store):
    assert estimate_tokens("/v1/completions", {"prompt": "x" * 40, "max_tokens": 5, "n": 2}, None) == 10 + 10
    assert estimate_tokens("/v1/completions", {"prompt": [1, 2, 3]}, None) == 3 + 16
    assert estimate_tokens("/v1/completions", {"prompt": "abcd"}, 7) == 1 + 7
    assert estimate_tokens(CHAT, {"messages": [], "max_completion_tokens": 3, "max_tokens": 9}, None) == 3
    assert estimate_tokens(CHAT, {"messages": []}, None) == 1024
    chat = [{"role": "system", "content": "abcdefgh"}, {"role": "user", "content": [{"type": "text", "text": "abcd"}]}]
    assert estimate_tokens(CHAT, {"messages": chat, "max_tokens": 1}, None) == 3 + 2 * 4 + 1
    assert estimate_tokens("/v1/completions", {"prompt": ["abcd", [1, 2], "ab"], "max_tokens": 0}, None) == 4
    assert estimate_tokens("/v1/completions", {"prompt": "", "max_tokens": 10 ** 30, "n": 10 ** 9}, None) == 1 << 40
    one = estimate_tokens(CHAT, _line("0", max_tokens=10)["body"], None)
    policy = LinePolicy({"m": None}, 100, queued_tokens_limit=3 * one)
    first = _batch(store, _jsonl(_line("0", max_tokens=10), _line("1", max_tokens=10)), policy=policy)
    assert store.queued_tokens("a") == 2 * one
    with pytest.raises(LimitExceeded, match="batch_queued_tokens") as e:
        _batch(store, _jsonl(_line("2", max_tokens=10), _line("3", max_tokens=10)), policy=policy)
    assert e.value.code == "token_limit_exceeded"
    assert _batch(store, _jsonl(_line("x", max_tokens=10)), tenant="b", policy=policy)["status"] == "in_progress"
    line = store.pending_lines(first["id"], 1)[0]
    store.record_result(first["id"], line.idx, 200, {}, "r")
    assert store.queued_tokens("a") == one  # answered lines no longer count
    _batch(store, _jsonl(_line("2", max_tokens=10), _line("3", max_tokens=10)), policy=policy)
    assert store.queued_tokens("a") == 3 * one


def test_each_line_is_answered_exactly_once(store):
    b = _batch(store, _jsonl(*(_line(str(i)) for i in range(4))))
    assert [x.idx for x in store.pending_lines(b["id"], 2, exclude={0})] == [1, 2]
    assert store.record_result(b["id"], 0, 200, {"first": True}, "r0")
    assert not store.record_result(b["id"], 0, 200, {"second": True}, "r0b")  # a duplicate after a crash
    wins = []
    threads = [threading.Thread(target=lambda: wins.append(store.record_result(b["id"], 1, 500, {}, "r1")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert store.get_batch("a", b["id"])["request_counts"] == {"total": 4, "completed": 1, "failed": 1}
    assert [x.idx for x in store.pending_lines(b["id"], 10)] == [2, 3]
    assert store.counts()["lines_queued"] == 2
    assert store.finalize_ready() == []  # lines 2 and 3 are still queued
    _answer_all(store, b["id"])
    assert store.finalize_ready() == [b["id"]] and store.finalize_ready() == []
    done = store.get_batch("a", b["id"])
    assert done["status"] == "completed" and done["finalizing_at"] and done["completed_at"]
    assert [o["custom_id"] for o in _content(store, "a", done["output_file_id"])] == ["0", "2", "3"]
    err = _content(store, "a", done["error_file_id"])
    assert [(e["custom_id"], e["response"]["status_code"], e["error"]) for e in err] == [("1", 500, None)]
    assert store.get_file("a", done["output_file_id"])["purpose"] == "batch_output"
    assert not store.record_result(b["id"], 2, 200, {}, "late")
    assert store.counts()["batches"]["completed"] == 1 and store.counts()["lines_queued"] == 0


def test_expiry_answers_the_rest_with_batch_expired(store):
    b = _batch(store, _jsonl(*(_line(str(i)) for i in range(3))), window_s=10, now=1000)
    assert b["expires_at"] == 1010
    store.record_result(b["id"], 1, 200, {}, "r")
    assert store.finalize_ready(now=1009.5) == []
    assert store.finalize_ready(now=1010) == [b["id"]]
    e = store.get_batch("a", b["id"])
    assert e["status"] == "expired" and e["expired_at"] == 1010
    assert e["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert [o["custom_id"] for o in _content(store, "a", e["output_file_id"])] == ["1"]
    assert [(x["custom_id"], x["error"]["code"]) for x in _content(store, "a", e["error_file_id"])] == [
        ("0", "batch_expired"), ("2", "batch_expired")]
    assert not store.record_result(b["id"], 0, 200, {}, "late")  # an answer in flight at expiry is dropped
    assert store.active_batches() == []


def test_cancel(store):
    b = _batch(store, _jsonl(*(_line(str(i)) for i in range(3))))
    store.record_result(b["id"], 0, 200, {}, "r")
    c = store.cancel_batch("a", b["id"])
    assert c["status"] == "cancelling" and c["cancelling_at"] is not None
    assert store.queued_tokens("a") == 0  # a cancelling batch dispatches nothing more
    assert [x["status"] for x in store.active_batches()] == ["cancelling"]
    assert store.finalize_ready(busy={b["id"]}) == []  # a line still in flight: wait for it
    assert store.record_result(b["id"], 1, 200, {}, "r")
    assert store.finalize_ready() == [b["id"]]
    c = store.get_batch("a", b["id"])
    assert c["status"] == "cancelled" and c["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert [(x["custom_id"], x["error"]["code"]) for x in _content(store, "a", c["error_file_id"])] == [
        ("2", "batch_cancelled")]
    assert store.cancel_batch("a", b["id"])["status"] == "cancelled"  # again: unchanged
    done = _batch(store, _jsonl(_line("0")))
    _answer_all(store, done["id"])
    store.finalize_ready()
    with pytest.raises(BatchStoreError, match="completed") as e:
        store.cancel_batch("a", done["id"])
    assert e.value.code == "batch_not_cancellable"


def test_tenants_see_only_their_own(store):
    b = _batch(store, _jsonl(_line("0")))
    f = b["input_file_id"]
    for call in (lambda: store.get_file("b", f), lambda: store.file_content("b", f),
                 lambda: store.file_chunk("b", f, 0), lambda: store.delete_file("b", f),
                 lambda: store.get_batch("b", b["id"]), lambda: store.cancel_batch("b", b["id"]),
                 lambda: store.create_batch("b", f, CHAT, "24h", 60, None, POLICY),
                 lambda: store.list_batches("b", after=b["id"]), lambda: store.list_files("b", after=f)):
        with pytest.raises(NotFound):
            call()
    assert store.list_batches("b")["data"] == [] and store.list_files("b")["data"] == []
    assert store.get_batch("a", b["id"])["status"] == "in_progress"  # b's cancel changed nothing
    assert store.delete_file("a", f) == {"id": f, "object": "file", "deleted": True}
    with pytest.raises(NotFound):
        store.get_file("a", f)
    assert len(store.pending_lines(b["id"], 10)) == 1  # the batch keeps its lines


def test_lists_page_newest_first(store):
    ids = [_batch(store, _jsonl(_line("0")))["id"] for _ in range(5)]
    page = store.list_batches("a", limit=2)
    assert [x["id"] for x in page["data"]] == ids[:2:-1][:2] == [ids[4], ids[3]]
    assert page["has_more"] and page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = store.list_batches("a", after=page["last_id"], limit=10)
    assert [x["id"] for x in page["data"]] == [ids[2], ids[1], ids[0]] and not page["has_more"]
    assert store.list_files("a", purpose="batch", limit=3)["has_more"]
    assert store.list_files("a", purpose="batch_output")["data"] == []


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "b.sqlite3"
    s = BatchStore(path)
    b = _batch(s, _jsonl(_line("0"), _line("1")))
    s.record_result(b["id"], 0, 200, {"x": 1}, "r")
    s.close()
    s = BatchStore(path)
    assert s.get_batch("a", b["id"])["request_counts"]["completed"] == 1
    assert [x.idx for x in s.pending_lines(b["id"], 10)] == [1]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_finalize_after_a_crash_mid_transaction(tmp_path):
    """A process killed (os._exit: no cleanup at all) while writing the output file: the batch is left
    `finalizing` with nothing of its files; the next finalize_ready completes it, with each line once."""
    path = tmp_path / "b.sqlite3"
    s = BatchStore(path)
    b = _batch(s, _jsonl(*(_line(str(i)) for i in range(5))))
    _answer_all(s, b["id"])
    s.close()
    child = textwrap.dedent(f"""
        import os, conveyor.gateway.batch_store as bs
        s = bs.BatchStore({str(path)!r})
        bs.CHUNK_BYTES = 200  # several chunks per file
        real = bs.BatchStore._put_chunk
        def put(self, c, file_id, seq, data):
            real(self, c, file_id, seq, data)
            if seq == 1:
                os._exit(9)
        bs.BatchStore._put_chunk = put
        s.finalize_ready()
    """)
    proc = subprocess.run([sys.executable, "-c", child], env=dict(os.environ), capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    s = BatchStore(path)
    left = s.get_batch("a", b["id"])
    assert left["status"] == "finalizing" and left["output_file_id"] is None
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1  # the input file only
    assert db.execute("SELECT COUNT(*) FROM file_chunks WHERE file_id != ?", (b["input_file_id"],)).fetchone()[0] == 0
    assert s.finalize_ready() == [b["id"]] and s.finalize_ready() == []
    done = s.get_batch("a", b["id"])
    assert done["status"] == "completed"
    assert [o["custom_id"] for o in _content(s, "a", done["output_file_id"])] == ["0", "1", "2", "3", "4"]
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 2
    s.close()


def test_finalize_rolls_back_on_an_error(store, monkeypatch):
    b = _batch(store, _jsonl(_line("0"), b"bad"))
    _answer_all(store, b["id"])

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(BatchStore, "_put_chunk", boom)
    with pytest.raises(OSError):
        store.finalize_ready()
    monkeypatch.undo()
    assert store.get_batch("a", b["id"])["status"] == "finalizing"
    assert store.finalize_ready() == [b["id"]]
    done = store.get_batch("a", b["id"])
    assert len(_content(store, "a", done["output_file_id"])) == len(_content(store, "a", done["error_file_id"])) == 1


def test_a_path_that_cannot_be_a_store_is_an_oserror_naming_it(tmp_path):
    from conveyor.gateway.app import build_gateway
    not_db = tmp_path / "not.sqlite3"
    not_db.write_bytes(b"plain text, not a database " * 10)
    blocked = tmp_path / "file" / "b.sqlite3"
    (tmp_path / "file").write_text("a file where a folder should be")
    for path in (not_db, blocked):
        with pytest.raises(OSError, match=f"the batch store {path} cannot be opened"):
            BatchStore(path)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(json.dumps({"models": [{"name": "m"}], "tenants": [{"name": "a", "api_key_sha256": "0" * 64}],
                               "batch": {"db_path": str(not_db)}}))
    with pytest.raises(OSError, match="not a database"):  # conveyor gateway prints it as one line, exit 2
        build_gateway(str(cfg))
