"""Request-level fuzzing of the gateway (issue 11): every field of both endpoints with wrong types, out-of-range,
non-finite and huge numbers, lone surrogates, invalid UTF-8, deep nesting, oversized bodies (chunked and not) and
odd headers, sent through a real gateway process to a real replica.

Every answer is below 500, every error is OpenAI's error JSON, and afterwards the gateway holds nothing (slots,
reservations, queue, in flight), answers /health, and the replica holds no KV block.
"""
from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess
from test_gateway_hardening import KEYS, Gateway, tenant, wait_until

REPLICA_ARGS = ("--model", "demo", "--max-num-seqs", "8", "--num-kv-blocks", "64", "--max-model-len", "96")
MAX_BODY = 64 << 10

COMMON = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
          "frequency_penalty", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
          "min_tokens", "ignore_eos", "stop_token_ids", "priority", "skip_special_tokens", "cache_salt",
          "use_beam_search", "beam_width", "length_penalty", "early_stopping"]
FIELDS = {"/v1/completions": COMMON + ["prompt", "logprobs", "echo", "suffix"],
          "/v1/chat/completions": COMMON + ["messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                            "add_generation_prompt"]}
BASE = {"/v1/completions": {"model": "m", "prompt": "hello", "max_tokens": 4},
        "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}


class Raw(str):
    """Emitted verbatim into the JSON text (NaN, Infinity, numbers JSON can write but floats cannot hold)."""


def nested(depth: int) -> object:
    v: object = 1
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


LONE = st.sampled_from(["\ud800", "a\udfffb", "\udbff", "x\ud83d"])  # surrogates without their pair
TEXT = st.one_of(st.text(max_size=12), LONE, st.just("x" * 300), st.just("é😀\u0000"))
NUMBER = st.one_of(
    st.integers(-5, 300), st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 30]),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999"), Raw("1e-999"),
                     Raw("1" * 5000), -0.0, 1e308, 5e-324]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
WRONG = st.one_of(SCALAR, st.lists(SCALAR, max_size=4), st.dictionaries(TEXT, SCALAR, max_size=3),
                  st.integers(20, 200).map(nested))
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
                           "content": st.one_of(TEXT, st.none(), st.lists(st.one_of(
                               st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, NUMBER)}),
                               st.fixed_dictionaries({"type": st.just("image_url"), "image_url": WRONG}),
                               SCALAR), max_size=3))}),
    WRONG)
SPECIFIC = {  # plausible values too, so that requests get past validation and really run
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(-5, 300), max_size=5),
                        st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=3)),
    "messages": st.lists(MESSAGE, max_size=3),
    "max_tokens": st.one_of(st.integers(0, 20), NUMBER),
    "n": st.integers(-1, 4),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), WRONG)}), WRONG),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "stop_token_ids": st.lists(st.integers(-5, 300), max_size=3),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 30)),
    "early_stopping": st.one_of(st.booleans(), st.just("never")),
}
PLAUSIBLE = st.one_of(st.integers(0, 5), st.floats(0, 1), st.booleans(), st.none())
HEADER = st.one_of(st.none(), st.none(), st.none(),  # mostly absent
                   st.sampled_from(["nan", "inf", "-1", "0", "1e309", "0.000001", "5", "abc", "", "9" * 400, "3s"]))


@st.composite
def requests(draw) -> tuple[str, bytes | list[bytes], dict[str, str | bytes]]:
    path = draw(st.sampled_from(sorted(FIELDS)))
    body: dict = dict(BASE[path])
    for name in draw(st.lists(st.sampled_from(FIELDS[path]), max_size=4, unique=True)):
        plausible = SPECIFIC.get(name, PLAUSIBLE)
        body[name] = draw(st.one_of(plausible, plausible, WRONG) if name != "model" else
                          st.one_of(st.just("m"), st.just("nope"), WRONG))
    if draw(st.booleans()):
        body["ignore_eos"] = True  # run to max_tokens: real work for the replica
    raw = encode(body)
    mutation = draw(st.sampled_from(["none"] * 14 + ["utf8", "truncate", "oversized", "oversized_chunked",
                                                    "chunked", "not_object"]))
    if mutation == "utf8":  # invalid UTF-8 inside a string
        raw = raw.replace(b'"m"', b'"m\xff\xc3\x28"', 1) if b'"m"' in raw else raw + b"\xff"
    elif mutation == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif mutation == "not_object":
        raw = draw(st.sampled_from([b"[]", b"5", b'"s"', b"null", b"[" * 3000]))
    elif mutation.startswith("oversized"):
        raw = raw[:-1] + b', "pad": "' + b"p" * (MAX_BODY + 10) + b'"}'
    content: bytes | list[bytes] = raw
    if "chunked" in mutation:  # no Content-Length: the gateway must count as it reads
        content = [raw[i:i + 8192] for i in range(0, len(raw), 8192)] or [b""]
    headers: dict[str, str | bytes] = {"content-type": "application/json"}
    auth = draw(st.sampled_from(["ok"] * 20 + ["wrong", "empty", "latin1", "none", "basic"]))
    headers["authorization"] = {"ok": f"Bearer {KEYS['a']}", "wrong": "Bearer nope", "empty": "Bearer",
                                "latin1": b"Bearer \xe9\xff", "none": "", "basic": "Basic abc"}[auth]
    for name in ("x-request-timeout", "idempotency-key", "x-request-id"):
        if (v := draw(HEADER)) is not None:
            headers[name] = v
    return path, content, headers


def encode(obj) -> bytes:
    """JSON text with Raw values spliced in verbatim (and lone surrogates as \\u escapes)."""
    marks: dict[str, str] = {}

    def swap(v):
        if isinstance(v, Raw):
            marks[key := f"__raw{len(marks)}__"] = str(v)
            return key
        if isinstance(v, float) and not math.isfinite(v):
            return swap(Raw("NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")))
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return v

    text = json.dumps(swap(obj))
    for key, raw in marks.items():
        text = text.replace(f'"{key}"', raw)
    return text.encode()


def check(r: httpx.Response, body: bytes) -> None:
    assert r.status_code < 500, (r.status_code, body[:300], r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line:
                assert line.startswith("data: ")
                if line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event, (event, body[:300])
    else:
        assert "choices" in r.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    replica = ServerProcess(*REPLICA_ARGS, "--served-model-name", "m")
    gw = None
    try:
        gw = Gateway({"models": [{"name": "m", "replicas": [replica.base_url], "tokenizer": "demo"}],
                      "tenants": [tenant("a", max_concurrent=8)], "max_body_bytes": MAX_BODY,
                      "health_interval_s": 0.2},
                     str(tmp_path_factory.mktemp("fuzz") / "gateway.yaml"))
        wait_until(lambda: gw.states("m") == ["healthy"], what="replica healthy")
        yield replica, gw
    finally:
        if gw is not None:
            gw.stop()
        replica.stop()


def test_fuzzed_requests_never_5xx_and_leave_nothing_held(stack):
    replica, gw = stack
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=60) as client:
        @settings(max_examples=300, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def one(req) -> None:
            path, content, headers = req
            sent = content if isinstance(content, bytes) else b"".join(content)
            r = client.post(path, content=content if isinstance(content, bytes) else iter(content),
                            headers=headers)
            check(r, sent)
            statuses.append(r.status_code)

        one()
    print({s: statuses.count(s) for s in sorted(set(statuses))})
    assert statuses.count(200) >= len(statuses) // 6  # a good share got through to the replica and ran
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200
    wait_until(gw.idle, timeout=30, what="the gateway holding nothing")
    assert gw.metric("conveyor_gateway_rejections_total", reason="internal") == 0
    assert "Traceback" not in gw.logs()
    wait_until(lambda: replica.metric("vllm:kv_cache_usage_perc") == 0, what="the replica's KV blocks free")
    assert httpx.get(replica.base_url + "/health", timeout=5).status_code == 200
