"""`conveyor gateway --workers 2`: the supervisor and its worker processes, end to end (a real `conveyor serve --model
demo` replica, a real redis-server, the gateway as separate processes)."""
from __future__ import annotations

import asyncio
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from server_process import GatewayProcess, ServerProcess, free_port, wait_until

from conveyor.cli import build_parser
from conveyor.gateway.shared_idempotency import Claim, claim_key
from conveyor.gateway.workers import StartError, check_and_listen
from conveyor.prometheus_text import samples

KEY, ADMIN = "key-w", "admin-w"


def sha(key: str) -> str:
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()


def config(replica_url: str, redis_port: int | None, db_path: str, aliases: list[str] = ()) -> dict:
    # no tokenizer (prompt tokens estimated): each worker starts without loading one
    cfg = {"models": [{"name": "demo", "replicas": [replica_url], "aliases": list(aliases)}],
           "tenants": [{"name": "w", "api_key_sha256": sha(KEY)}], "admin_api_key_sha256": sha(ADMIN),
           "batch": {"db_path": db_path}}
    if redis_port is not None:
        cfg["redis_url"] = f"redis://127.0.0.1:{redis_port}/0"
    return cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A redis-server, a demo replica, and the config of a gateway using both."""
    tmp = tmp_path_factory.mktemp("workers")
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is not installed (scripts/setup installs it with apt-get)"
    redis_port = free_port()
    redis = subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    replica = ServerProcess()
    try:
        yield {"tmp": tmp, "replica": replica, "redis_port": redis_port,
               "cfg": config(replica.base_url, redis_port, str(tmp / "batches.sqlite3"))}
    finally:
        replica.stop()
        redis.terminate()
        redis.wait()


def write(path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def gateway(env):
    path = write(env["tmp"] / "gateway.yaml", env["cfg"])
    tmpdir = env["tmp"] / "tmpdir"  # where the supervisor makes its metrics folder
    tmpdir.mkdir()
    gw = GatewayProcess(path, "--workers", "2", env={"TMPDIR": str(tmpdir)})
    gw.config_path, gw.tmpdir = path, tmpdir
    try:
        wait_until(lambda: metric(gw, "conveyor_gateway_workers") == 2, 60, "both workers up")
        yield gw
    finally:
        gw.stop()


def metric(gw: GatewayProcess, name: str, auth: str | None = None, **labels: str) -> float | None:
    headers = {"authorization": f"Bearer {auth}"} if auth else {}
    text = httpx.get(f"{gw.base_url}/metrics", headers=headers, timeout=10).text
    found = [s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


def events(gw: GatewayProcess, event: str) -> list[dict]:
    lines = (json.loads(line) for line in gw.logs().splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("event") == event]


def complete(gw: GatewayProcess, model: str = "demo") -> int:
    """One completion on a new connection (so that any worker may accept it); its status."""
    r = httpx.post(f"{gw.base_url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": model, "prompt": "hello", "max_tokens": 2})
    return r.status_code


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    """worker index → pid of its latest process, from the supervisor's log."""
    return {e["worker"]: e["pid"] for e in events(gw, "worker_started")}


def gone(pid: int) -> bool:
    """The process has exited (a zombie left to a parent that does not reap counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_workers_value_exits_2(value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["gateway", "--config", "gateway.yaml", f"--workers={value}"])
    assert e.value.code == 2
    assert "--workers" in capsys.readouterr().err.strip().splitlines()[-1]


def test_what_the_supervisor_refuses_before_starting_workers(env, gateway):
    no_redis = write(env["tmp"] / "no-redis.yaml", {**env["cfg"], "redis_url": None})
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "gateway", "--config", no_redis, "--port", "0",
                          "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: --workers 2 needs redis_url in ") and out.stderr.count("\n") == 1
    cases = {"--port": (str(gateway.port), f"cannot listen on 127.0.0.1:{gateway.port}: Address already in use"),
             "--otlp-traces-endpoint": ("grpc://x", "--otlp-traces-endpoint: 'grpc://x' is not an http(s)://")}
    for flag, (value, message) in cases.items():
        a = build_parser().parse_args(["gateway", "--config", gateway.config_path, "--workers", "2", flag, value])
        with pytest.raises(StartError, match=re.escape(message)):
            check_and_listen(a)


def test_both_workers_serve_and_metrics_are_summed(gateway):
    before = metric(gateway, "conveyor_gateway_requests_total", status="200") or 0
    with ThreadPoolExecutor(6) as ex:
        statuses = list(ex.map(lambda _: complete(gateway), range(30)))
    assert statuses == [200] * 30
    served = {e["worker"] for e in events(gateway, "access") if e.get("status") == 200}
    assert served == {0, 1}, served  # each log line names its worker
    # a scrape lands on either worker and shows the whole gateway
    for _ in range(4):
        assert metric(gateway, "conveyor_gateway_requests_total", status="200") == before + 30
        assert metric(gateway, "conveyor_gateway_upstream_latency_seconds_count") >= before + 30
        assert metric(gateway, "conveyor_gateway_workers") == 2
        assert metric(gateway, "conveyor_gateway_concurrency_slots") == 0
    assert metric(gateway, "conveyor_gateway_tenant_tokens_total") is None  # the admin key only
    assert metric(gateway, "conveyor_gateway_tenant_tokens_total", ADMIN, tenant="w", kind="generation") >= 60


def test_batches_run_in_worker_0_only(gateway):
    import openai
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0)
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "demo", "prompt": f"line {i}", "max_tokens": 2}} for i in range(4)]
    file = client.files.create(file=("in.jsonl", "\n".join(map(json.dumps, lines)).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")

    def status() -> str:  # a new connection each time: served by either worker from the shared store
        r = httpx.get(f"{gateway.base_url}/v1/batches/{batch.id}", headers={"authorization": f"Bearer {KEY}"})
        return r.json()["status"]
    wait_until(lambda: status() == "completed", 60, "the batch completed")
    sent = [e["worker"] for e in events(gateway, "access") if e.get("tenant_class") == "batch"]
    assert len(sent) == 4 and set(sent) == {0}, sent


def test_other_platforms_refuse_workers(gateway, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    a = build_parser().parse_args(["gateway", "--config", gateway.config_path, "--workers", "2"])
    with pytest.raises(StartError, match="--workers 2 needs Linux"):
        check_and_listen(a)


def test_idempotency_key_across_workers(env, gateway):
    import redis

    def call(key: str, prompt: str = "idem") -> httpx.Response:  # a new connection: either worker
        return httpx.post(f"{gateway.base_url}/v1/completions", timeout=60, json={
            "model": "demo", "prompt": prompt, "max_tokens": 3}, headers={"authorization": f"Bearer {KEY}",
                                                                          "idempotency-key": key})

    def worker_of(r: httpx.Response) -> int:
        rid = r.headers["x-request-id"]
        wait_until(lambda: any(e["request_id"] == rid for e in events(gateway, "access")), 10, "its access line")
        return next(e["worker"] for e in events(gateway, "access") if e["request_id"] == rid)

    first = call("k1")
    assert first.status_code == 200
    ran = worker_of(first)
    for _ in range(60):  # retries until one reaches the other worker: its answer comes from Redis
        again = call("k1")
        assert again.status_code == 200 and again.headers["x-conveyor-joined"] == "idempotent"
        assert again.json()["id"] == first.json()["id"]
        if worker_of(again) != ran:
            break
    else:
        pytest.fail("no retry reached the other worker")
    assert call("k1", prompt="another request").status_code == 422  # on either worker
    # a key another process is running (its claim planted: the same request's hash, still running) → 409
    r = redis.Redis(port=env["redis_port"])
    done = next(json.loads(r.get(k)) for k in r.scan_iter("conveyor:idem:*"))
    r.set(claim_key("w", "k2"), json.dumps({"h": done["h"], "state": "running", "id": "elsewhere"}), px=30_000)
    busy = call("k2")
    assert busy.status_code == 409 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["code"] == "idempotency_key_in_use"
    r.delete(claim_key("w", "k2"))
    assert call("k2").status_code == 200


def test_idempotency_claims_settle_by_outcome(env):
    from conveyor.gateway.proxy import Flight
    from conveyor.gateway.shared_idempotency import SharedIdempotency

    def ended(status: int, body: bytes, stream: bool = False) -> Flight:
        f = Flight(stream)
        f.status, f.chunks, f.done = status, [body], True
        return f

    async def run() -> None:
        fallbacks: list[str] = []
        shared = SharedIdempotency(f"redis://127.0.0.1:{env['redis_port']}/0", 60, fallbacks.append)
        try:
            for i, (flight, kept) in enumerate([(ended(200, b'{"id": "x"}'), True), (ended(500, b"{}"), False),
                                                (ended(200, b"data: [DONE]", stream=True), False), (None, False)]):
                claim = await shared.claim("t", f"unit-{i}", "h")
                assert claim.state == "run" and claim.owner
                assert (await shared.claim("t", f"unit-{i}", "h")).state == "running"
                assert (await shared.claim("t", f"unit-{i}", "other")).state == "mismatch"
                await shared.settle("t", f"unit-{i}", claim, flight)
                again = await shared.claim("t", f"unit-{i}", "h")
                assert again.state == ("done" if kept else "run"), (i, again)
                if kept:
                    assert (again.status, again.body) == (200, b'{"id": "x"}')
            assert fallbacks == []
        finally:
            await shared.close()
        down = SharedIdempotency(f"redis://127.0.0.1:{free_port()}/0", 60, fallbacks.append)
        try:  # Redis unreachable: run unclaimed (as one process), counted
            assert (await down.claim("t", "k", "h")) == Claim("run")
            assert (await down.claim("t", "k", "h")) == Claim("run")  # within RETRY_S: Redis not even asked
            assert fallbacks == ["claim", "claim"]
        finally:
            await down.close()
    asyncio.run(run())


def test_sighup_reloads_every_worker(env, gateway):
    pids = worker_pids(gateway)
    reloaded = len(events(gateway, "config_reloaded"))
    write(env["tmp"] / "gateway.yaml", config(env["replica"].base_url, None, str(env["tmp"] / "batches.sqlite3")))
    gateway.proc.send_signal(signal.SIGHUP)  # without redis_url: the supervisor keeps it from the workers
    wait_until(lambda: events(gateway, "config_reload_refused"), 20, "the reload refused")
    assert "needs redis_url" in events(gateway, "config_reload_refused")[-1]["error"]
    write(env["tmp"] / "gateway.yaml", config(env["replica"].base_url, env["redis_port"],
                                             str(env["tmp"] / "batches.sqlite3"), aliases=["tiny"]))
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(gateway, "config_reloaded")) >= reloaded + 2, 20, "both workers reloaded")
    assert {e["pid"] for e in events(gateway, "config_reloaded")[reloaded:]} == set(pids.values())
    assert [complete(gateway, "tiny") for _ in range(8)] == [200] * 8


def test_killed_worker_is_restarted_while_requests_go_on(gateway):
    before = metric(gateway, "conveyor_gateway_requests_total", status="200")
    victim = worker_pids(gateway)[1]
    os.kill(victim, signal.SIGKILL)
    statuses = [complete(gateway) for _ in range(10)]  # answered by worker 0 meanwhile (the socket is shared)
    assert statuses == [200] * 10
    wait_until(lambda: worker_pids(gateway)[1] != victim, 20, "worker 1 restarted")
    exited = events(gateway, "worker_exited")[-1]
    assert (exited["worker"], exited["pid"], exited["returncode"]) == (1, victim, -signal.SIGKILL)
    wait_until(lambda: metric(gateway, "conveyor_gateway_workers") == 2, 60, "the new worker 1 up")
    # each process told the supervisor once it served (its readiness byte): the new worker 1 too
    new = worker_pids(gateway)[1]
    wait_until(lambda: new in {e["pid"] for e in events(gateway, "worker_serving")}, 20, "worker 1 serving")
    # the dead worker's counts stay in the sums
    assert metric(gateway, "conveyor_gateway_requests_total", status="200") >= before + 10
    assert gateway.proc.poll() is None


def test_sigterm_stops_every_worker_and_exits_0(gateway):
    pids = list(worker_pids(gateway).values())
    assert len(os.listdir(gateway.tmpdir)) == 1  # its metrics folder
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(30) == 0
    assert all(gone(p) for p in pids)
    assert events(gateway, "gateway_stopped")[-1]["exit_code"] == 0
    assert os.listdir(gateway.tmpdir) == []  # removed


def test_workers_die_with_a_killed_supervisor(env):
    path = write(env["tmp"] / "gateway2.yaml", {**env["cfg"], "batch": {"db_path": str(env["tmp"] / "b2.sqlite3")}})
    log = env["tmp"] / "gateway2.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "gateway", "--config", path, "--port", "0",
                                 "--workers", "2"], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TMPDIR=str(env["tmp"])))  # its metrics folder stays there
    try:
        def serving() -> int:  # workers whose app is up: the kernel's SIGTERM (PR_SET_PDEATHSIG) reaches uvicorn
            return log.read_text().count('"Application startup complete')
        wait_until(lambda: serving() == 2, 60, "both workers serving")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        pids = [e["pid"] for e in lines if e.get("event") == "worker_started"]
        proc.kill()
        proc.wait()
        wait_until(lambda: all(gone(p) for p in pids), 30, "no worker left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
