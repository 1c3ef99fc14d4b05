"""Issue 11, `conveyor serve`: each input that once killed the engine, gave a 500 or held the server is answered
with OpenAI's error JSON, and the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from server_process import ServerProcess, dribble

from conveyor.engine.engine import Engine
from conveyor.llm import LLM
from conveyor.sampling_params import SamplingParams
from conveyor.server.metrics import ServerMetrics

READ_TIMEOUT_S = 2
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "512",
                      "--request-read-timeout", str(READ_TIMEOUT_S), "--max-body-bytes", str(MAX_BODY))
    yield s
    s.stop()


def post(server: ServerProcess, route: str, raw: str | bytes, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}{route}", content=raw, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_serving(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                   json={"prompt": "still serving", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0


LONG = "a prompt long enough to fill whole blocks of the prefix cache, " * 3


# ---- item 1: one request killed the engine for good ---------------------------------------------------------------
def test_lone_surrogate_cache_salt_is_rejected_and_the_engine_lives(server):
    raw = json.dumps({"prompt": LONG, "max_tokens": 2, "cache_salt": "\ud800"})  # json.dumps writes "\ud800"
    assert "\\ud800" in raw
    assert_error(post(server, "/v1/completions", raw), 400, "cache_salt", "invalid_text")
    assert_serving(server)


def test_beam_search_length_penalty_1e300_is_rejected_and_the_engine_lives(server):
    raw = '{"prompt": "x", "use_beam_search": true, "beam_width": 2, "length_penalty": 1e300}'
    assert "length_penalty" in assert_error(post(server, "/v1/completions", raw), 400)["message"]
    assert_serving(server)


ABSURD = [  # (field, JSON literal): non-finite, absurd and huge values of every number the engine uses
    *[(f, v) for f in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                       "repetition_penalty", "length_penalty") for v in ("NaN", "Infinity", "-Infinity", "1e999",
                                                                        "1e300", "-1e300")],
    *[(f, v) for f in ("seed", "priority", "max_tokens", "min_tokens", "n", "top_k", "logprobs", "beam_width")
      for v in (str(10 ** 30), str(-10 ** 30), "1e300")],
    ("seed", str(1 << 64)), ("top_k", str(1 << 63)), ("stop_token_ids", f"[{1 << 70}]"),
    ("stop_token_ids", json.dumps(list(range(2000)))),
]


@pytest.mark.parametrize("field,literal", ABSURD, ids=[f"{f}={v[:12]}" for f, v in ABSURD])
@pytest.mark.parametrize("beam", [False, True], ids=["sampling", "beam"])
def test_absurd_numbers_are_400(server, field, literal, beam):
    extra = ', "use_beam_search": true, "beam_width": 2' if beam and field != "beam_width" else ""
    raw = f'{{"prompt": "x", "max_tokens": 3, "{field}": {literal}{extra}}}'
    assert_error(post(server, "/v1/completions", raw), 400)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


# ---- item 2: bad text gave a 500 --------------------------------------------------------------------------------
SURROGATES = [  # (route, raw body, the field named in the error)
    ("/v1/completions", '{"prompt": "hi \\ud800 there"}', "prompt"),
    ("/v1/completions", '{"prompt": ["fine", "\\udfff"]}', "prompt.1"),
    ("/v1/completions", '{"prompt": "x", "stop": "\\ud83d"}', "stop"),
    ("/v1/completions", '{"prompt": "x", "stop": ["ok", "\\ud800"]}', "stop.1"),
    ("/v1/completions", '{"prompt": "x", "user": "\\ud800"}', "user"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', None),  # 404 first: no such model
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "cache_salt": "\\ud800"}',
     "cache_salt"),
]


@pytest.mark.parametrize("route,raw,param", SURROGATES, ids=[r[1][:40] for r in SURROGATES])
def test_lone_surrogates_are_400_naming_the_field(server, route, raw, param):
    r = post(server, route, raw)
    if param is None:
        assert_error(r, 404, "model")
    else:
        assert_error(r, 400, param, "invalid_text")


def test_odd_but_valid_text_is_served(server):
    """Text that is valid but unusual (NUL, controls, astral characters, U+FFFD, BOM) in every text field, with
    logprobs rendered for tokens that are not whole characters, streamed and not."""
    odd = "\x00\x01\t\u200b\ufeff\ufffd\U0001f600 é 数字"
    for stream in (False, True):
        r = post(server, "/v1/completions", json.dumps({
            "prompt": odd, "stop": [odd[-2:], "\U0001f600"], "user": odd, "cache_salt": odd, "max_tokens": 8,
            "logprobs": 5, "temperature": 1.0, "seed": 1, "stream": stream}))
        assert r.status_code == 200, r.text[:300]
        r = post(server, "/v1/chat/completions", json.dumps({
            "messages": [{"role": "system", "content": odd}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": odd}]}],
            "max_tokens": 8, "logprobs": True, "top_logprobs": 5, "temperature": 1.0, "seed": 2, "stream": stream}))
        assert r.status_code == 200, r.text[:300]
        if stream:
            events = [e for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert events and all(json.loads(e.removeprefix("data: ")).get("error") is None for e in events)
    assert_serving(server)


# ---- routes, methods, malformed HTTP ------------------------------------------------------------------------------
def test_unknown_routes_and_wrong_methods_are_openai_errors(server):
    assert_error(httpx.get(f"{server.base_url}/v1/nothing"), 404, code="not_found")
    assert_error(httpx.post(f"{server.base_url}/v2/completions", json={}), 404, code="not_found")
    r = httpx.get(f"{server.base_url}/v1/completions")
    assert_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "POST"
    assert_error(httpx.post(f"{server.base_url}/health"), 405, code="method_not_allowed")
    assert_error(httpx.delete(f"{server.base_url}/v1/models"), 405, code="method_not_allowed")


@pytest.mark.parametrize("rid", ["r" * 129, "r" * 8192, "two words", "caf\u00e9".encode().decode("latin-1"), ""])
def test_an_odd_request_id_is_400_not_copied_into_every_event(server, rid):
    """X-Request-Id goes into logs, headers and every streamed event: only 1-128 visible ASCII characters are taken
    (an 8 KB id made a 100-token stream 40 times bigger)."""
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                   headers={"x-request-id": rid.encode("latin-1")}, timeout=60)
    assert_error(r, 400, code="invalid_request_id")
    ok = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                    headers={"x-request-id": "order-42.retry_1"}, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "order-42.retry_1"
    assert ok.json()["id"] == "cmpl-order-42.retry_1"


def raw_exchange(port: int, data: bytes, timeout: float = 15) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    return got


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def test_malformed_http_is_an_openai_error(server):
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n"):
        got = raw_exchange(server.port, garbage)
        assert got.startswith(b"HTTP/1.1 400"), got[:200]
        assert body_of(got)["error"]["code"] == "invalid_http"
    assert_serving(server)


def test_deep_nesting_and_huge_literals_are_400(server):
    for raw in ('{"prompt": ' + "[" * 10_000 + "]" * 10_000 + "}", '{"prompt": "x", "seed": ' + "9" * 5000 + "}",
                '{"messages": [{"role": "user", "content": [' + "{\"a\": " * 5000 + "1" + "}" * 5000 + "]}]}",
                '{"prompt": "x", "n": ' + "[" * 500 + "]" * 500 + "}"):
        for route in ("/v1/completions", "/v1/chat/completions"):
            assert r_is_4xx_json(post(server, route, raw))
    assert_serving(server)


def r_is_4xx_json(r: httpx.Response) -> bool:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return True


# ---- item 9: an over-limit chunked body is a 413, and it is never buffered -------------------------------------------
def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def test_an_oversized_chunked_body_is_413_and_never_buffered(server):
    with open(f"/proc/{server.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = peak_rss_kib(server.proc.pid)
    total, chunk = 64 << 20, 1 << 16

    def body():
        for _ in range(total // chunk):
            yield b"x" * chunk

    for route in ("/v1/completions", "/v1/chat/completions"):  # httpx sends a generator chunked
        r = httpx.post(f"{server.base_url}{route}", content=body(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, code="body_too_large")
    assert peak_rss_kib(server.proc.pid) - before < 32 << 10  # KiB: 64 MiB went by, far less was ever held
    assert_error(post(server, "/v1/completions", b"x" * (MAX_BODY + 1)), 413, code="body_too_large")  # by length
    assert_serving(server)


# ---- item 10: slow clients are cut off ------------------------------------------------------------------------------
def test_slow_heads_and_slow_bodies_are_cut_off(server):
    # at a byte every 0.2 s these would take over 40 s; the server allows READ_TIMEOUT_S for each
    got, took = dribble(server.port, b"POST /v1/completions HTTP/1.1\r\n", b"x-filler: " + b"y" * 200 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 408") and body_of(got)["error"]["code"] == "request_timeout", got[:300]
    assert took < 20
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 300\r\n\r\n"
    got, took = dribble(server.port, head, b'{"prompt": "' + b"z" * 300)
    assert got.startswith(b"HTTP/1.1 408") and body_of(got)["error"]["type"] == "timeout_error", got[:300]
    assert took < 20
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:  # says nothing at all
        assert s.recv(100) == b""  # closed, quietly
    assert_serving(server)


# ---- item 7 and item 14: a burst cannot overrun the waiting queue; the API key from the environment -----------------
KEY = "env-key-not-in-ps"


@pytest.fixture(scope="module")
def held():
    """Static batching that never fills its batch: every admitted request stays waiting."""
    s = ServerProcess("--batching", "static", "--batch-timeout-s", "3600", "--max-num-seqs", "64",
                      "--num-kv-blocks", "256", "--max-waiting-requests", "16", env={"CONVEYOR_API_KEY": KEY})
    yield s
    s.stop()


def test_a_burst_cannot_overrun_max_waiting_requests(held):
    async def burst() -> list:
        async with httpx.AsyncClient(base_url=held.base_url, timeout=60, headers={"authorization": f"Bearer {KEY}"},
                                     limits=httpx.Limits(max_connections=100)) as c:
            tasks = [asyncio.create_task(c.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 4}))
                     for _ in range(64)]
            deadline = time.monotonic() + 60
            while sum(t.done() for t in tasks) < 48 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            done = [t.result() for t in tasks if t.done()]
            while held.metric("vllm:num_requests_waiting") < 16 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the last admitted ones may still be on their way into the engine
            waiting = held.metric("vllm:num_requests_waiting")
            assert sum(t.done() for t in tasks) == 48  # the admitted ones are held, not answered
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return done, waiting

    done, waiting = asyncio.run(burst())
    assert len(done) == 48 and all(r.status_code == 503 for r in done)
    assert all(r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] for r in done)
    assert waiting == 16
    deadline = time.monotonic() + 30  # the 16 held ones were cancelled: their clients left, the engine aborts them
    while held.metric("vllm:num_requests_waiting") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held.metric("vllm:num_requests_waiting") == 0


def test_api_key_from_the_environment(held):
    url = f"{held.base_url}/v1/models"
    assert_error(httpx.get(url), 401, code="invalid_api_key")
    assert_error(httpx.get(url, headers={"authorization": f"Bearer {KEY}x"}), 401)
    assert_error(httpx.get(url, headers={"authorization": f"Bearer {KEY[:-1]}"}), 401)
    assert_error(httpx.get(url, headers={"authorization": b"Bearer \xe9"}), 401)  # not ASCII: still just a 401
    assert_error(httpx.post(f"{held.base_url}/v1/completions", json={"prompt": "x"}), 401)
    assert httpx.get(url, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{held.base_url}/health").status_code == 200  # health and metrics stay open
    with open(f"/proc/{held.proc.pid}/cmdline", "rb") as f:
        assert KEY.encode() not in f.read()  # what `ps` shows
    assert KEY not in held.logs()


# ---- found on the way: an aborted beam search has no choices ------------------------------------------------------
def test_metrics_count_a_beam_search_aborted_before_any_hypothesis():
    """Aborting a beam search before it had a hypothesis gives an output without choices; the metrics used to take
    max() of nothing on the engine thread and kill the loop (a client leaving a beam search request early)."""
    engine: Engine = LLM(model="demo", num_kv_blocks=64, device="cpu").engine
    metrics = ServerMetrics("demo", 8)
    engine.add_request("beams", "hello", SamplingParams(use_beam_search=True, beam_width=3, max_tokens=50))
    out = engine.abort_request("beams")
    assert out.finished and out.outputs == []
    metrics.on_step(engine, [out], None)
    assert metrics.registry.get_sample_value("vllm:request_success_total",
                                             {"model_name": "demo", "engine": "0", "finished_reason": "abort"}) == 1
