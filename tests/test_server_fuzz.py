"""Hypothesis sends malformed and extreme requests to a real server, covering every field of both endpoints: wrong
types, out-of-range, non-finite (NaN, Infinity as json.dumps writes them, 1e999 literals) and huge numbers, lone
surrogates (JSON \\ud800 escapes) and invalid UTF-8 bytes, deep nesting, oversized bodies (chunked and not).
Every answer is a 200 or a 4xx carrying OpenAI's error JSON, never a 5xx; afterwards the server is healthy, holds
no KV block and still answers a normal request correctly."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess

from conveyor.llm import LLM
from conveyor.sampling_params import SamplingParams

MAX_BODY = 1 << 16
ROUTES = ["/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "512",
                      "--max-body-bytes", str(MAX_BODY))
    yield s
    s.stop()


# ---- values -------------------------------------------------------------------------------------------------------
surrogate = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2).map(lambda s: f"a{s}b")
texts = st.one_of(st.text(max_size=20), st.text(st.characters(exclude_categories=()), max_size=20), surrogate)
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([10**30, -10**30, 2**63, 2**64, -2**63 - 1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300, -1e300, 5e-324]))
weird = st.one_of(st.none(), st.booleans(), numbers, texts, st.lists(st.integers(-5, 400), max_size=5),
                  st.lists(texts, max_size=3), st.dictionaries(texts, st.integers(), max_size=2))
# JSON literals json.dumps never writes: spliced into the body text in place of a field's value
LITERALS = ["1e999", "-1e999", "1e-999", "1" + "0" * 400, "-" + "9" * 5000, "[" * 10_000 + "]" * 10_000,
            "[" * 300 + "1" + "]" * 300, '{"a": ' * 300 + "1" + "}" * 300, '"\\ud800"', '"\\udfff\\ud800"',
            "NaN", "-Infinity", "tru", "01", ".5", '"\\u00"']
small = st.integers(1, 4)


def field(*good: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(*good, weird)


content_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5]), "text": weird}),
                         st.fixed_dictionaries({"type": st.just("text"), "text": texts}), weird)
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "system", "assistant", "tool", "developer", "bot"]))},
    optional={"content": field(texts, st.lists(content_part, max_size=3)), "name": weird})
COMMON = {
    "model": field(st.just("demo")), "max_tokens": field(small), "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)), "n": field(small), "stop": field(texts, st.lists(texts, max_size=17)),
    "seed": weird, "presence_penalty": field(st.floats(-2, 2)), "frequency_penalty": field(st.floats(-2, 2)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "user": field(texts), "top_k": weird, "min_p": field(st.floats(0, 1)), "repetition_penalty": weird,
    "min_tokens": weird, "ignore_eos": field(st.booleans()), "stop_token_ids": weird, "priority": weird,
    "skip_special_tokens": field(st.booleans()), "cache_salt": field(texts), "use_beam_search": field(st.booleans()),
    "beam_width": field(small), "length_penalty": weird, "early_stopping": field(st.sampled_from([True, "never"])),
    "logit_bias": field(st.dictionaries(st.sampled_from(["65", "0", "261", "262", "-1", "x", "1e3", " 7"]),
                                        st.one_of(st.floats(-150, 150), weird), max_size=3)),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                              {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                                  "type": "object", "properties": {"a": {"type": "integer"}}}}},
                                              {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}])),
    "structured_outputs": field(st.fixed_dictionaries({}, optional={
        "regex": field(st.sampled_from(["[a-c]{1,3}", "(", "a|b"])), "choice": field(st.lists(texts, max_size=3)),
        "json": weird, "grammar": field(st.sampled_from(['root ::= "a"+', "root ::= ", "nonsense"])),
        "json_object": weird})),
    "guided_regex": field(st.sampled_from(["[0-9]{1,2}", "((", ".*"])), "guided_choice": field(st.lists(texts)),
    "guided_json": weird, "guided_grammar": weird, "include_stop_str_in_output": field(st.booleans()),
    "prompt_logprobs": field(st.integers(0, 3)), "store": weird, "service_tier": weird, "metadata": weird,
    "unknown_field": weird,
}
FIELDS = {
    "/v1/completions": {**COMMON, "prompt": field(texts, st.lists(st.integers(-3, 300), max_size=8),
                                                  st.lists(texts, max_size=3),
                                                  st.lists(st.lists(st.integers(0, 261), max_size=4), max_size=3)),
                        "logprobs": weird, "echo": field(st.booleans()), "best_of": field(small),
                        "suffix": weird},
    "/v1/chat/completions": {**COMMON, "messages": field(st.lists(message, max_size=3)),
                             "max_completion_tokens": weird, "logprobs": field(st.booleans()),
                             "top_logprobs": weird, "add_generation_prompt": field(st.booleans()),
                             "audio": weird, "modalities": weird},
}
# in range, including the extremes: these must be served (or rejected as too long), never crash the server
IN_RANGE = {
    "max_tokens": st.integers(1, 40), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 400), "min_p": st.floats(0, 1), "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "seed": st.integers(-2**63, 2**64 - 1), "stream": st.booleans(), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.1, 3), "min_tokens": st.integers(0, 3),
    "ignore_eos": st.booleans(), "stop_token_ids": st.lists(st.integers(0, 261), max_size=3),
    "priority": st.integers(-10, 10), "cache_salt": st.text(max_size=10),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans(),
                                             "continuous_usage_stats": st.booleans()}),
    "logit_bias": st.dictionaries(st.integers(0, 261).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
    "include_stop_str_in_output": st.booleans(),
}
VALID = {"/v1/completions": {"prompt": st.one_of(st.text(min_size=1, max_size=60),
                                                 st.lists(st.integers(0, 261), min_size=1, max_size=20)),
                             "logprobs": st.integers(0, 5)},
         "/v1/chat/completions": {"messages": st.lists(st.fixed_dictionaries({
             "role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}), min_size=1, max_size=2),
             "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)}}


@st.composite
def requests(draw) -> tuple[str, bytes]:
    route = draw(st.sampled_from(ROUTES))
    valid = draw(st.fixed_dictionaries({k: v for k, v in VALID[route].items() if k in ("prompt", "messages")},
                                       optional={**IN_RANGE, "logprobs": VALID[route]["logprobs"]}))
    if route.endswith("chat/completions") and "logprobs" in valid and valid["logprobs"]:
        valid["top_logprobs"] = draw(VALID[route]["top_logprobs"])
    junk = draw(st.fixed_dictionaries({}, optional=FIELDS[route]))
    body = draw(st.sampled_from([valid, junk, {**valid, **junk}]))
    raw = json.dumps(body, allow_nan=True)  # NaN, Infinity as Python writes them; surrogates as \ud800 escapes
    if draw(st.booleans()):  # one field's value replaced by a literal json.dumps would never write
        name = draw(st.sampled_from(sorted(FIELDS[route])))
        body = {**body, name: "\0LITERAL\0"}
        raw = json.dumps(body, allow_nan=True).replace('"\\u0000LITERAL\\u0000"', draw(st.sampled_from(LITERALS)))
    data = raw.encode()
    if draw(st.integers(0, 9)) == 0 and b'"' in data:  # invalid UTF-8 bytes inside the body
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + data[at:]
    return route, data


def _no_constants(name: str):
    raise AssertionError(f"the response has {name}, which is not JSON")


def strict_json(text: str):
    return json.loads(text, parse_constant=_no_constants)


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        assert r.headers["content-type"].startswith("application/json")
        err = strict_json(r.text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in strict_json(e), e
    else:
        assert strict_json(r.text)["choices"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests())
def test_fuzzed_requests(server, req):
    route, data = req
    check(httpx.post(server.base_url + route, content=data, headers={"content-type": "application/json"},
                     timeout=60))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200), route=st.sampled_from(ROUTES))
def test_fuzzed_raw_bytes(server, raw, route):
    check(httpx.post(server.base_url + route, content=raw, headers={"content-type": "application/json"}, timeout=60))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("size", [MAX_BODY + 1, 10 * MAX_BODY])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_bodies(server, route, size, chunked):
    body = b'{"prompt": "' + b"x" * size + b'"}'
    content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
    r = httpx.post(server.base_url + route, content=content, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and strict_json(r.text)["error"]["code"] == "body_too_large"


def test_server_healthy_after_fuzzing(server):
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "still fine", "max_tokens": 8,
                                                             "temperature": 0, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    # the same text as the offline engine gives for the same model (greedy)
    [want] = LLM(model="demo", max_model_len=512, num_kv_blocks=256, device="cpu").generate(
        "still fine", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert r.json()["choices"][0]["text"] == want.outputs[0].text
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("vllm:num_requests_waiting") == 0
    assert "Traceback" not in server.logs()  # no unexpected exception on the way
