"""Hypothesis sends malformed and extreme requests to a real server: every answer is a 200 or a 4xx carrying
OpenAI's error JSON, never a 5xx; afterwards the server still serves correctly and holds no KV blocks."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "512")
    yield s
    s.stop()


weird = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                  st.text(max_size=20), st.lists(st.integers(-5, 400), max_size=5),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
small = st.integers(1, 4)
fields = {
    "model": st.one_of(st.just("demo"), weird),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 300), max_size=8),
                        st.lists(st.text(max_size=5), max_size=3), weird),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                           "content": st.one_of(st.text(max_size=20), weird)}),
                                   max_size=3), weird),
    "max_tokens": st.one_of(small, weird), "temperature": st.one_of(st.floats(0, 2), weird),
    "top_p": st.one_of(st.floats(0, 1), weird), "top_k": weird, "n": st.one_of(small, weird),
    "stop": st.one_of(st.text(max_size=3), weird), "seed": weird, "logprobs": weird, "top_logprobs": weird,
    "stream": st.booleans(), "presence_penalty": weird, "min_p": weird, "repetition_penalty": weird,
    "stop_token_ids": weird, "min_tokens": weird, "priority": weird, "max_completion_tokens": weird,
}
junk = st.fixed_dictionaries({}, optional=fields)
# in range, including the extremes: these must be served (or rejected as too long), never crash the server
in_range = {
    "max_tokens": st.integers(1, 40), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 400), "min_p": st.floats(0, 1), "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "seed": st.integers(-2**63, 2**64 - 1), "logprobs": st.integers(0, 5), "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3), "min_tokens": st.integers(0, 3), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 261), max_size=3), "priority": st.integers(-10, 10),
}
valid_prompt = st.one_of(st.text(min_size=1, max_size=60), st.lists(st.integers(0, 261), min_size=1, max_size=20))
mostly_valid = st.fixed_dictionaries({"prompt": valid_prompt}, optional=in_range)
bodies = st.one_of(junk, mostly_valid, st.tuples(mostly_valid, junk).map(lambda t: {**t[0], **t[1]}))


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_json_bodies(server, body, route):
    if route.endswith("chat/completions") and "prompt" in body and "messages" not in body:
        body = {**body, "messages": [{"role": "user", "content": str(body.pop("prompt"))}]}
        body.pop("logprobs", None)
    try:
        payload = json.dumps(body, allow_nan=True)
    except (ValueError, OverflowError):
        return
    check(httpx.post(server.base_url + route, content=payload, headers={"content-type": "application/json"},
                     timeout=60))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_raw_bytes(server, raw, route):
    check(httpx.post(server.base_url + route, content=raw, headers={"content-type": "application/json"}, timeout=60))


def test_server_healthy_after_fuzzing(server):
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "still fine", "max_tokens": 4,
                                                             "temperature": 0, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert server.metric("conveyor_kv_cache_usage_ratio") == 0.0
    assert server.metric("conveyor_requests_running") == 0
