"""The Batch API through a real gateway process and the `openai` SDK, unchanged: files (upload, retrieve, list,
content, delete), batches (create, retrieve, list with pagination, cancel), every refusal in OpenAI's error JSON
with its param, tenants kept apart, the per-tenant queued-token limit, and the whole round trip: a mixed file with
bad lines uploaded, run by the gateway's batch worker on a demo replica, polled to `completed`, downloaded. One
replica and one gateway for the module."""
from __future__ import annotations

import hashlib
import json
import time

import httpx
import openai
import pytest
import yaml
from server_process import GatewayProcess, ServerProcess

from conveyor.prometheus_text import samples

KEYS = {"a": "batch-key-a", "b": "batch-key-b", "small": "batch-key-small"}
MAX_FILE_BYTES = 64 << 10
CHAT = "/v1/chat/completions"


def _tenant(name: str, **kw) -> dict:
    return {"name": name, "api_key_sha256": hashlib.sha256(KEYS[name].encode()).hexdigest(),
            "requests_per_minute": 100_000, "tokens_per_minute": 100_000_000, **kw}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    replica = ServerProcess("--max-num-seqs", "16", "--num-kv-blocks", "256", "--max-model-len", "1024",
                            "--served-model-name", "m")
    d = tmp_path_factory.mktemp("batch-api")
    (d / "gateway.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "m", "replicas": [replica.base_url], "tokenizer": "demo"}],
        "tenants": [_tenant("a"), _tenant("b"), _tenant("small", batch_queued_tokens=200)],
        "batch": {"db_path": str(d / "batches.sqlite3"), "max_file_bytes": MAX_FILE_BYTES, "max_lines": 100},
        "health_interval_s": 0.2}))
    g = GatewayProcess(str(d / "gateway.yaml"))
    yield g
    g.stop()
    replica.stop()


def _client(g: GatewayProcess, tenant: str = "a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.base_url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def _line(cid: str, url: str = CHAT, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": "m", "messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": 4,
                     "temperature": 0, **body}}


def _jsonl(*lines) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def _upload(client: openai.OpenAI, content: bytes, name: str = "in.jsonl"):
    return client.files.create(file=(name, content, "application/jsonl"), purpose="batch")


def _raw(g: GatewayProcess, method: str, path: str, tenant: str | None = "a", headers: dict | None = None,
         **kw) -> httpx.Response:
    auth = {"authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.request(method, g.base_url + path, headers={**auth, **(headers or {})}, timeout=60, **kw)


def _error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], err
    return err


def _slots_held(g: GatewayProcess) -> float:
    text = httpx.get(f"{g.base_url}/metrics", timeout=5).text
    held = [s.value for s in samples(text) if s.name == "conveyor_gateway_concurrency_slots"]
    assert held, "no concurrency_slots sample: no slot was ever taken"
    return sum(held)


def _wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {b.status} after {timeout} s: {b.request_counts}")


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_files_round_trip_and_tenant_isolation(gw):
    a, b = _client(gw), _client(gw, "b")
    content = _jsonl(_line("x"), _line("y"))
    f = _upload(a, content, "dir/my file.jsonl")
    assert (f.object, f.purpose, f.bytes, f.filename, f.status) == ("file", "batch", len(content), "my file.jsonl",
                                                                   "processed")
    assert f.id.startswith("file-") and a.files.retrieve(f.id) == f
    assert a.files.content(f.id).content == content
    assert f.id in [x.id for x in a.files.list(purpose="batch")]
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert f.id not in [x.id for x in b.files.list()]
    deleted = a.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)


def test_upload_refusals(gw):
    form = {"files": {"file": ("in.jsonl", b"{}\n")}}
    _error(_raw(gw, "POST", "/v1/files", data={"purpose": "fine-tune"}, **form), 400, "purpose")
    _error(_raw(gw, "POST", "/v1/files", **form), 400, "purpose")
    _error(_raw(gw, "POST", "/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}), 400, "file")
    _error(_raw(gw, "POST", "/v1/files", json={"purpose": "batch"}), 400, None)
    big = _raw(gw, "POST", "/v1/files", data={"purpose": "batch"},
               files={"file": ("in.jsonl", b"x" * (MAX_FILE_BYTES + 1))})
    assert "max_file_bytes" in _error(big, 413, "file")["message"]
    body = b"--XX\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX\r\ncontent-dispo"
    _error(_raw(gw, "POST", "/v1/files", content=body,
                headers={"content-type": "multipart/form-data; boundary=XX"}), 400, None)  # truncated
    assert _raw(gw, "POST", "/v1/files", tenant=None, data={"purpose": "batch"}, **form).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="wrong", max_retries=0).batches.list()
    assert _slots_held(gw) == 0  # every refusal freed its tenant's concurrency slot


def test_batch_requests_refused_with_their_param(gw):
    a = _client(gw)
    f = _upload(a, _jsonl(_line("x")))
    good = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h"}
    for change, param in (({"endpoint": "/v1/embeddings"}, "endpoint"),
                          ({"completion_window": "25"}, "completion_window"),
                          ({"completion_window": "8d"}, "completion_window"),
                          ({"completion_window": "169h"}, "completion_window"),
                          ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
                          ({"metadata": {"k": 1}}, "metadata"), ({"input_file_id": None}, "input_file_id")):
        _error(_raw(gw, "POST", "/v1/batches", json={**good, **change}), 400, param)
    _error(_raw(gw, "POST", "/v1/batches", json={**good, "input_file_id": "file-nope"}), 404, "input_file_id")
    _error(_raw(gw, "POST", "/v1/batches", content=b"{oops"), 400, None)
    _error(_raw(gw, "POST", "/v1/batches", content=b"[]"), 400, None)
    _error(_raw(gw, "POST", "/v1/batches", content=b'{"input_file_id": "file-\\ud800"}'), 400, None)
    _error(_raw(gw, "GET", "/v1/batches?limit=0"), 400, "limit")
    _error(_raw(gw, "GET", "/v1/batches?after=batch_nope"), 404, "after")
    _error(_raw(gw, "GET", "/v1/batches/batch_nope"), 404, "batch_id")
    with pytest.raises(openai.NotFoundError):
        _client(gw, "b").batches.create(**good)  # b cannot use a's file
    many = _upload(a, _jsonl(*(_line(str(i)) for i in range(101))))
    err = _error(_raw(gw, "POST", "/v1/batches", json={**good, "input_file_id": many.id}), 400, "input_file_id")
    assert "max_lines" in err["message"]


def test_queued_tokens_limit_is_a_429(gw):
    small = _client(gw, "small")
    f = _upload(small, _jsonl(*(_line(str(i), max_tokens=100) for i in range(3))))
    with pytest.raises(openai.RateLimitError) as e:
        small.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert e.value.code == "token_limit_exceeded" and "batch_queued_tokens" in e.value.message


def test_create_list_and_cancel(gw):
    a, b = _client(gw), _client(gw, "b")
    f = _upload(a, _jsonl(*(_line(str(i), max_tokens=400, ignore_eos=True) for i in range(30))))
    made = [a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata={"n": str(i)})
            for i in range(3)]
    assert all(x.status == "in_progress" and x.request_counts.total == 30 for x in made)
    assert made[0].expires_at == made[0].created_at + 86400
    page = a.batches.list(limit=2)
    assert [x.id for x in page.data] == [made[2].id, made[1].id] and page.has_more
    nxt = a.batches.list(limit=2, after=page.data[-1].id)
    assert nxt.data[0].id == made[0].id
    assert [x.id for x in b.batches.list().data if x.id in {m.id for m in made}] == []
    for call in (b.batches.retrieve, b.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call(made[0].id)
    for m in made:
        c = a.batches.cancel(m.id)
        assert c.status in ("cancelling", "cancelled") and c.cancelling_at is not None
    cancelled = 0
    for m in made:
        done = _wait_done(a, m.id)
        assert done.status == "cancelled" and done.metadata == m.metadata
        counts = done.request_counts
        assert counts.completed + counts.failed == counts.total == 30
        errors = _lines(a, done.error_file_id)
        assert {e["error"]["code"] for e in errors if e["response"] is None} <= {"batch_cancelled"}
        cancelled += sum(e["response"] is None for e in errors)
        assert len(errors) + len(_lines(a, done.output_file_id)) == 30
    assert cancelled > 0  # 90 lines of 400 tokens each: most were never sent
    with pytest.raises(openai.BadRequestError):
        a.batches.cancel(_wait_done(a, _done_batch(a)).id)


def _done_batch(a: openai.OpenAI) -> str:
    f = _upload(a, _jsonl(_line("only")))
    return a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id


def test_mixed_file_runs_to_completion(gw):
    """Upload a file with good and bad lines, create, poll to completed, download: each custom_id exactly once,
    answers in input order in the output file, the bad lines (and the replica's 400) in the error file."""
    a = _client(gw)
    good = [_line(f"ok-{i}") for i in range(6)]
    lines = [good[0], b"not json", good[1], {**_line("wrong-url"), "url": "/v1/completions"}, good[2],
             _line("too-long", max_tokens=5000), good[3], _line("ghost", model="nope"), good[4], good[5]]
    f = _upload(a, _jsonl(*lines))
    batch = a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert batch.request_counts.total == 10 and batch.request_counts.failed == 3
    done = _wait_done(a, batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at and done.in_progress_at
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 4)
    out, errors = _lines(a, done.output_file_id), _lines(a, done.error_file_id)
    assert [o["custom_id"] for o in out] == [f"ok-{i}" for i in range(6)]
    for o in out:
        assert o["error"] is None and o["id"].startswith("batch_req_")
        resp = o["response"]
        assert resp["status_code"] == 200 and resp["request_id"]
        assert resp["body"]["object"] == "chat.completion" and resp["body"]["usage"]["completion_tokens"] <= 4
    by_id = {e["custom_id"]: e for e in errors}
    assert list(by_id) == [None, "wrong-url", "too-long", "ghost"]
    assert by_id[None]["error"]["code"] == "invalid_json" and by_id["ghost"]["error"]["code"] == "model_not_found"
    assert by_id["too-long"]["response"]["status_code"] == 400  # the replica's (or the gateway's) answer
    assert by_id["too-long"]["response"]["body"]["error"]["param"]
    assert a.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.NotFoundError):
        _client(gw, "b").files.content(done.output_file_id)
