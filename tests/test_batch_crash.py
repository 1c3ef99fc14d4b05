"""The batch tier survives `kill -9`: a batch of 200 lines on a real gateway + replica (processes), the gateway
killed with SIGKILL at random points three times (and stopped with SIGTERM once, which must end it promptly and
cleanly with lines in flight), restarted on the same database each time. Then the batch completes, every custom_id
appears exactly once across the output and error files, and lines answered before a kill are not generated again
(the replica, which lives through the kills, counts every generation it finished)."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import time

import httpx
import pytest
import yaml

from conveyor.prometheus_text import samples
from server_process import GatewayProcess, ServerProcess

KEY = "batch-crash-key"
LINES, TOO_LONG = 200, 10  # TOO_LONG of the lines ask for more tokens than the context: final 400s, error file
MAX_IN_FLIGHT = 8  # batch.max_in_flight: at most this many lines are in flight when the gateway is killed
KILLS = 3
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def replica():
    server = ServerProcess("--max-num-seqs", "16")
    yield server
    server.stop()


def _config(tmp_path, replica_url: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "demo", "replicas": [replica_url], "tokenizer": "demo"}],
        "tenants": [{"name": "nightly", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "batch": {"db_path": str(tmp_path / "batches.sqlite3"), "max_in_flight": MAX_IN_FLIGHT},
        "health_interval_s": 0.2}))
    return str(path)


def _input_file() -> bytes:
    lines = []
    for i in range(LINES):
        max_tokens = 10**6 if i % (LINES // TOO_LONG) == 7 else 4
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": "demo", "prompt": f"request number {i}", "max_tokens": max_tokens,
                                          "temperature": 0}}))
    return ("\n".join(lines) + "\n").encode()


def _generations(replica: ServerProcess) -> float:
    """Requests the replica finished generating (stop or length; not aborted ones)."""
    text = httpx.get(f"{replica.base_url}/metrics", timeout=5).text
    return sum(s.value for s in samples(text) if s.name == "vllm:request_success_total"
               and s.labels.get("finished_reason") in ("stop", "length"))


def _batch(gw: GatewayProcess, batch_id: str) -> dict:
    r = httpx.get(f"{gw.base_url}/v1/batches/{batch_id}", headers=HEADERS, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def _answered(b: dict) -> int:
    return b["request_counts"]["completed"] + b["request_counts"]["failed"]


def _kill_when(gw: GatewayProcess, batch_id: str, answered: int, jitter_s: float, sig: signal.Signals) -> int:
    """Signal the gateway once `answered` lines are answered, plus jitter_s; returns the count seen before. SIGTERM
    must end it within seconds (the worker cancels its lines in flight) without a traceback."""
    deadline = time.monotonic() + 60
    while (seen := _answered(_batch(gw, batch_id))) < answered:
        assert time.monotonic() < deadline, f"the batch stalled at {seen} answered lines:\n{gw.logs()[-3000:]}"
        time.sleep(0.02)
    time.sleep(jitter_s)
    gw.proc.send_signal(sig)
    gw.proc.wait(15)
    logs = gw.logs()
    gw.stop()
    if sig == signal.SIGTERM:
        assert gw.proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in logs, logs[-3000:]
    return seen


def _file_lines(gw: GatewayProcess, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    r = httpx.get(f"{gw.base_url}/v1/files/{file_id}/content", headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_batch_survives_three_sigkills_and_a_sigterm(tmp_path, replica):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    config = _config(tmp_path, replica.base_url)
    before = _generations(replica)
    gw = GatewayProcess(config)
    try:
        up = httpx.post(f"{gw.base_url}/v1/files", headers=HEADERS, data={"purpose": "batch"},
                        files={"file": ("in.jsonl", _input_file())}, timeout=30)
        assert up.status_code == 200, up.text
        created = httpx.post(f"{gw.base_url}/v1/batches", headers=HEADERS, timeout=30, json={
            "input_file_id": up.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]
        # kill points spread over the batch, each with a random delay on top (lines keep finishing meanwhile)
        points = sorted(rng.sample(range(15, 170), KILLS + 1))
        signals = [signal.SIGKILL] * KILLS
        signals.insert(rng.randrange(KILLS + 1), signal.SIGTERM)
        answered_at_kills = []
        for point, sig in zip(points, signals):
            answered_at_kills.append(_kill_when(gw, batch_id, point, rng.uniform(0, 0.25), sig))
            gw = GatewayProcess(config)
        deadline = time.monotonic() + 90
        while (b := _batch(gw, batch_id))["status"] != "completed":
            assert b["status"] in ("in_progress", "finalizing"), b
            assert time.monotonic() < deadline, f"seed {seed}: not completed: {b}\n{gw.logs()[-3000:]}"
            time.sleep(0.05)
        out, err = _file_lines(gw, b["output_file_id"]), _file_lines(gw, b["error_file_id"])
    finally:
        gw.stop()

    why = f"seed {seed}, {[s.name for s in signals]} at {answered_at_kills} answered lines"
    ids = [line["custom_id"] for line in out + err]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES)), why  # each exactly once
    assert b["request_counts"] == {"total": LINES, "completed": LINES - TOO_LONG, "failed": TOO_LONG}, why
    assert all(line["response"]["status_code"] == 200 and line["response"]["body"]["choices"] for line in out), why
    assert all(line["response"]["status_code"] == 400 for line in err), why
    assert all(line["custom_id"] == f"line-{int(line['response']['request_id'].split('-')[-2])}"
               for line in out + err), why  # each answer is its own line's
    # a line answered before a stop is never sent again; only those in flight at a stop (at most MAX_IN_FLIGHT
    # each time) may have been generated twice. Recomputing finished lines would add the answered counts above
    # (the stop points are at least 15 lines in: 15 + 16 + 17 + 18 > 4 * 8).
    generated = _generations(replica) - before
    assert LINES - TOO_LONG <= generated <= LINES - TOO_LONG + (KILLS + 1) * MAX_IN_FLIGHT, (why, generated)


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.base_url}/metrics", timeout=5).text
    return sum(s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items())


def test_lines_wait_for_a_replica_and_are_never_recorded_as_503(tmp_path, replica):
    """A model scaled to zero: the worker sends one line, which waits in the dispatch queue (the demand an
    autoscaler sees) until cold_start_timeout_s, gets the gateway's 503 and is retried later, never recorded; once
    a replica is added the whole batch completes."""
    admin = "batch-admin-key"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "demo", "replicas": [], "tokenizer": "demo"}],
        "tenants": [{"name": "nightly", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "batch": {"db_path": str(tmp_path / "batches.sqlite3")}, "cold_start_timeout_s": 0.5,
        "admin_api_key_sha256": hashlib.sha256(admin.encode()).hexdigest(), "health_interval_s": 0.2}))
    gw = GatewayProcess(str(path))
    try:
        content = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {
            "model": "demo", "prompt": f"line {i}", "max_tokens": 2}}) + "\n" for i in range(20))
        up = httpx.post(f"{gw.base_url}/v1/files", headers=HEADERS, data={"purpose": "batch"},
                        files={"file": ("in.jsonl", content.encode())}, timeout=30)
        batch_id = httpx.post(f"{gw.base_url}/v1/batches", headers=HEADERS, timeout=30, json={
            "input_file_id": up.json()["id"], "endpoint": "/v1/completions", "completion_window": "1h"}).json()["id"]
        deadline = time.monotonic() + 20
        while _metric(gw, "conveyor_gateway_batch_backoffs_total", reason="rejected") < 2:
            assert time.monotonic() < deadline, gw.logs()[-3000:]
            time.sleep(0.1)
        assert _answered(_batch(gw, batch_id)) == 0  # the 503s were not answers
        assert _metric(gw, "conveyor_gateway_batch_lines_in_flight") <= 1
        added = httpx.post(f"{gw.base_url}/admin/replicas", headers={"authorization": f"Bearer {admin}"},
                           json={"model": "demo", "url": replica.base_url}, timeout=10)
        assert added.status_code == 200, added.text
        deadline = time.monotonic() + 30
        while (b := _batch(gw, batch_id))["status"] != "completed":
            assert time.monotonic() < deadline, (b, gw.logs()[-3000:])
            time.sleep(0.1)
        out = _file_lines(gw, b["output_file_id"])
        assert b["error_file_id"] is None and sorted(line["custom_id"] for line in out) == sorted(
            f"c{i}" for i in range(20))
        assert _metric(gw, "conveyor_gateway_batch_lines_total", outcome="completed") == 20
        assert _metric(gw, "conveyor_gateway_batches", status="completed") == 1
        assert _metric(gw, "conveyor_gateway_batch_lines_queued") == 0
    finally:
        gw.stop()
