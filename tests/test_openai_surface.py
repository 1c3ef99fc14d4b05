"""The OpenAI/vLLM request surface of `conveyor serve` through the openai SDK (and raw HTTP where the SDK hides the
wire format), streaming and not (issue 13 items 1, 3, 4, 5 and the server-side faults): unknown and unhonourable
fields are 400s naming the field, every validation error names its `param`; logit_bias, response_format /
structured_outputs / guided_*, prompt_logprobs, echo, best_of, include_stop_str_in_output; /v1/models/{id},
/tokenize, /detokenize, 404s; text_offset across chunks, tokens' own bytes, logprobs that travel with their text,
`usage: null` in chunks. One demo server for the module (a second one for the lenient flag and an API key); the
real model only for one json_schema check."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_process import ServerProcess
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from conveyor.model import builtin, gguf_loader
from conveyor.model.demo import demo_tokenizer
from conveyor.server.logprobs import LogprobFormatter
from conveyor.tools import ToolRequest, render_chat

TOK = demo_tokenizer()
CHAT = [{"role": "user", "content": "Hello"}]
FREE = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "32", "--num-kv-blocks", "1024", "--max-model-len", "512",
                      "--served-model-name", "demo", "org/demo-2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def lenient():
    s = ServerProcess("--lenient-request-fields", "--max-num-seqs", "4", "--num-kv-blocks", "64",
                      env={"CONVEYOR_API_KEY": "sekret"})
    yield s
    s.stop()


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60, **kw)


def sse(r: httpx.Response) -> list[dict]:
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- strictness ---------------------------------------------------------------------------------------------------
C, H = "/v1/completions", "/v1/chat/completions"
JS = {"name": "x", "schema": {"type": "object"}}
BAD = [  # (route, extra fields, the param the 400 must name)
    (C, {"frobnicate": 1}, "frobnicate"), (H, {"echo": True}, "echo"), (C, {"guided_decoding_backend": "x"},
                                                                        "guided_decoding_backend"),
    (C, {"temperature": -1}, "temperature"), (C, {"top_p": 0}, "top_p"), (C, {"n": 0}, "n"), (C, {"n": 129}, "n"), (C, {"n": 33}, "n"),
    (C, {"max_tokens": 0}, "max_tokens"), (C, {"min_tokens": -1}, "min_tokens"),
    (C, {"min_tokens": 5, "max_tokens": 3}, "min_tokens"), (C, {"presence_penalty": 3}, "presence_penalty"),
    (C, {"frequency_penalty": -3}, "frequency_penalty"), (C, {"repetition_penalty": 0}, "repetition_penalty"),
    (C, {"top_k": -2}, "top_k"), (C, {"min_p": 2}, "min_p"), (C, {"logprobs": 21}, "logprobs"),
    (C, {"stop": [""]}, "stop"), (C, {"stop": [str(i) for i in range(17)]}, "stop"),
    (C, {"stop_token_ids": [-1]}, "stop_token_ids"), (C, {"seed": 2**63}, "seed"), (C, {"seed": -2**63 - 1}, "seed"),
    (C, {"priority": 2**63}, "priority"), (C, {"use_beam_search": True, "beam_width": 0}, "beam_width"),
    (C, {"use_beam_search": True, "logprobs": 1}, "use_beam_search"), (C, {"length_penalty": 11}, "length_penalty"),
    (C, {"early_stopping": "x"}, "early_stopping"), (C, {"best_of": 1, "n": 2}, "best_of"),
    (C, {"best_of": 2, "stream": True}, "best_of"), (C, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (C, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"), (C, {"echo": True, "logprobs": 21}, "logprobs"),
    (C, {"logit_bias": {"x": 1}}, "logit_bias"), (C, {"logit_bias": {"65": 101}}, "logit_bias"),
    (C, {"logit_bias": {"99999": 1}}, "logit_bias"), (C, {"suffix": "end"}, "suffix"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    (C, {"response_format": {"type": "xml"}}, "response_format.type"),
    (C, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    (C, {"structured_outputs": {"regex": "a", "backend": "x"}}, "structured_outputs.backend"),
    (C, {"guided_regex": "("}, "guided_regex"), (C, {"guided_choice": []}, "guided_choice"),
    (C, {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
    (C, {"stream_options": {"include_usage": True}}, "stream_options"), (C, {"store": True}, "store"),
    (C, {"service_tier": "flex"}, "service_tier"), (C, {"include_stop_str_in_output": "x"},
                                                    "include_stop_str_in_output"),
    (H, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"), (H, {"top_logprobs": 2}, "top_logprobs"),
    (H, {"max_completion_tokens": 0}, "max_completion_tokens"), (H, {"max_tokens": 0}, "max_tokens"),
    (H, {"audio": {"voice": "x"}}, "audio"), (H, {"modalities": ["text", "audio"]}, "modalities"),
    (H, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (H, {"reasoning_effort": "high"}, "reasoning_effort"), (H, {"web_search_options": {}}, "web_search_options"),
    (H, {"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    (H, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"), (H, {"logit_bias": {"-1": 5}}, "logit_bias"),
    (C, {"logit_bias": {"65": "up"}}, "logit_bias.65"), (C, {"skip_special_tokens": "x"}, "skip_special_tokens"),
    (C, {"ignore_eos": "maybe"}, "ignore_eos"), (C, {"cache_salt": 5}, "cache_salt"), (C, {"echo": "x"}, "echo"),
    (C, {"stream": "x"}, "stream"), (C, {"stream": True, "stream_options": {"include_usage": "x"}},
                                    "stream_options.include_usage"),
    (C, {"model": 5}, "model"), (C, {"user": 5}, "user"), (C, {"metadata": {"a": 1}}, "metadata.a"),
    (H, {"add_generation_prompt": "x"}, "add_generation_prompt"), (H, {"logprobs": 3}, "logprobs"),
    (H, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"), (C, {"prompt": None}, "prompt"),
    # nested unknown or contradictory fields, by their full path
    (C, {"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {**JS, "bogus": 1}}},
     "response_format.json_schema.bogus"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {**JS, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {**JS, "name": "a b c!"}}},
     "response_format.json_schema.name"),
    (C, {"response_format": {"type": "text", "json_schema": JS}}, "response_format.json_schema"),
    (H, {"response_format": {"type": "json_object", "json_schema": JS}}, "response_format.json_schema"),
    (C, {"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    (H, {"tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]}, "tools.0.function.bogus"),
    (H, {"tools": [{"type": "function", "function": {"name": "f"}, "bogus": 1}]}, "tools.0.bogus"),
    (H, {"messages": [{"role": "user", "content": "x", "foo": 1}]}, "messages.0.foo"),
    (H, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}]},
     "messages.0.content.0.foo"),
    (H, {"messages": [{"role": "user"}]}, "messages.0.content"),
    (H, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    # strict types, as OpenAI's
    (C, {"logit_bias": {"65": "5"}}, "logit_bias.65"), (C, {"logit_bias": {"65": True}}, "logit_bias.65"),
    (H, {"logprobs": "yes"}, "logprobs"), (C, {"seed": "5"}, "seed"), (C, {"seed": True}, "seed"),
    (C, {"max_tokens": "5"}, "max_tokens"), (C, {"max_tokens": True}, "max_tokens"), (C, {"n": "2"}, "n"),
    (C, {"n": True}, "n"), (C, {"temperature": "1"}, "temperature"),
    # chat options and tools
    (H, {"continue_final_message": True}, "continue_final_message"),
    (H, {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    (H, {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    (H, {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                    "function": {}}},
     "tool_choice.function.name"),
    (H, {"tools": [{"type": "function", "function": {"name": "f"}},
                   {"type": "function", "function": {"name": "g", "parameters": {
                       "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}]},
     "tools.1.function.parameters"),
]


@pytest.mark.parametrize("route, extra, param", BAD, ids=[f"{r[-16:]}-{p}-{i}" for i, (r, _, p) in enumerate(BAD)])
def test_bad_field_is_400_naming_it(server, route, extra, param):
    base = {"prompt": "x", "max_tokens": 4} if route == C else {"messages": CHAT, "max_tokens": 4}
    r = post(server, route, {**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_field_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, extra_body={"mystery": 1})
    assert e.value.param == "mystery" and "Unrecognized request argument supplied: mystery" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=2, suffix="tail")
    assert e.value.param == "suffix"


def test_harmless_fields_and_the_seed_range_are_accepted(client):
    harmless = dict(user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
                    extra_body={"safety_identifier": "s", "prompt_cache_key": "p", **FREE})
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, seed=-2**63, **harmless)
    assert r.usage.completion_tokens == 2
    r = client.completions.create(model="demo", prompt="x", max_tokens=2, seed=2**63 - 1, user="u1",
                                  extra_body={"metadata": {"k": "v"}, **FREE})
    assert r.usage.completion_tokens == 2


def test_nulls_whole_floats_and_the_sdks_own_message_dump_are_accepted(server, client):
    """What OpenAI and vLLM accept and clients send: null for a defaulted field, 4.0 for an integer, and the previous
    reply's message.model_dump() (refusal, audio, function_call, annotations all null) in the next turn."""
    nulls = {"n": None, "presence_penalty": None, "frequency_penalty": None, "stream": None, "seed": 5.0, **FREE}
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3.0, "echo": None, "best_of": None, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 2.0, "logprobs": None,
                                              "top_logprobs": None, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    for bad, param in ((2.5, "max_tokens"), ("3", "max_tokens"), (True, "max_tokens")):
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    reply = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2).choices[0].message
    dumped = reply.model_dump()
    assert {"refusal", "audio", "function_call", "annotations"} <= set(dumped)
    r = post(server, "/v1/chat/completions", {"messages": [*CHAT, dumped, {"role": "user", "content": "more"}],
                                              "max_tokens": 2})
    assert r.status_code == 200, r.text
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]}
    r = post(server, "/v1/chat/completions", {"messages": [*CHAT, refusal], "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {"messages": [*CHAT, {**dumped, "audio": {"id": "a1"}}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.audio", r.text


def test_lenient_flag_ignores_unknown_fields_only(lenient):
    auth = {"Authorization": "Bearer sekret"}
    r = post(lenient, C, {"prompt": "x", "max_tokens": 2, "frobnicate": [1], "guided_decoding_backend": "x"},
             headers=auth)
    assert r.status_code == 200, r.text
    r = post(lenient, C, {"prompt": "x", "max_tokens": 2, "suffix": "y"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    nested = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}], "foo": 1}],
              "max_tokens": 2, "response_format": {"type": "json_object", "extra": 1},
              "tools": [{"type": "function", "function": {"name": "f", "bogus": 1}, "bogus": 1}]}
    r = post(lenient, H, nested, headers=auth)
    assert r.status_code == 200, r.text
    r = post(lenient, C, {"prompt": "x", "max_tokens": "2"}, headers=auth)  # types stay strict
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # the new endpoints take the API key like the others
    for method, path, body in [("GET", "/v1/models/demo", None), ("POST", "/tokenize", {"prompt": "x"}),
                               ("POST", "/detokenize", {"tokens": [104]})]:
        assert httpx.request(method, lenient.base_url + path, json=body).status_code == 401
        assert httpx.request(method, lenient.base_url + path, json=body, headers=auth).status_code == 200


# ---- parameters -------------------------------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans(client):
    r = client.completions.create(model="demo", prompt="x", max_tokens=8, temperature=1.0, seed=1,
                                  logit_bias={"65": 100}, extra_body=FREE)
    assert r.choices[0].text == "A" * 8
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=1.0, seed=1,
                                       logit_bias={"66": 100}, extra_body=FREE)
    assert r.choices[0].message.content == "B" * 8
    free = client.completions.create(model="demo", prompt="ban", max_tokens=24, temperature=0, extra_body=FREE)
    common = max(set(free.choices[0].text), key=free.choices[0].text.count)
    banned = client.completions.create(model="demo", prompt="ban", max_tokens=24, temperature=0,
                                       logit_bias={str(ord(common)): -100}, extra_body=FREE)
    assert common not in banned.choices[0].text and free.choices[0].text != banned.choices[0].text


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def _person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_50_sampled_completions_validate(client):
    r = client.completions.create(model="demo", prompt=["a", "b", "c", "d", "e"], n=10, max_tokens=120,
                                  temperature=1.0, seed=5, extra_body={"response_format": _person_format()})
    assert len(r.choices) == 50
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), PERSON)
    stream = client.chat.completions.create(model="demo", messages=CHAT, n=4, max_tokens=120, temperature=1.0,
                                            response_format=_person_format(), stream=True)
    texts = {i: "" for i in range(4)}
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    for t in texts.values():
        jsonschema.validate(json.loads(t), PERSON)


def test_json_object_choice_regex_and_grammar(client):
    # random weights wander inside strings for long; a bias towards "}" ends the object once the grammar allows it
    # (without the grammar the bias would give "}}}}")
    r = client.chat.completions.create(model="demo", messages=CHAT, n=4, max_tokens=20, temperature=1.0, seed=2,
                                       response_format={"type": "json_object"}, logit_bias={"125": 100})
    assert [json.loads(c.message.content) for c in r.choices] == [{}] * 4
    r = client.completions.create(model="demo", prompt="x", max_tokens=10, n=4, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model="demo", prompt="x", max_tokens=10, temperature=1.0, seed=3,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model="demo", prompt="x", max_tokens=8, temperature=1.0, seed=4,
                                  extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"})
    assert r.choices[0].text[:3].isdigit() and r.choices[0].text[3] == "-" and len(r.choices[0].text) == 6
    r = client.completions.create(model="demo", prompt="x", max_tokens=8, temperature=1.0, seed=4,
                                  extra_body={"guided_grammar": 'root ::= ("ab" | "cd")+ "!"'})
    text = r.choices[0].text
    assert text.endswith("!") or r.choices[0].finish_reason == "length"


def test_prompt_logprobs(client, server):
    r = post(server, C, {"prompt": "Hello", "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == 5 and plp[0] is None
    for tok, entry in zip(TOK.encode("Hello")[1:], plp[1:]):
        assert str(tok) in entry and len(entry) in (2, 3)
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] and all(v["logprob"] <= 0 for v in entry.values())
        assert len(ranks) == 2 or ranks[2] > 2  # the prompt token outside the top 2: its true rank
    r = post(server, H, {"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 0})
    body = r.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None


def test_prompt_logprobs_exactly_n_with_true_ranks(server):
    """prompt_logprobs N gives the top N (ranks 1..N) and the prompt token with its vocabulary rank, also when
    echo + logprobs had the engine compute more alternatives."""
    r = post(server, C, {"prompt": "hi there", "max_tokens": 1, "echo": True, "prompt_logprobs": 1, "logprobs": 3})
    ids = TOK.encode("hi there")
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["top_logprobs"][1]) >= 3  # the echoed prompt's own logprobs keep their 3
    for tok, entry in zip(ids[1:], choice["prompt_logprobs"][1:]):
        top = [v for k, v in entry.items() if v["rank"] == 1]
        assert len(entry) in (1, 2) and str(tok) in entry and len(top) >= 1
        mine = entry[str(tok)]
        assert isinstance(mine["rank"], int) and mine["rank"] >= 1
        assert (mine["rank"] == 1) == (mine["logprob"] >= top[0]["logprob"])
    full = post(server, C, {"prompt": "hi there", "max_tokens": 1, "prompt_logprobs": 20}).json()
    for tok, small, big in zip(ids[1:], choice["prompt_logprobs"][1:], full["choices"][0]["prompt_logprobs"][1:]):
        assert small[str(tok)]["rank"] == big[str(tok)]["rank"]  # the rank does not depend on N
        if big[str(tok)]["rank"] <= 20:
            assert sorted(big, key=lambda k: big[k]["rank"]).index(str(tok)) + 1 == big[str(tok)]["rank"]


def test_best_of_usage_counts_every_candidate(server):
    body = {"prompt": "x", "max_tokens": 5, "n": 2, "best_of": 6, "ignore_eos": True}
    before = _generation_tokens(server)
    r = post(server, C, body).json()
    assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] == 30
    assert _generation_tokens(server) - before == 30


def _generation_tokens(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


def test_chat_options_and_tokenize_with_tools(server):
    """continue_final_message leaves the last message open; chat_template_kwargs reach the template; /tokenize
    renders messages with tools and the same options as chat completions."""
    conv = [*CHAT, {"role": "assistant", "content": "Hel"}]
    opts = {"continue_final_message": True, "add_generation_prompt": False}
    r = post(server, "/tokenize", {"messages": conv, **opts, "return_token_strs": True}).json()
    assert TOK.decode(r["tokens"]).endswith("<|start_header|>assistant<|end_header|>\n\nHel")
    r = post(server, H, {"messages": conv, **opts, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}})
    count = post(server, "/tokenize", {"messages": conv, **opts}).json()["count"]
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == count
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = post(server, "/tokenize", {"messages": CHAT, "tools": tools}).json()
    assert "get_weather" in TOK.decode(with_tools["tokens"])
    rendered = render_chat(TOK, CHAT, ToolRequest.from_request(tools, None, None))  # what chat completions use
    assert with_tools["tokens"] == TOK.encode(rendered, add_special_tokens=False)
    for body, param in [({"prompt": "x", "tools": tools}, "tools"), ({"messages": CHAT, "tools": [{"x": 1}]},
                                                                      "tools.0.x"),
                        ({"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
                        ({"messages": CHAT, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
                        ({"messages": [{"role": "user"}]}, "messages.0.content")]:
        r = post(server, "/tokenize", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_echo_with_logprobs_streamed_and_not(client):
    kw = dict(model="demo", prompt="Echo me", max_tokens=6, temperature=0, echo=True, logprobs=2, extra_body=FREE)
    r = client.completions.create(**kw)
    c = r.choices[0]
    assert c.text.startswith("Echo me") and len(c.text) > len("Echo me")
    lp = c.logprobs
    assert lp.tokens[:7] == list("Echo me") and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:]) and len(lp.tokens) == 7 + 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = [ch.choices[0] for ch in client.completions.create(stream=True, **kw)]
    assert "".join(ch.text for ch in chunks) == c.text
    assert sum((ch.logprobs.tokens for ch in chunks), []) == lp.tokens
    assert sum((ch.logprobs.text_offset for ch in chunks), []) == lp.text_offset
    assert sum((ch.logprobs.token_logprobs for ch in chunks), []) == lp.token_logprobs


def test_best_of_and_include_stop_str_in_output(client):
    r = client.completions.create(model="demo", prompt="Best", n=2, best_of=4, max_tokens=5, temperature=1.0,
                                  seed=9, extra_body=FREE)
    assert sorted(c.index for c in r.choices) == [0, 1]
    chunks = list(client.completions.create(model="demo", prompt="Best", best_of=1, max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason is not None  # best_of == n streams (LangChain sends best_of=1)
    base = client.completions.create(model="demo", prompt="Stop here", max_tokens=20, temperature=0,
                                     extra_body=FREE).choices[0].text
    stop = base[5:7]
    for stream in (False, True):
        r = client.completions.create(model="demo", prompt="Stop here", max_tokens=20, temperature=0, stop=[stop],
                                      stream=stream, extra_body={"include_stop_str_in_output": True, **FREE})
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == base[:base.index(stop)] + stop


# ---- faults -------------------------------------------------------------------------------------------------------
def test_streamed_text_offset_continues_across_chunks(client):
    kw = dict(model="demo", prompt="Offsets", max_tokens=10, temperature=0, logprobs=1, extra_body=FREE)
    whole = client.completions.create(**kw).choices[0].logprobs
    assert whole.text_offset == [sum(len(t) for t in whole.tokens[:i]) for i in range(10)]
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw)]
    assert len(chunks) > 1
    assert sum((c.text_offset for c in chunks), []) == whole.text_offset
    assert sum((c.tokens for c in chunks), []) == whole.tokens


def test_chat_logprob_bytes_are_the_tokens_own_bytes(client):
    # 0xE2 is the first byte of a three-byte character: the token's text is U+FFFD, its bytes [0xE2]
    for stream in (False, True):
        r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3, temperature=1.0, seed=1,
                                           logprobs=True, top_logprobs=20, logit_bias={"226": 100}, stream=stream,
                                           extra_body=FREE)
        content = sum((c.choices[0].logprobs.content for c in r), []) if stream else r.choices[0].logprobs.content
        assert [e.bytes for e in content] == [[0xE2]] * 3
        for e in (x for e in content for x in e.top_logprobs):  # demo: one byte a token, but the special ones
            special = e.token.startswith("<|")
            assert len(e.bytes) == 1 or special
            assert e.bytes[0] >= 0x80 or bytes(e.bytes).decode() == e.token
        assert all(e.token == "\ufffd" for e in content)  # what the bytes used to be made of


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies():
    ckpt = gguf_loader.open_gguf(builtin.resolve_builtin(builtin.DEFAULT_MODEL))
    smol = gguf_loader.load_gguf_tokenizer(ckpt, builtin.cache_dir())  # byte-level BPE (GPT-2's alphabet)
    text = "naïve → 日本語 🙂 ok"
    ids = smol.encode(text, add_special_tokens=False)
    f = LogprobFormatter(smol)
    assert any(smol.decode([i]).endswith("\ufffd") for i in ids)  # some tokens are parts of a character
    assert b"".join(f.token_bytes(i) for i in ids) == text.encode()
    assert f.token_bytes(smol.convert_tokens_to_ids("<|im_start|>")) == b"<|im_start|>"
    # SentencePiece style: <0xNN> byte-fallback tokens, U+2581 for a space
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581hi": 257, "é": 258}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    f = LogprobFormatter(PreTrainedTokenizerFast(tokenizer_object=sp))
    assert [f.token_bytes(i) for i in (1 + 0xE2, 257, 258)] == [b"\xe2", b" hi", "é".encode()]


def test_streamed_logprobs_travel_with_their_text(client, server):
    base = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=30, temperature=0,
                                          extra_body=FREE).choices[0].message.content
    stop = base[10:13]
    body = {"messages": CHAT, "max_tokens": 30, "temperature": 0, "stop": [stop], "logprobs": True,
            "top_logprobs": 1, "stream": True, **FREE}
    chunks = [c["choices"][0] for c in sse(post(server, H, body))]
    whole = post(server, H, {**body, "stream": False}).json()["choices"][0]
    for ch in chunks[:-1]:  # the last chunk also carries the tokens of the stop string, which has no text
        assert b"".join(bytes(e["bytes"]) for e in ch["logprobs"]["content"]) == ch["delta"]["content"].encode()
    assert sum((ch["logprobs"]["content"] for ch in chunks), []) == whole["logprobs"]["content"]
    assert "".join(ch["delta"]["content"] for ch in chunks) == whole["message"]["content"]


def test_usage_is_null_in_every_chunk_but_the_last(server):
    for route, base in ((C, {"prompt": "u"}), (H, {"messages": CHAT})):
        body = {**base, "max_tokens": 4, "n": 2, "stream": True, "stream_options": {"include_usage": True}, **FREE}
        events = sse(post(server, route, body))
        assert all("usage" in e and e["usage"] is None for e in events[:-1])
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
        body["stream_options"]["continuous_usage_stats"] = True
        events = sse(post(server, route, body))
        counts = [e["usage"]["completion_tokens"] for e in events]
        assert counts == sorted(counts) and counts[-1] == 8 and all(e["usage"]["prompt_tokens"] for e in events)


# ---- endpoints ----------------------------------------------------------------------------------------------------
def test_models_by_id_and_several_names(client, server):
    assert [m.id for m in client.models.list().data] == ["demo", "org/demo-2"]
    m = client.models.retrieve("org/demo-2")
    assert m.id == "org/demo-2" and m.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/nope")
    assert e.value.code == "model_not_found"
    r = client.completions.create(model="org/demo-2", prompt="x", max_tokens=2)
    assert r.model == "demo" and r.usage.completion_tokens >= 1


def test_tokenize_and_detokenize(server):
    r = post(server, "/tokenize", {"model": "demo", "prompt": "héllo"}).json()
    assert r["tokens"] == TOK.encode("héllo") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    ids = TOK.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": True, "return_token_strs": True})
    assert r.json()["tokens"] == ids and len(r.json()["token_strs"]) == len(ids)
    assert post(server, "/detokenize", {"tokens": TOK.encode("héllo")}).json() == {"prompt": "héllo"}
    for path, body, param in [("/detokenize", {"tokens": [262]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "x"}, "tokens"), ("/tokenize", {"prompt": "x", "y": 1}, "y"),
                              ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "messages": CHAT}, "messages"),
                              ("/tokenize", {"prompt": "x", "model": "other"}, "model")]:
        r = post(server, path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)


def test_unknown_routes_are_openai_404s_for_every_method(server):
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for path in ("/v1/nothing", "/nothing", "/v1/completions/x", "/tokenize/x"):
            r = httpx.request(method, server.base_url + path)
            assert r.status_code == 404, (method, path)
            assert r.json()["error"]["type"] == "not_found_error"
    assert httpx.head(server.base_url + "/v1/nothing").status_code == 404


# ---- the real model ----------------------------------------------------------------------------------------------
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima", "Cairo", "Oslo"]},
                                         "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "rank"], "additionalProperties": False}


def test_real_model_json_schema_50_sampled_completions():
    s = ServerProcess("--max-num-seqs", "50", "--max-model-len", "512", default_model=None, startup_timeout=300)
    try:
        c = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
        r = c.chat.completions.create(model=c.models.list().data[0].id, n=50, max_tokens=30, temperature=1.0,
                                      seed=7, response_format=fmt,
                                      messages=[{"role": "user", "content": "Name a big city and rank it 1-9."}])
        assert len(r.choices) == 50
        for ch in r.choices:
            jsonschema.validate(json.loads(ch.message.content), CITY)
        assert len({ch.message.content for ch in r.choices}) > 1  # sampled, not one greedy answer
    finally:
        s.stop()
