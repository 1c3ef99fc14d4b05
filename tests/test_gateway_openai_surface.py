"""Issue 13 through the gateway: every field a client sends arrives at the replica, and every answer (200s, streams,
400s with their `param`) comes back as the replica gave it; the token reservation is what the replica will allow;
GET /v1/models/{id}, /tokenize, /detokenize and OpenAI 404s. One demo replica and one gateway process for the
module; the openai SDK as the client, raw httpx where a test compares bytes with the replica's own answer."""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import yaml
from server_process import GatewayProcess, ServerProcess, wait_until

MAX_MODEL_LEN = 1024
KEYS = {"a": "surface-key-a", "small": "surface-key-small"}
SMALL_QUOTA = 120  # tokens per minute: a short completion fits (prompt + 16), a reservation of 256 would not


def _tenant(name: str, **kw) -> dict:
    return {"name": name, "api_key_sha256": hashlib.sha256(KEYS[name].encode()).hexdigest(),
            "requests_per_minute": 100_000, "tokens_per_minute": 100_000_000, **kw}


@pytest.fixture(scope="module")
def replica():
    r = ServerProcess("--max-num-seqs", "32", "--num-kv-blocks", "256", "--max-model-len", str(MAX_MODEL_LEN),
                      "--served-model-name", "m")
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gw(replica, tmp_path_factory):
    path = tmp_path_factory.mktemp("surface") / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "m", "aliases": ["m-alias"], "replicas": [replica.base_url], "tokenizer": "demo"},
                   {"name": "other", "upstream_model": "m", "replicas": [replica.base_url], "tokenizer": "demo"}],
        "tenants": [_tenant("a"), _tenant("small", tokens_per_minute=SMALL_QUOTA, models=["m-alias"])],
        "health_interval_s": 0.2}))
    g = GatewayProcess(str(path))
    # reservations use the replica's max_model_len once the gateway has read it from the replica's GET /v1/models
    wait_until(lambda: _get(g, "/v1/models/m").json()["max_model_len"] == MAX_MODEL_LEN, what="max_model_len")
    yield g
    g.stop()


def _get(g: GatewayProcess, path: str, key: str | None = KEYS["a"], method: str = "GET", **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, g.base_url + path, headers=headers, timeout=60, **kw)


def _both(replica: ServerProcess, g: GatewayProcess, path: str, body: dict) -> tuple[httpx.Response, httpx.Response]:
    """The same request straight to the replica and through the gateway."""
    return (httpx.post(replica.base_url + path, json=body, timeout=60),
            _get(g, path, method="POST", json=body))


def _same(direct: httpx.Response, through: httpx.Response) -> None:
    """The gateway's answer is the replica's, but for the response id and creation time."""
    assert through.status_code == direct.status_code, (direct.text, through.text)
    if direct.headers["content-type"].startswith("text/event-stream"):
        assert _events(through.text) == _events(direct.text)
    else:
        assert _plain(through.json()) == _plain(direct.json())


def _plain(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("id", "created")}


def _events(text: str) -> list:
    out = []
    for e in text.split("\n\n"):
        if e.startswith("data: {"):
            out.append(_plain(json.loads(e[6:])))
        elif e.strip():
            out.append(e.strip())
    return out


def _client(g: GatewayProcess, tenant: str = "a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.base_url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def _metric(g: GatewayProcess, name: str) -> float:
    """The sum of a gateway metric's samples (0 when it has none yet)."""
    text = httpx.get(f"{g.base_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _access_or_none(g: GatewayProcess, rid: str) -> dict | None:
    for line in g.logs().splitlines():
        if '"event": "access"' in line and rid in line:
            return json.loads(line[line.index("{"):])
    return None


def _access(g: GatewayProcess, rid: str) -> dict:
    entry = _access_or_none(g, rid)
    assert entry is not None, f"no access-log line for {rid}"
    return entry


CHAT = [{"role": "user", "content": "hi"}]


# ---- every field arrives; the answer is the replica's -------------------------------------------------------------
def test_logprobs_0_on_a_deterministic_completion_comes_back(gw, replica):
    """logprobs 0 is "the sampled token's logprob", not off: through the gateway (alone, and coalesced with an
    identical request) the response carries the replica's logprobs."""
    kw = dict(model="m", prompt="logprobs zero", max_tokens=200, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    client = _client(gw)
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(client.completions.with_raw_response.create, **kw)
        time.sleep(0.05)
        f2 = ex.submit(client.completions.with_raw_response.create, **kw)
        r1, r2 = f1.result(), f2.result()
    for r in (r1, r2):
        lp = r.parse().choices[0].logprobs
        assert lp is not None and len(lp.token_logprobs) == 200 and all(x <= 0 for x in lp.token_logprobs)
    assert r2.headers.get("x-conveyor-joined") == "coalesced"
    assert r1.parse().choices[0].logprobs == r2.parse().choices[0].logprobs
    body = {"model": "m", "prompt": "logprobs zero", "max_tokens": 4, "temperature": 0, "logprobs": 0}
    _same(*_both(replica, gw, "/v1/completions", body))
    chat = {"model": "m", "messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 0}
    direct, through = _both(replica, gw, "/v1/chat/completions", chat)
    _same(direct, through)
    assert through.json()["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"logit_bias": {"104": 100}}),
    ("/v1/completions", {"echo": True}),
    ("/v1/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "t", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"]}}}}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}],
        "tool_choice": "required"}),
    ("/v1/chat/completions", {"logit_bias": {"104": -100}, "stream": True}),
    ("/v1/completions", {"include_stop_str_in_output": True, "stop": ["g"]}),
])
def test_every_field_arrives_at_the_replica(gw, replica, path, extra):
    """Whatever the replica does with a field (honours it, or refuses it by name), the gateway's answer is the same:
    nothing was dropped or rebuilt on the way."""
    body = {"model": "m", "max_tokens": 12, "temperature": 0, **extra,
            **({"messages": CHAT} if "chat" in path else {"prompt": "fields"})}
    direct, through = _both(replica, gw, path, body)
    _same(direct, through)
    if through.status_code == 200 and not body.get("stream"):
        choice = through.json()["choices"][0]
        if extra.get("response_format") and choice["finish_reason"] == "stop":
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream_options", [None, {"include_usage": True},
                                            {"include_usage": True, "continuous_usage_stats": True},
                                            {"continuous_usage_stats": True}])
def test_streams_carry_usage_exactly_as_the_replica_sends_it(gw, replica, stream_options):
    """The gateway always asks the replica for usage (it settles tokens by it); a client that did not ask gets no
    usage at all, one that did gets every chunk as the replica sends it (`usage: null` before the last)."""
    body = {"model": "m", "prompt": "usage", "max_tokens": 5, "temperature": 0, "stream": True,
            **({"stream_options": stream_options} if stream_options else {})}
    direct, through = _both(replica, gw, "/v1/completions", body)
    _same(direct, through)
    usage = [e.get("usage") for e in _events(through.text) if isinstance(e, dict)]
    asked = bool(stream_options and stream_options.get("include_usage"))
    assert (usage[-1] is not None and usage[-1]["completion_tokens"] == 5) if asked else usage == [None] * len(usage)
    chunks = list(_client(gw).chat.completions.create(model="m", messages=CHAT, max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and all(c.usage is None for c in chunks[:-1])


SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "string", "maxLength": 4}}, "required": ["x"]}}}]


def test_structured_outputs_and_tool_calls_through_the_gateway(gw):
    """50 sampled json_schema completions (25 chat, 25 streamed completions) validate against their schema; sampled
    `required` tool calls, streamed and not, parse and validate against the function's parameters."""
    client = _client(gw)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": SCHEMA}}
    chat = client.chat.completions.create(model="m", messages=CHAT, n=25, temperature=1.0, max_tokens=100,
                                          response_format=fmt)
    texts = {c.index: c.message.content for c in chat.choices if c.finish_reason == "stop"}
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="m", prompt="json", n=25, temperature=1.0, max_tokens=100,
                                           stream=True, extra_body={"response_format": fmt}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            assert c.finish_reason in (None, "stop")
    assert len(texts) == len(streamed) == 25
    for text in [*texts.values(), *streamed.values()]:
        jsonschema.validate(json.loads(text), SCHEMA)
    params = TOOLS[0]["function"]["parameters"]
    # one call each (parallel calls could run past any max_tokens on random weights)
    calls = client.chat.completions.create(model="m", messages=CHAT, tools=TOOLS, tool_choice="required", n=10,
                                           temperature=1.0, max_tokens=80, parallel_tool_calls=False)
    for c in calls.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "f"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), params)
    args = ""
    for chunk in client.chat.completions.create(model="m", messages=CHAT, tools=TOOLS, tool_choice="required",
                                                temperature=1.0, max_tokens=80, stream=True,
                                                parallel_tool_calls=False):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            args += d.function.arguments or ""
    jsonschema.validate(json.loads(args), params)


def test_logit_bias_through_the_gateway(gw):
    """+100 forces its token, -100 bans it (token ids from the gateway's /tokenize)."""
    client = _client(gw)

    def ids(text: str) -> list[int]:
        r = _get(gw, "/tokenize", method="POST", json={"model": "m", "prompt": text, "add_special_tokens": False})
        return r.json()["tokens"]
    (forced,) = ids("A")
    text = client.completions.create(model="m", prompt="bias", max_tokens=6, temperature=1.0,
                                     logit_bias={str(forced): 100}).choices[0].text
    assert ids(text) == [forced] * 6
    greedy = client.completions.create(model="m", prompt="bias", max_tokens=6, temperature=0).choices[0].text
    banned = set(ids(greedy))
    text = client.completions.create(model="m", prompt="bias", max_tokens=6, temperature=0,
                                     logit_bias={str(t): -100 for t in banned}).choices[0].text
    assert text and not banned & set(ids(text))


# ---- refusals pass through; the gateway's own name the field -----------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "bogus_field": 1}, "bogus_field"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "seed": 1 << 63}, "seed"),
    ("/v1/completions", {"prompt": "x", "temperature": 0, "max_tokens": -1}, "max_tokens"),
    # what sizes the reservation, checked by the gateway as the replica would: a 400, never a 429 (issue 13's tester)
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**21}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**63}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 10**30}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 10**30}, "best_of"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "beam_width": 10**30}, "beam_width"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**30}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "prompt"),  # prompt + max_tokens > context
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN + 1}, "messages"),
    # the gateway's own checks: the same param as the replica would name
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "maybe"}},
     "stream_options.include_usage"),
])
def test_400s_pass_through_with_their_param_and_are_not_retried(gw, replica, path, body, param):
    before = _metric(gw, "conveyor_gateway_upstream_requests_total")
    r = _get(gw, path, method="POST", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    direct = httpx.post(replica.base_url + path, json={"model": "m", **body}, timeout=60)
    assert direct.status_code == 400 and direct.json()["error"]["param"] == param
    if _metric(gw, "conveyor_gateway_upstream_requests_total") > before:  # the replica refused it: as it is
        assert r.json() == direct.json()
        assert _metric(gw, "conveyor_gateway_upstream_requests_total") == before + 1  # once, on one replica
    rest = dict(body)
    with pytest.raises(openai.BadRequestError) as e:
        if "chat" in path:
            _client(gw).chat.completions.create(model="m", messages=rest.pop("messages"), extra_body=rest)
        else:
            _client(gw).completions.create(model="m", prompt=rest.pop("prompt"), extra_body=rest)
    assert e.value.status_code == 400 and e.value.body["param"] == param


# ---- the reservation ----------------------------------------------------------------------------------------------
def test_the_reservation_is_what_the_replica_allows(gw):
    """A completion without max_tokens generates 16 tokens, so it reserves prompt + 16 (not 256: a tenant with a
    small quota was refused); chat without a limit may run to max_model_len, learned from the replica."""
    small = _client(gw, "small")
    for _ in range(3):  # three of them fit in the quota, one at a time: the unused part goes back each time
        r = small.completions.with_raw_response.create(model="m", prompt="quota", extra_body={"ignore_eos": True})
        done = r.parse()
        assert done.usage.completion_tokens == 16
        entry = _access(gw, r.headers["x-request-id"])
        assert entry["reserved_tokens"] == done.usage.prompt_tokens + 16, entry
    with pytest.raises(openai.RateLimitError) as e:  # up to the end of the context: more than the quota allows
        small.chat.completions.create(model="m", messages=CHAT)
    assert e.value.body["code"] == "request_too_large"
    r = small.chat.completions.with_raw_response.create(model="m", messages=CHAT, max_completion_tokens=4)
    assert r.parse().usage.completion_tokens <= 4
    assert _access(gw, r.headers["x-request-id"])["reserved_tokens"] == r.parse().usage.prompt_tokens + 4
    for path, body in (("/v1/chat/completions", {"messages": CHAT, "max_tokens": None}),
                       ("/v1/completions", {"prompt": "null", "max_tokens": None})):  # null: no default of 16
        with httpx.stream("POST", gw.base_url + path, json={"model": "m", "stream": True, **body}, timeout=60,
                          headers={"authorization": f"Bearer {KEYS['a']}"}) as r:
            next(r.iter_lines())  # its reservation is made; no need to wait for ~1000 tokens
        wait_until(lambda: '"reserved_tokens"' in json.dumps(_access_or_none(gw, r.headers["x-request-id"])))
        assert _access(gw, r.headers["x-request-id"])["reserved_tokens"] == MAX_MODEL_LEN


def test_a_small_quota_gets_400s_for_hopeless_requests_and_one_unretried_429(gw):
    """Tenant `small` (120 tokens a minute): a request the replica would refuse is its 400, even when its
    reservation is over the quota; a valid request over the quota is a 429 request_too_large that says not to
    retry (x-should-retry: false, no Retry-After), so the openai SDK, which retries 429s, sends it once."""
    small = _client(gw, "small")
    for kw, param in (({"max_tokens": 5000}, "prompt"), ({"n": 10**30, "max_tokens": 1}, "n"),
                      ({"max_tokens": 10**21}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            small.completions.create(model="m", prompt="x", extra_body=kw)
        assert e.value.body["param"] == param, e.value.body
    before = _metric(gw, "conveyor_gateway_rejections_total")
    retrying = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS["small"], max_retries=2, timeout=60)
    with pytest.raises(openai.RateLimitError) as e:
        retrying.completions.create(model="m", prompt="x", max_tokens=500)
    assert e.value.body["code"] == "request_too_large" and "per minute" in e.value.body["message"]
    headers = e.value.response.headers
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    assert _metric(gw, "conveyor_gateway_rejections_total") == before + 1  # sent once


def test_wrong_methods_are_invalid_request_errors_as_on_the_replica(gw, replica):
    through = _get(gw, "/v1/completions")
    direct = httpx.get(replica.base_url + "/v1/completions", timeout=10)
    assert through.status_code == direct.status_code == 405
    assert through.json()["error"]["type"] == direct.json()["error"]["type"] == "invalid_request_error"
    assert through.json()["error"]["code"] == direct.json()["error"]["code"] == "method_not_allowed"


# ---- endpoints ----------------------------------------------------------------------------------------------------
def test_models_by_id(gw):
    for name in ("m", "m-alias"):
        card = _client(gw).models.retrieve(name)
        assert card.id == name and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    listed = _get(gw, "/v1/models").json()["data"]
    assert {(m["id"], m["max_model_len"]) for m in listed} == {(n, MAX_MODEL_LEN) for n in ("m", "m-alias", "other")}
    with pytest.raises(openai.NotFoundError) as e:
        _client(gw).models.retrieve("nope")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert _get(gw, "/v1/models/m", key=None).status_code == 401
    assert _get(gw, "/v1/models/m", key="wrong").json()["error"]["code"] == "invalid_api_key"


def test_a_tenant_sees_and_uses_only_its_models(gw):
    """Tenant `small` may use m (named by its alias in the config): every other model is, to it, one that does not
    exist, on every endpoint."""
    small = _client(gw, "small")
    assert sorted(m.id for m in small.models.list()) == ["m", "m-alias"]
    assert small.models.retrieve("m").model_extra["max_model_len"] == MAX_MODEL_LEN
    for call in (lambda: small.models.retrieve("other"),
                 lambda: small.completions.create(model="other", prompt="x", max_tokens=1),
                 lambda: small.chat.completions.create(model="other", messages=CHAT, max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = _get(gw, "/tokenize", key=KEYS["small"], method="POST", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert _client(gw).models.retrieve("other").id == "other"  # tenant a may use every model


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"prompt": "hello"}),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": True}),
    ("/detokenize", {"tokens": [104, 105]}),
    ("/tokenize", {"prompt": "x", "bogus_field": 1}),
])
def test_tokenize_and_detokenize_reach_a_replica_of_the_model(gw, replica, path, body):
    direct = httpx.post(replica.base_url + path, json={"model": "m", **body}, timeout=60)
    through = _get(gw, path, method="POST", json={"model": "m-alias", **body})  # the replica knows it as "m"
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    if path == "/tokenize" and through.status_code == 200:
        out = through.json()
        assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_is_authenticated_and_names_unknown_models(gw):
    assert _get(gw, "/tokenize", key=None, method="POST", json={"model": "m", "prompt": "x"}).status_code == 401
    r = _get(gw, "/tokenize", method="POST", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = _get(gw, "/detokenize", method="POST", content=b'{"tokens": [1]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = _get(gw, "/tokenize", method="POST", content=b'{"model": "m", "prompt": "\\ud800"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def test_unknown_routes_are_openai_404s(gw, method):
    for path in ("/v1/nope", "/v2/chat/completions", "/tokenize/x"):
        r = _get(gw, path, method=method)
        assert r.status_code == 404, (method, path, r.text)
        if method != "HEAD":
            err = r.json()["error"]
            assert err["type"] == "not_found_error" and err["code"] == "not_found", err


def test_nothing_is_held_afterwards(gw):
    wait_until(lambda: all(_metric(gw, m) == 0 for m in (
        "conveyor_gateway_concurrency_slots", "conveyor_gateway_reserved_tokens",
        "conveyor_gateway_queued_requests", "conveyor_gateway_in_flight_requests")), what="an idle gateway")
