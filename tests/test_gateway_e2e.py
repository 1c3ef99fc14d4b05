"""End-to-end tests of `conveyor gateway`: real `conveyor serve --model demo` replicas and gateways as separate
processes, the openai SDK as the client, a real redis-server for shared limits."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import server_process
import yaml
from server_process import ServerProcess, free_port, wait_healthy, wait_until

from conveyor.prometheus_text import sum_by_name

KEYS = {name: f"key-{name}" for name in ("a", "b", "limited", "tokcap", "flood", "light", "deg", "late", "batchy",
                                        "solo", "patient")}
ADMIN_KEY = "admin-secret"
REPLICA_ARGS = ("--model", "demo", "--max-num-seqs", "16", "--num-kv-blocks", "512", "--max-model-len", "1024")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant(name: str, **kw) -> dict:
    return {"name": name, "api_key_sha256": sha(KEYS[name]), "class": "interactive", "requests_per_minute": 10_000,
            "tokens_per_minute": 10_000_000, "max_concurrent": 64, **kw}


def start_replica(name: str, port: int | None = None) -> ServerProcess:
    """A replica serving the demo model under `name`; on `port` when given (to restart one in place)."""
    if port is None:
        return ServerProcess(*REPLICA_ARGS, "--served-model-name", name)
    orig = server_process.free_port
    server_process.free_port = lambda: port
    try:
        return ServerProcess(*REPLICA_ARGS, "--served-model-name", name)
    finally:
        server_process.free_port = orig


def requests_total(replica: ServerProcess) -> float:
    """Requests the replica has finished, whatever their finish reason."""
    text = httpx.get(f"{replica.base_url}/metrics", timeout=5).text
    return sum_by_name(text, ["vllm:request_success_total"]).get("vllm:request_success_total", 0.0)


class GatewayProcess:
    def __init__(self, config: dict, path: str) -> None:
        self.path = path
        self.write(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/conveyor-test-gateway-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "gateway", "--config", path, "--port",
                                      str(self.port)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        wait_healthy(self.proc, self.url, 60, self.logs)

    def write(self, config: dict) -> None:
        with open(self.path, "w") as f:
            yaml.safe_dump(config, f)

    def logs(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def client(self, tenant_name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[tenant_name], max_retries=0, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def admin(self, method: str, path: str = "/admin/replicas", **body) -> httpx.Response:
        return httpx.request(method, self.url + path, json=body or None, timeout=10,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"})

    def replica_state(self, model: str, url: str) -> str | None:
        for r in self.admin("GET").json()["models"].get(model, []):
            if r["url"] == url:
                return r["state"]
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def replicas():
    names = {"big1": "big", "big2": "big", "small1": "small", "fo1": "big"}
    with ThreadPoolExecutor(len(names)) as ex:  # start them side by side
        futs = {k: ex.submit(start_replica, v) for k, v in names.items()}
        procs = {k: f.result() for k, f in futs.items()}
    yield procs
    for p in procs.values():
        p.stop()


def base_config(r: dict[str, ServerProcess]) -> dict:
    return {
        "models": [
            {"name": "big", "aliases": ["large"], "replicas": [r["big1"].base_url, r["big2"].base_url],
             "tokenizer": "demo"},
            {"name": "small", "replicas": [r["small1"].base_url], "tokenizer": "demo"},
            # one request at a time, so queueing is decided by the gateway's fair queue
            {"name": "fair", "upstream_model": "big", "replicas": [r["big1"].base_url], "tokenizer": "demo",
             "max_in_flight_per_replica": 1},
            # fo1 is killed and restarted by the failover test
            {"name": "fo", "upstream_model": "big", "replicas": [r["fo1"].base_url, r["big2"].base_url],
             "tokenizer": "demo", "max_in_flight_per_replica": 2},
            {"name": "zero", "upstream_model": "small", "replicas": [], "tokenizer": "demo"},
            {"name": "shed", "upstream_model": "small", "replicas": [r["small1"].base_url], "tokenizer": "demo",
             "max_in_flight_per_replica": 1, "max_queue": 4},
        ],
        "auto_route": {"small": "small", "large": "big", "max_prompt_tokens_small": 64},
        "tenants": [tenant("a"), tenant("b"), tenant("flood"), tenant("light"), tenant("deg", allow_degrade=True),
                    tenant("limited", requests_per_minute=3, burst=3),
                    tenant("tokcap", tokens_per_minute=1000), tenant("batchy", **{"class": "batch"}),
                    tenant("solo", max_concurrent=1), tenant("patient", default_timeout_s=0.3)],
        "admin_api_key_sha256": sha(ADMIN_KEY),
        "breaker_open_s": 1.0,
        "health_interval_s": 0.5,
        "cold_start_timeout_s": 30,
    }


@pytest.fixture(scope="module")
def gateway(replicas, tmp_path_factory):
    g = GatewayProcess(base_config(replicas), str(tmp_path_factory.mktemp("gw") / "gateway.yaml"))
    wait_until(lambda: all(g.replica_state(m, r.base_url) == "healthy"
                           for m, r in (("big", replicas["big1"]), ("small", replicas["small1"]))),
               what="replicas healthy")
    yield g
    g.stop()


def ignore_eos(**kw) -> dict:
    return {"extra_body": {"ignore_eos": True, **kw}}


# ---- auth, basic proxying, routing ---------------------------------------------------------------------------------
def test_auth_401_openai_error(gateway):
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong-key-7fq2", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="big", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401
    err = e.value.response.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "big", "messages": []})
    assert r.status_code == 401 and "error" in r.json()
    assert "wrong-key-7fq2" not in gateway.logs() and KEYS["a"] not in gateway.logs()  # keys never logged


def test_proxy_alias_headers_and_request_id(gateway):
    client = gateway.client("a")
    raw = client.completions.with_raw_response.create(model="large", prompt="Hello", max_tokens=5,
                                                      extra_headers={"X-Request-Id": "req-e2e-1"})
    out = raw.parse()
    assert raw.headers["x-conveyor-model"] == "big" and out.model == "big"
    assert raw.headers["x-request-id"] == "req-e2e-1"
    assert out.id == "cmpl-req-e2e-1"  # the replica used the gateway's request id
    for h in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{h}-requests" in raw.headers and f"x-ratelimit-{h}-tokens" in raw.headers
    assert out.usage.completion_tokens == 5
    # streaming chat: usage chunk only when asked for
    chunks = list(client.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, **ignore_eos()))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="big", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True},
                                                 extra_headers={"X-Request-Id": "req-e2e-chat"}, **ignore_eos()))
    usage = chunks[-1].usage
    assert usage.completion_tokens == 4
    assert {m.id for m in client.models.list()} >= {"big", "large", "small", "auto"}
    wait_until(lambda: "req-e2e-chat" in gateway.logs(), what="the access log line")  # written after [DONE]
    log_lines = [json.loads(line) for line in gateway.logs().splitlines() if '"access"' in line]
    entry = next(e for e in log_lines if e.get("request_id") == "req-e2e-1")
    assert entry["tenant"] == "a" and entry["model"] == "big" and entry["status"] == 200 and entry["replica"]
    assert "Hello" not in json.dumps(entry)
    chat = next(e for e in log_lines if e.get("request_id") == "req-e2e-chat")
    assert chat["reserved_tokens"] == usage.prompt_tokens + 4  # the gateway counts with the model's tokenizer


def test_bad_requests_get_openai_errors(gateway):
    auth = {"authorization": f"Bearer {KEYS['a']}"}
    r = httpx.post(f"{gateway.url}/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "big", "prompt": "x", "max_tokens": "many"},
                   headers=auth)  # a field the gateway reads: checked by the gateway
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "big", "prompt": "x", "top_p": "most"},
                   headers=auth)  # a field only the replica reads: the replica's own validation error comes through
    assert r.status_code == 400 and "error" in r.json() and r.headers["x-conveyor-model"] == "big"


def test_auto_routing_by_prompt_length_and_hint(gateway):
    client = gateway.client("a")

    def routed(prompt: str, **headers) -> str:
        raw = client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=2,
                                                          extra_headers=headers)
        assert raw.parse().model == raw.headers["x-conveyor-model"]  # the replica that answered serves it
        return raw.headers["x-conveyor-model"]

    assert routed("short") == "small"
    assert routed("x" * 65) == "big"  # 65 demo tokens > max_prompt_tokens_small
    assert routed("short", **{"X-Conveyor-Route": "large"}) == "big"
    assert routed("x" * 200, **{"X-Conveyor-Route": "small"}) == "small"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_auto_degrades_interactive_to_small_when_allowed(gateway, replicas):
    """With every `big` replica draining the large model is overloaded: a long prompt from a tenant with
    allow_degrade goes to `small`; the same from a tenant without it stays on `big` (and waits: 408)."""
    long_prompt = "y" * 200
    for r in ("big1", "big2"):
        assert gateway.admin("POST", "/admin/replicas/drain", model="big", url=replicas[r].base_url).status_code == 200
    try:
        raw = gateway.client("deg").completions.with_raw_response.create(model="auto", prompt=long_prompt,
                                                                         max_tokens=2)
        assert raw.headers["x-conveyor-model"] == "small"
        with pytest.raises(openai.APIStatusError) as e:
            gateway.client("a").completions.create(model="auto", prompt=long_prompt, max_tokens=2,
                                                   extra_headers={"X-Request-Timeout": "0.3"})
        assert e.value.status_code == 408 and e.value.response.headers["x-conveyor-model"] == "big"
    finally:
        for r in ("big1", "big2"):  # adding a draining replica again puts it back in service
            gateway.admin("POST", model="big", url=replicas[r].base_url)
    wait_until(lambda: all(gateway.replica_state("big", replicas[r].base_url) == "healthy" for r in ("big1", "big2")))


def test_prefix_affinity_keeps_a_prefix_on_one_replica(gateway):
    client = gateway.client("a")
    for p in range(5):
        prefix = f"{p} shared system prompt " + "s" * 260
        seen = {client.completions.with_raw_response.create(model="big", prompt=prefix + f" question {q}",
                                                            max_tokens=1).headers["x-conveyor-replica"]
                for q in range(3)}
        assert len(seen) == 1, seen  # idle replicas tie on load: without affinity these would spread


# ---- rate limits ---------------------------------------------------------------------------------------------------
def test_rate_limit_429_with_headers(gateway):
    client = gateway.client("limited")  # 3 requests per minute, burst 3
    for _ in range(3):
        client.completions.create(model="big", prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="big", prompt="hi", max_tokens=1)
    h = e.value.response.headers
    assert e.value.status_code == 429 and e.value.response.json()["error"]["type"] == "rate_limit_error"
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(h["retry-after"]) <= 20 and h["x-ratelimit-reset-requests"].endswith("s")
    assert gateway.metric("conveyor_gateway_rejections_total", reason="rate_limit_requests") >= 1


def test_token_limit_reserves_then_settles_by_usage(gateway):
    client = gateway.client("tokcap")  # 1000 tokens per minute
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="big", prompt="hello", max_tokens=1010)  # fits the context, not the quota
    assert e.value.response.json()["error"]["code"] == "request_too_large"
    # reserves 5 + 900 tokens; every byte is a stop token, so it generates one and the rest is given back
    stop_all = {"stop_token_ids": list(range(256))}
    out = client.completions.with_raw_response.create(model="big", prompt="hello", max_tokens=900,
                                                      extra_body=stop_all)
    assert int(out.headers["x-ratelimit-remaining-tokens"]) < 100
    assert out.parse().usage.completion_tokens <= 5
    time.sleep(0.3)  # the refund is applied after the response
    out = client.completions.with_raw_response.create(model="big", prompt="hello", max_tokens=900,
                                                      extra_body=stop_all)  # fits only because of the refund
    assert int(out.headers["x-ratelimit-remaining-tokens"]) < 200


def test_redis_limits_shared_by_two_gateways(replicas, tmp_path):
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is not installed (scripts/setup installs it with apt-get)"
    port = free_port()
    redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    gws = []
    try:
        cfg = {"models": [{"name": "big", "replicas": [replicas["big2"].base_url], "tokenizer": "demo"}],
               "tenants": [tenant("limited", requests_per_minute=4, burst=4), tenant("tokcap", tokens_per_minute=1000)],
               "redis_url": f"redis://127.0.0.1:{port}/0"}
        with ThreadPoolExecutor(2) as ex:
            gws = list(ex.map(lambda i: GatewayProcess(cfg, str(tmp_path / f"gw{i}.yaml")), range(2)))
        wait_until(lambda: all(httpx.get(g.url + "/health").json()["models"]["big"]["healthy"] for g in gws))
        clients = [g.client("limited") for g in gws]
        for i in range(4):  # 2 + 2 spread over both gateways: the whole budget
            raw = clients[i % 2].completions.with_raw_response.create(model="big", prompt="hi", max_tokens=1)
            assert raw.headers["x-ratelimit-remaining-requests"] == str(3 - i)
        for c in clients:
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="big", prompt="hi", max_tokens=1)
            assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        # tokens: 905 reserved on one gateway, 899 of them given back when it ends, so the other can reserve again
        tok = [g.client("tokcap") for g in gws]
        stop_all = {"stop_token_ids": list(range(256))}
        out = tok[0].completions.with_raw_response.create(model="big", prompt="hello", max_tokens=900,
                                                          extra_body=stop_all)
        assert int(out.headers["x-ratelimit-remaining-tokens"]) < 100
        time.sleep(0.3)
        out = tok[1].completions.with_raw_response.create(model="big", prompt="hello", max_tokens=900,
                                                          extra_body=stop_all)
        assert int(out.headers["x-ratelimit-remaining-tokens"]) < 200
        import redis as redis_py
        keys = sorted(redis_py.Redis(port=port).keys("conveyor:ratelimit:*"))
        assert keys == [b"conveyor:ratelimit:limited", b"conveyor:ratelimit:tokcap"]
    finally:
        for g in gws:
            g.stop()
        redis.terminate()
        redis.wait(10)


# ---- admission: fairness, deadlines, shedding ----------------------------------------------------------------------
def _queue_ms(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> float:
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                      **ignore_eos())
    return float(raw.headers["x-conveyor-queue-time-ms"])


def _bursts(client: openai.OpenAI, n: int, size: int) -> list[float]:
    """Tenant B: n bursts of `size` concurrent short requests; within a burst they queue behind each other."""
    times: list[float] = []
    with ThreadPoolExecutor(size) as ex:
        for b in range(n):
            futs = [ex.submit(_queue_ms, client, "fair", f"b{b}-{i}", 16) for i in range(size)]
            times += [f.result() for f in futs]
            time.sleep(0.1)
    return times


def _flooding(gateway: GatewayProcess, model: str):
    """Tenant A: 8 clients in closed loops of ~300-token requests to `model`; yields their queue times."""
    flood = gateway.client("flood")
    stop = threading.Event()
    times: list[float] = []

    def flooder(i: int) -> None:
        while not stop.is_set():
            times.append(_queue_ms(flood, model, f"{i:03d}" + "a" * 300, 4))

    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests", model=model) >= 5,
                   what="the flood to queue up")
        yield times
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_fair_queue_protects_a_light_tenant_from_a_flood(gateway):
    """One request at a time reaches a replica of `fair`. Tenant B sends bursts of 8 short requests (~20 tokens
    each), so alone it queues behind itself. Tenant A floods with 8 clients of ~300-token requests. A burst of B
    costs less than one request of A, so under fair queuing all of B's burst goes before A's next request: B waits
    at most for the A request in service (FIFO would put it behind A's whole backlog)."""
    light = gateway.client("light")
    alone = _bursts(light, 8, 8)
    for flood_times in _flooding(gateway, "fair"):
        crowded = _bursts(light, 8, 8)
    m_alone, m_crowded, m_flood = (statistics.median(x) for x in (alone, crowded, flood_times))
    print(f"light tenant median queue: alone {m_alone:.1f} ms, during flood {m_crowded:.1f} ms; "
          f"flooding tenant {m_flood:.1f} ms")
    assert m_flood > m_crowded  # the flood really queued
    assert m_crowded <= 2 * m_alone


def test_deadline_408_never_reaches_replica(gateway, replicas):
    big1 = replicas["big1"]
    client = gateway.client("a")
    before = requests_total(big1)
    long = threading.Thread(target=lambda: client.completions.create(model="fair", prompt="long", max_tokens=600,
                                                                     **ignore_eos()))
    long.start()
    wait_until(lambda: gateway.metric("conveyor_gateway_in_flight_requests", model="fair") == 1)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="fair", prompt="late", max_tokens=2, extra_headers={"X-Request-Timeout": "0.3"})
    assert e.value.status_code == 408 and e.value.response.json()["error"]["type"] == "timeout_error"
    with pytest.raises(openai.APIStatusError) as e:  # no header: the tenant's default_timeout_s
        gateway.client("patient").completions.create(model="fair", prompt="late", max_tokens=2)
    assert e.value.status_code == 408
    long.join()
    time.sleep(0.2)
    assert requests_total(big1) == before + 1  # only the long one
    assert gateway.metric("conveyor_gateway_rejections_total", model="fair", reason="deadline") == 2
    assert gateway.metric("conveyor_gateway_requests_total", model="fair", status="408") == 2
    assert gateway.metric("conveyor_gateway_queue_time_seconds_count", model="fair") >= 1
    assert gateway.metric("conveyor_gateway_upstream_latency_seconds_count", model="fair") >= 1
    assert gateway.metric("conveyor_gateway_replicas", model="big", state="healthy") == 2


def test_tenant_concurrency_cap(gateway):
    client = gateway.client("solo")  # max_concurrent: 1
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(client.completions.create, model="small", prompt="x", max_tokens=300, **ignore_eos())
        wait_until(lambda: gateway.metric("conveyor_gateway_in_flight_requests", model="small") == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="small", prompt="y", max_tokens=2)
        assert e.value.response.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert "x-ratelimit-remaining-requests" in e.value.response.headers
        running.result()
    assert client.completions.create(model="small", prompt="y", max_tokens=2).usage.completion_tokens == 2


def test_load_shedding_batch_first(gateway):
    """`shed`: one slot, a queue of 4; batch is shed once the queue is half full, interactive once it is full."""
    a, batch = gateway.client("a"), gateway.client("batchy")
    results: list = []

    def call(client) -> None:
        try:
            client.completions.create(model="shed", prompt="x", max_tokens=300, **ignore_eos())
            results.append(200)
        except openai.APIStatusError as e:
            results.append(e.status_code)

    threads = []
    for expect_queued in (0, 1, 2):  # one running, then two queued
        threads.append(threading.Thread(target=call, args=(a,)))
        threads[-1].start()
        wait_until(lambda n=expect_queued: gateway.metric("conveyor_gateway_queued_requests", model="shed") == n
                   and gateway.metric("conveyor_gateway_in_flight_requests", model="shed") == 1)
    with pytest.raises(openai.APIStatusError) as e:
        batch.completions.create(model="shed", prompt="x", max_tokens=2)
    assert e.value.status_code == 503 and "retry-after" in e.value.response.headers
    for _ in range(2):  # interactive still fits, up to the bound
        threads.append(threading.Thread(target=call, args=(a,)))
        threads[-1].start()
    wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests", model="shed") == 4)
    with pytest.raises(openai.APIStatusError) as e:
        a.completions.create(model="shed", prompt="x", max_tokens=2)
    assert e.value.status_code == 503
    for t in threads:
        t.join()
    assert results == [200] * 5
    assert gateway.metric("conveyor_gateway_rejections_total", model="shed", reason="shed",
                          tenant_class="batch") == 1


# ---- coalescing, idempotency, cancellation --------------------------------------------------------------------------
def big_total(replicas) -> float:
    return requests_total(replicas["big1"]) + requests_total(replicas["big2"])


def test_coalescing_identical_requests_share_one_generation(gateway, replicas):
    client = gateway.client("a")
    before, joined = big_total(replicas), gateway.metric("conveyor_gateway_coalesced_total")
    with ThreadPoolExecutor(2) as ex:
        kw = dict(model="big", prompt="coalesce me", max_tokens=200, temperature=0, **ignore_eos())
        f1 = ex.submit(client.completions.with_raw_response.create, **kw)
        time.sleep(0.1)
        f2 = ex.submit(client.completions.with_raw_response.create, **kw)
        r1, r2 = f1.result(), f2.result()
    assert r1.parse().choices[0].text == r2.parse().choices[0].text
    assert r2.headers.get("x-conveyor-joined") == "coalesced"
    # streaming, the second client arriving mid-stream gets every chunk too
    kw = dict(model="big", prompt="coalesce stream", max_tokens=200, temperature=0, stream=True, **ignore_eos())

    def text(stream) -> str:
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(lambda: text(client.completions.create(**kw)))
        time.sleep(0.1)
        f2 = ex.submit(lambda: text(client.completions.create(**kw)))
        assert f1.result() == f2.result() and len(f1.result()) > 0
    # chat with logprobs too: each client gets the replica's whole response, logprobs included
    msgs = [{"role": "user", "content": "coalesce chat"}]
    kw = dict(model="big", messages=msgs, max_tokens=200, temperature=0, logprobs=True, top_logprobs=2,
              **ignore_eos())
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(client.chat.completions.create, **kw)
        time.sleep(0.1)
        f2 = ex.submit(client.chat.completions.create, **kw)
        whole = f2.result()
        assert whole.choices[0].message.content == f1.result().choices[0].message.content
        assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens == 200
        assert whole.choices[0].logprobs == f1.result().choices[0].logprobs
    time.sleep(0.2)
    assert big_total(replicas) == before + 3  # three pairs, one generation each
    assert gateway.metric("conveyor_gateway_coalesced_total") == joined + 3
    # sampled requests are not deterministic: never coalesced
    with ThreadPoolExecutor(2) as ex:
        kw = dict(model="big", prompt="sampled", max_tokens=100, temperature=1.0, **ignore_eos())
        fs = [ex.submit(client.completions.create, **kw) for _ in range(2)]
        [f.result() for f in fs]
    time.sleep(0.2)
    assert big_total(replicas) == before + 5


def test_idempotency_key_returns_first_result(gateway, replicas):
    client = gateway.client("a")
    before = big_total(replicas)
    kw = dict(model="big", prompt="pay once", max_tokens=20, **ignore_eos())
    first = client.completions.create(**kw, extra_headers={"Idempotency-Key": "k-1"})
    again = client.completions.with_raw_response.create(**kw, extra_headers={"Idempotency-Key": "k-1"})
    assert again.parse().id == first.id and again.parse().choices[0].text == first.choices[0].text
    assert again.headers["x-conveyor-joined"] == "idempotent"
    other = gateway.client("b").completions.create(**kw, extra_headers={"Idempotency-Key": "k-1"})
    assert other.id != first.id  # keys are per tenant
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="big", prompt="something else", max_tokens=2,
                                  extra_headers={"Idempotency-Key": "k-1"})
    # a retry while the first is still streaming joins its stream
    kw = dict(model="big", prompt="stream once", max_tokens=200, stream=True, **ignore_eos())
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(lambda: [c.choices[0].text for c in client.completions.create(
            **kw, extra_headers={"Idempotency-Key": "k-2"})])
        time.sleep(0.15)
        f2 = ex.submit(lambda: [c.choices[0].text for c in client.completions.create(
            **kw, extra_headers={"Idempotency-Key": "k-2"})])
        assert "".join(f1.result()) == "".join(f2.result())
    time.sleep(0.2)
    assert big_total(replicas) == before + 3  # first, tenant b's, the stream


def test_client_disconnect_aborts_upstream(gateway, replicas):
    small = replicas["small1"]
    aborted = small.metric("vllm:request_success_total", finished_reason="abort") if \
        "abort" in httpx.get(small.base_url + "/metrics").text else 0.0
    body = {"model": "small", "prompt": "go on", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {KEYS['a']}"}, timeout=30) as r:
        next(r.iter_lines())
    wait_until(lambda: small.metric("vllm:request_success_total", finished_reason="abort") == aborted + 1,
               what="the replica to abort")


# ---- replicas: failover, recovery, admin, scale from zero, reload ---------------------------------------------------
def test_failover_when_a_replica_dies_mid_run(gateway, replicas):
    client = gateway.client("a")
    fo1 = replicas["fo1"]
    results: list[tuple[bool, str | None]] = []  # (had a chunk, error)

    def one(i: int) -> None:
        got = False
        try:
            for c in client.completions.create(model="fo", prompt=f"fail over {i}", max_tokens=60, stream=True,
                                               **ignore_eos()):
                got = got or bool(c.choices)
            results.append((got, None))
        except Exception as e:  # noqa: BLE001
            results.append((got, repr(e)))

    with ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(one, i) for i in range(12)]
        wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests", model="fo") >= 4,
                   what="requests queued behind both replicas")
        fo1.proc.kill()  # mid-run: streams in progress there, more requests queued
        for f in futs:
            f.result()
    not_started_failures = [e for got, e in results if e is not None and not got]
    assert not not_started_failures, not_started_failures
    assert sum(e is None for _, e in results) >= 12 - 2  # at most the streams running on fo1 were cut
    assert gateway.metric("conveyor_gateway_retries_total", model="fo") + \
        gateway.metric("conveyor_gateway_stream_errors_total", model="fo") >= 1
    wait_until(lambda: gateway.replica_state("fo", fo1.base_url) == "unhealthy", what="fo1 ejected")
    # it comes back on the same port: health checks close the breaker and it serves again
    fo1.stop()
    replicas["fo1"] = fo1 = start_replica("big", port=fo1.port)
    wait_until(lambda: gateway.replica_state("fo", fo1.base_url) == "healthy", timeout=30, what="fo1 recovered")
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: client.completions.create(model="fo", prompt=f"back {i}", max_tokens=30,
                                                       **ignore_eos()), range(4)))
    assert requests_total(fo1) >= 1


def test_admin_api_and_scale_from_zero(gateway, replicas):
    small = replicas["small1"].base_url
    assert httpx.get(f"{gateway.url}/admin/replicas").status_code == 401
    assert httpx.get(f"{gateway.url}/admin/replicas", headers={"authorization": f"Bearer {KEYS['a']}"}
                     ).status_code == 401
    assert gateway.admin("GET").json()["models"]["zero"] == []
    client = gateway.client("a")
    with ThreadPoolExecutor(2) as ex:
        held = ex.submit(client.completions.create, model="zero", prompt="cold", max_tokens=3)
        wait_until(lambda: gateway.metric("conveyor_gateway_queued_requests", model="zero") == 1,
                   what="the request to wait for a replica")
        time.sleep(0.5)
        assert not held.done()
        r = gateway.admin("POST", model="zero", url=small)
        assert r.status_code == 200, r.text
        assert held.result(timeout=20).usage.completion_tokens == 3
        assert gateway.replica_state("zero", small) == "healthy"
        # drain: the running request finishes, nothing new is routed there
        long = ex.submit(client.completions.create, model="zero", prompt="long", max_tokens=300, **ignore_eos())
        wait_until(lambda: gateway.metric("conveyor_gateway_in_flight_requests", model="zero") == 1)
        r = gateway.admin("POST", "/admin/replicas/drain", model="zero", url=small)
        assert r.status_code == 200 and r.json()["in_flight"] == 1
        assert gateway.replica_state("zero", small) == "draining"
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="zero", prompt="x", max_tokens=2,
                                      extra_headers={"X-Request-Timeout": "0.5"})
        assert e.value.status_code == 408
        assert long.result(timeout=30).usage.completion_tokens == 300
    r = gateway.admin("DELETE", model="zero", url=small)
    assert r.status_code == 200 and gateway.admin("GET").json()["models"]["zero"] == []
    assert gateway.admin("DELETE", model="zero", url=small).status_code == 404
    assert gateway.admin("POST", model="nope", url=small).status_code == 404
    assert gateway.admin("POST", model="zero", url="not a url").status_code == 400


@pytest.mark.parametrize("url", ["http://\ud800:1", "http://", "http://[::1", "http://a:99999", "http://a b",
                                 "http://h:1/path", "http://user:pw@h:1", "ftp://h:1", 5, None])
def test_admin_refuses_malformed_replica_urls(gateway, url):
    """A malformed URL is a 400 that names it, never a replica added (whose watcher would fail every second, and
    whose listing would break GET /admin/replicas)."""
    before = gateway.admin("GET").json()
    r = httpx.post(gateway.url + "/admin/replicas", content=json.dumps({"model": "zero", "url": url}), timeout=10,
                   headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    after = gateway.admin("GET")
    assert after.status_code == 200 and after.json() == before


def test_sighup_reload_without_dropping_requests(gateway, replicas):
    late = gateway.client("late")
    with pytest.raises(openai.AuthenticationError):
        late.completions.create(model="big", prompt="x", max_tokens=1)
    client = gateway.client("a")
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(client.completions.create, model="big", prompt="during reload", max_tokens=300,
                            stream=False, **ignore_eos())
        wait_until(lambda: gateway.metric("conveyor_gateway_in_flight_requests", model="big") == 1)
        gateway.write({"models": [], "tenants": []})  # invalid: ignored, the old config stays
        gateway.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        cfg = base_config(replicas)
        cfg["tenants"].append(tenant("late"))
        gateway.write(cfg)
        gateway.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: '"config_reloaded"' in gateway.logs(), what="the reload")
        assert running.result(timeout=30).usage.completion_tokens == 300
    assert '"config_reload_failed"' in gateway.logs()
    assert late.completions.create(model="big", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_cli_rejects_a_bad_config_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "replicas": []}],
                                    "tenants": [{"name": "a", "api_key_sha256": sha("k"), "class": "vip"}]}))
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "gateway", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "tenants[0].class: Input should be 'interactive' or 'batch'" in out.stderr
