"""Tenant isolation through the gateway, end to end (a real replica that requires an API key, a real gateway):
no prefix-cache hits across tenants, coalescing and idempotency scoped to one tenant, each coalesced client keeps its
own deadline, replicas authenticated by a key from the environment, no internal address shown to tenants."""
from __future__ import annotations

import os
import secrets
import threading
import time

import httpx
import openai
import pytest
from server_process import ServerProcess
from test_gateway_e2e import ADMIN_KEY, REPLICA_ARGS, GatewayProcess, sha, tenant, wait_until

from conveyor.gateway.auth import tenant_cache_salt

REPLICA_KEY = "replica-" + secrets.token_hex(16)
KEY_ENV = "CONVEYOR_TEST_ISOLATION_REPLICA_KEY"


@pytest.fixture(scope="module")
def replica():
    r = ServerProcess(*REPLICA_ARGS, "--served-model-name", "m", env={"CONVEYOR_API_KEY": REPLICA_KEY})
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gateway(replica, tmp_path_factory):
    os.environ[KEY_ENV] = REPLICA_KEY
    cfg = {"models": [{"name": "m", "replicas": [replica.base_url], "upstream_api_key_env": KEY_ENV}],
           "tenants": [tenant("a"), tenant("b")], "admin_api_key_sha256": sha(ADMIN_KEY)}
    g = GatewayProcess(cfg, str(tmp_path_factory.mktemp("isolation") / "gateway.yaml"))
    os.environ.pop(KEY_ENV)
    yield g
    g.stop()


def _prefix_counters(replica: ServerProcess) -> tuple[float, float]:
    return (replica.metric("vllm:prefix_cache_queries_total"), replica.metric("vllm:prefix_cache_hits_total"))


def _hits_of(replica: ServerProcess, send) -> float:
    """Prefix-cache hit tokens that one request got (the counters move together, after the step that served it)."""
    q0, h0 = _prefix_counters(replica)
    send()
    wait_until(lambda: _prefix_counters(replica)[0] > q0, what="the replica's prefix-cache counters")
    return _prefix_counters(replica)[1] - h0


def test_no_prefix_cache_hits_across_tenants(gateway, replica):
    doc = "Tenant a's private contract, clause " + secrets.token_hex(64) + ". Summarize it."
    a, b = gateway.client("a"), gateway.client("b")

    def send(client, **extra):
        return lambda: client.completions.create(model="m", prompt=doc, max_tokens=1, extra_body=extra or None)

    assert _hits_of(replica, send(a)) == 0
    assert _hits_of(replica, send(a)) > 0  # the cache works within a tenant...
    assert _hits_of(replica, send(b)) == 0  # ...and never across tenants
    # a client's salt narrows sharing, and cannot widen it to another tenant's blocks
    assert _hits_of(replica, send(b, cache_salt=tenant_cache_salt("a", None))) == 0
    assert _hits_of(replica, send(a, cache_salt="narrow")) == 0
    assert _hits_of(replica, send(a, cache_salt="narrow")) > 0
    with pytest.raises(openai.BadRequestError) as e:
        a.completions.create(model="m", prompt=doc, max_tokens=1, extra_body={"cache_salt": 5})
    assert e.value.response.json()["error"]["param"] == "cache_salt"


class Blocker:
    """Drains the only replica (admin API), so requests wait in the gateway's queue until release() adds it back."""

    def __init__(self, gateway: GatewayProcess, replica: ServerProcess) -> None:
        self.gateway, self.url = gateway, replica.base_url
        assert gateway.admin("POST", "/admin/replicas/drain", model="m", url=self.url).status_code == 200

    def release(self) -> None:
        assert self.gateway.admin("POST", model="m", url=self.url).status_code == 200


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _post(gateway: GatewayProcess, key: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {key}", **headers})


def test_coalescing_never_crosses_tenants(gateway, replica):
    body = {"model": "m", "prompt": "the same question " + secrets.token_hex(8), "max_tokens": 4, "temperature": 0}
    blocker = Blocker(gateway, replica)
    try:
        leader = _in_thread(lambda: _post(gateway, "key-a", body))
        wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests") >= 1, what="the leader to queue")
        joiner = _in_thread(lambda: _post(gateway, "key-a", body))
        other = _in_thread(lambda: _post(gateway, "key-b", body))
        wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests") >= 2, what="tenant b's flight to queue")
    finally:
        blocker.release()
    (ta, a1), (tj, a2), (tb, b1) = leader, joiner, other
    for t in (ta, tj, tb):
        t.join(60)
    a1, a2, b1 = a1["value"], a2["value"], b1["value"]
    assert a1.status_code == a2.status_code == b1.status_code == 200
    assert a2.headers.get("x-conveyor-joined") == "coalesced" and a2.json()["id"] == a1.json()["id"]
    assert "x-conveyor-joined" not in b1.headers and b1.json()["id"] != a1.json()["id"]
    assert b1.json()["choices"][0]["text"] == a1.json()["choices"][0]["text"]  # same greedy answer, computed apart


def test_a_coalesced_clients_deadline_is_its_own(gateway, replica):
    for short in ("joiner", "leader"):
        body = {"model": "m", "prompt": f"deadline {short} " + secrets.token_hex(8), "max_tokens": 2,
                "temperature": 0}
        blocker = Blocker(gateway, replica)
        try:
            first = _in_thread(lambda: _post(gateway, "key-a", body,
                                             **({"x-request-timeout": "0.5"} if short == "leader" else {})))
            wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests") >= 1, what="the flight to queue")
            second = _in_thread(lambda: _post(gateway, "key-a", body,
                                              **({"x-request-timeout": "0.5"} if short == "joiner" else {})))
            timed_out, patient = (first, second) if short == "leader" else (second, first)
            timed_out[0].join(30)
            assert timed_out[1]["value"].status_code == 408, short
            assert timed_out[1]["value"].json()["error"]["type"] == "timeout_error"
            time.sleep(0.3)
            assert patient[0].is_alive()  # still queued behind the blocker, not failed with the other's 408
        finally:
            blocker.release()
        patient[0].join(60)
        assert patient[1]["value"].status_code == 200, (short, patient[1]["value"].text)


def test_idempotency_keys_never_cross_tenants(gateway):
    body = {"model": "m", "prompt": "idempotent " + secrets.token_hex(8), "max_tokens": 4, "temperature": 1.0}
    a1 = _post(gateway, "key-a", body, **{"idempotency-key": "shared-key"})
    b1 = _post(gateway, "key-b", body, **{"idempotency-key": "shared-key"})
    a2 = _post(gateway, "key-a", body, **{"idempotency-key": "shared-key"})
    assert a1.status_code == b1.status_code == a2.status_code == 200
    assert "x-conveyor-joined" not in b1.headers and b1.json()["id"] != a1.json()["id"]
    assert a2.headers["x-conveyor-joined"] == "idempotent" and a2.json()["id"] == a1.json()["id"]


def test_replicas_require_the_gateways_key_and_no_secret_or_address_leaks(gateway, replica):
    direct = httpx.post(f"{replica.base_url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
    assert direct.status_code == 401 and direct.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{replica.base_url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1},
                       headers={"authorization": "Bearer " + REPLICA_KEY[:-1]})
    assert wrong.status_code == 401
    via = gateway.client("a").completions.with_raw_response.create(model="m", prompt="hi", max_tokens=1)
    label = via.headers["x-conveyor-replica"]
    assert str(replica.port) not in label and "127.0.0.1" not in label
    listed = gateway.admin("GET").json()["models"]["m"]
    assert [r["label"] for r in listed] == [label]  # operators can map a label to its replica
    for pid in (replica.proc.pid, gateway.proc.pid):  # not in `ps`
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert REPLICA_KEY.encode() not in f.read()
    assert REPLICA_KEY not in gateway.logs() and REPLICA_KEY not in replica.logs()


def test_upstream_key_variable_must_be_set(tmp_path):
    from conveyor.gateway.config import ConfigError, parse_config

    raw = {"models": [{"name": "m", "upstream_api_key_env": "CONVEYOR_TEST_UNSET_VARIABLE"}],
           "tenants": [tenant("a")]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.upstream_api_key_env"):
        parse_config(raw)


# ---- tenants cannot reorder each other on a replica ---------------------------------------------------------------
@pytest.fixture(scope="module")
def by_priority(tmp_path_factory):
    """A replica that schedules by `priority` and runs one sequence at a time (the rest wait in its queue), behind a
    gateway with two interactive tenants and a batch one."""
    replica = ServerProcess("--model", "demo", "--max-num-seqs", "1", "--num-kv-blocks", "512", "--max-model-len",
                            "1024", "--scheduling-policy", "priority", "--served-model-name", "m")
    cfg = {"models": [{"name": "m", "replicas": [replica.base_url]}],
           "tenants": [tenant("a"), tenant("b"), tenant("batchy", **{"class": "batch"})],
           "admin_api_key_sha256": sha(ADMIN_KEY)}
    g = GatewayProcess(cfg, str(tmp_path_factory.mktemp("priority") / "gateway.yaml"))
    wait_until(lambda: g.replica_state("m", replica.base_url) == "healthy", what="the replica healthy")
    yield g, replica
    g.stop()
    replica.stop()


def _finish_order(gateway: GatewayProcess, replica: ServerProcess, first: str, late: str, late_extra: dict
                  ) -> list[str]:
    """Tenant `first` sends 4 requests; once the replica runs one and queues the others, tenant `late` sends one.
    Returns the order in which they finished (tags: "first" x4, "late")."""
    order: list[str] = []
    lock = threading.Lock()

    def send(tag: str, key: str, extra: dict) -> None:
        r = _post(gateway, key, {"model": "m", "prompt": f"{tag} {secrets.token_hex(4)}", "max_tokens": 100,
                                 "ignore_eos": True, **extra})
        assert r.status_code == 200, r.text
        with lock:
            order.append(tag)

    firsts = [_in_thread(lambda: send("first", f"key-{first}", {})) for _ in range(4)]
    wait_until(lambda: replica.metric("vllm:num_requests_waiting") >= 3, what="the replica queueing 3 of them")
    last = _in_thread(lambda: send("late", f"key-{late}", late_extra))
    for t, out in (*firsts, last):
        t.join(120)
        assert "error" not in out, out
    assert sorted(order) == ["first"] * 4 + ["late"]
    return order


def test_a_tenants_priority_field_cannot_jump_another_tenants_queued_work(by_priority):
    """The gateway sets `priority` itself (from the tenant's class) and ignores the client's: tenant a's
    priority -2**63 does not put its request ahead of tenant b's requests already queued at the replica."""
    gateway, replica = by_priority
    order = _finish_order(gateway, replica, "b", "a", {"priority": -2**63})
    assert order[-1] == "late", order
    for prio in (2**63, "high", None):  # values the replica would refuse are not forwarded either
        r = _post(gateway, "key-a", {"model": "m", "prompt": "hi", "max_tokens": 2, "priority": prio})
        assert r.status_code == 200, r.text


def test_interactive_tenants_go_before_batch_ones_at_the_replica(by_priority):
    """The priority the gateway sets ranks interactive before batch, as its own dispatch queue does."""
    gateway, replica = by_priority
    order = _finish_order(gateway, replica, "batchy", "a", {})
    assert order[-1] != "late", order


# ---- a replica refusing the gateway's key is the gateway's fault, not the tenant's ------------------------------
def test_a_replica_refusing_the_upstream_key_is_a_502_not_the_tenants_401(replica, tmp_path):
    """The replica requires a key; one model sends a wrong key, another none. Tenants get 502 upstream_auth_failed
    (never a 401 that reads as their own key failing), the failure is counted and logged, and no key is logged."""
    wrong = "wrong-" + secrets.token_hex(16)
    os.environ["CONVEYOR_TEST_WRONG_REPLICA_KEY"] = wrong
    try:
        cfg = {"models": [{"name": "wrong", "upstream_model": "m", "replicas": [replica.base_url],
                           "upstream_api_key_env": "CONVEYOR_TEST_WRONG_REPLICA_KEY"},
                          {"name": "nokey", "upstream_model": "m", "replicas": [replica.base_url]}],
               "tenants": [tenant("a")]}
        g = GatewayProcess(cfg, str(tmp_path / "gateway.yaml"))
    finally:
        os.environ.pop("CONVEYOR_TEST_WRONG_REPLICA_KEY")
    try:
        calls = [("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                 ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]
        for model in ("wrong", "nokey"):
            for path, body in calls:
                r = httpx.post(g.url + path, json={"model": model, **body}, headers={"authorization": "Bearer key-a"},
                               timeout=30)
                assert r.status_code == 502, r.text
                err = r.json()["error"]
                assert (err["type"], err["code"]) == ("upstream_error", "upstream_auth_failed"), err
                assert REPLICA_KEY not in r.text and wrong not in r.text
            assert g.metric("conveyor_gateway_upstream_auth_failures_total", model=model) >= len(calls)
        assert g.client("a").models.list().data  # the tenant's own key still works
        logs = g.logs()
        assert logs.count('"event": "upstream_auth_failed"') >= 2 * len(calls)
        assert wrong not in logs and REPLICA_KEY not in logs
    finally:
        g.stop()
