"""End-to-end tests of `conveyor serve` with the official openai client and raw HTTP."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from server_process import ServerProcess

from conveyor.model.demo import demo_tokenizer

TOK = demo_tokenizer()


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "16", "--num-kv-blocks", "512", "--max-model-len", "1024")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


def chat_prompt_len(messages: list[dict]) -> int:
    text = TOK.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(TOK.encode(text, add_special_tokens=False))


def test_completion_usage_equals_token_counts(client):
    r = client.completions.create(model="demo", prompt="Hello there", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(TOK.encode("Hello there"))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert len(TOK.encode(r.choices[0].text)) == 7  # the demo tokenizer is one token per byte


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model="demo", prompt="Streaming test", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == full
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == chat_prompt_len(messages)
    assert r.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_samples_and_stream_interleave_by_index(client):
    r = client.completions.create(model="demo", prompt="Two samples", n=2, max_tokens=5, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    chunks = list(client.completions.create(model="demo", prompt="Two samples", n=2, max_tokens=5,
                                            temperature=1.0, seed=3, stream=True, extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == {c.index: c.text for c in r.choices}


def test_list_of_prompts_and_token_id_prompts(client):
    r = client.completions.create(model="demo", prompt=["a", "bb"], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 3
    r = client.completions.create(model="demo", prompt=[72, 105], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 2


def test_logprobs(client):
    r = client.completions.create(model="demo", prompt="Log", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) >= 2 for t in lp.top_logprobs)
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_stop_string_is_cut(client):
    base = client.completions.create(model="demo", prompt="Stop here", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[5:7]
    r = client.completions.create(model="demo", prompt="Stop here", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]


def test_seed_reproducibility(client):
    kw = dict(model="demo", prompt="Seeded", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c


def test_request_id_echoed_and_models(server, client):
    r = httpx.post(f"{server.base_url}/v1/completions", headers={"X-Request-Id": "abc-123"},
                   json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    assert [m.id for m in client.models.list().data] == ["demo"]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": -1}, 400, None),
    ({"prompt": "x", "max_tokens": 0}, 400, None),
    ({"prompt": "x", "n": 0}, 400, None),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "prompt"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "top_p": "high"}, 400, "top_p"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server.base_url}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_malformed_json_unknown_route_and_large_body(server):
    r = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(f"{server.base_url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_disconnected_streams_free_their_blocks(server):
    body = {"prompt": "Disconnect me", "max_tokens": 200, "temperature": 0.8, "stream": True, "ignore_eos": True}
    finished = []

    def run(i: int) -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.base_url}/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if i % 2 == 0 and n >= 3:
                    return  # leave mid-stream: closing the connection must abort the request
            finished.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") > 0, 20)
    for t in threads:
        t.join(120)
    assert sorted(finished) == [1, 3, 5, 7, 9, 11]
    assert wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") == 0.0)
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("vllm:request_success_total", finished_reason="abort") >= 6


def test_non_streaming_disconnect_aborts(server):
    before = server.metric("vllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", timeout=0.5,
                   json={"prompt": "slow", "max_tokens": 900, "ignore_eos": True})
    assert wait_for(lambda: server.metric("vllm:request_success_total", finished_reason="abort") > before)
    assert wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") == 0.0)


def test_metrics_exposition(server):
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "conveyor_slots_used_ratio", "conveyor_prefill_backlog_tokens", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "conveyor_batch_size_bucket", "vllm:request_time_per_output_token_seconds_bucket"]:
        assert name in text, name
    assert server.metric("vllm:generation_tokens_total") > 0


def test_backpressure_503_then_recovers():
    s = ServerProcess("--max-num-seqs", "1", "--max-waiting-requests", "2", "--num-kv-blocks", "128")
    try:
        body = {"prompt": "busy", "max_tokens": 300, "ignore_eos": True}
        results: list[httpx.Response] = []

        def run() -> None:
            results.append(httpx.post(f"{s.base_url}/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        rejected = next(r for r in results if r.status_code == 503)
        assert rejected.headers["retry-after"] and rejected.json()["error"]["code"] == "overloaded"
        ok = httpx.post(f"{s.base_url}/v1/completions", json={"prompt": "again", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
        assert s.metric("vllm:kv_cache_usage_perc") == 0.0
    finally:
        s.stop()


def test_api_key_and_graceful_shutdown():
    s = ServerProcess("--api-key", "sekret", "--shutdown-timeout", "60")
    try:
        assert httpx.post(f"{s.base_url}/v1/completions", json={"prompt": "x"}).status_code == 401
        bad = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="sekret", max_retries=0)
        stream = good.completions.create(model="demo", prompt="long", max_tokens=400, stream=True,
                                          extra_body={"ignore_eos": True})
        first = next(iter(stream))
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # while draining, new work is refused with 503 (or the listener is already closed)
            r = httpx.post(f"{s.base_url}/v1/completions", json={"prompt": "late"},
                           headers={"Authorization": "Bearer sekret"}, timeout=5)
            assert r.status_code == 503
        except httpx.ConnectError:
            pass
        rest = list(stream)  # the in-flight stream still finishes
        assert rest[-1].choices[0].finish_reason == "length"
        assert first.choices[0].text is not None
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_request_log_is_json_without_prompt_text(server):
    httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "SECRET-PROMPT", "max_tokens": 2},
               headers={"X-Request-Id": "log-check"})
    time.sleep(0.3)
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "log-check")
    assert entry["status"] == "ok" and entry["prompt_tokens"] == 13 and entry["output_tokens"] >= 1
    assert "SECRET-PROMPT" not in server.logs()


def test_prefix_cache_metrics_and_cache_salt(server):
    def hits() -> float:
        return server.metric("vllm:prefix_cache_hits_total")

    body = {"prompt": "A long shared system prompt. " * 6, "max_tokens": 2, "temperature": 0}
    httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    before = hits()
    httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    assert hits() > before
    before = hits()
    httpx.post(f"{server.base_url}/v1/completions", json={**body, "cache_salt": "other-tenant"}, timeout=30)
    assert hits() == before
    assert server.metric("vllm:prefix_cache_queries_total") > 0


def test_beam_search_over_http(server, client):
    r = client.completions.create(model="demo", prompt="Beams", max_tokens=6, n=2,
                                  extra_body={"use_beam_search": True, "beam_width": 3})
    # one token per byte; a beam that ended on an end token counts it, though its text is not shown
    assert len(r.choices) == 2
    assert r.usage.completion_tokens == sum(len(TOK.encode(c.text)) + (c.finish_reason == "stop") for c in r.choices)
    chunks = list(client.completions.create(model="demo", prompt="Beams", max_tokens=6, n=2, stream=True,
                                            extra_body={"use_beam_search": True, "beam_width": 3}))
    texts = {c.choices[0].index: c.choices[0].text for c in chunks}
    assert texts == {c.index: c.text for c in r.choices}
    bad = httpx.post(f"{server.base_url}/v1/completions",
                     json={"prompt": "x", "use_beam_search": True, "beam_width": 1, "n": 2})
    assert bad.status_code == 400
