"""Tool calling on chat completions (issue 13 item 2): validation, rendering through the chat template or the
fallback block, the <tool_call> parser whole and streamed, and the JSON-schema constraint of required / named
choices (conveyor/tools)."""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from server_process import ServerProcess

from conveyor.model.demo import demo_tokenizer
from conveyor.tools import ToolError, ToolRequest, check_tool_messages, make_parser, parse_message, render_chat
from conveyor.tools.template import template_reads_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 23}},
                                       "required": ["hour"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
# as pydantic writes nested models: "$defs" and "$ref"s from the schema's root (kept valid inside the constraint)
ROUTE = {"type": "function", "function": {"name": "plan_route", "parameters": {
    "type": "object", "$defs": {"Stop": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]},
                                                                          "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 9}},
                                         "required": ["city", "days"], "additionalProperties": False}},
    "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}, "minItems": 1, "maxItems": 3}},
    "required": ["stops"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in [*TOOLS, ROUTE]}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
# a template that reads `tools` (as Qwen2.5's and Hermes' do), for the non-fallback path
TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
                  "{{ m.content or '' }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
                  "{{ c.function.arguments | tojson }}{% endfor %}\n{% endfor %}")


def auto(tools=TOOLS, parallel=None) -> ToolRequest:
    return ToolRequest.from_request(tools, "auto", parallel)


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# ---- parsing (auto) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, content, calls", [
    ("no tools here", "no tools here", []),
    ("", "", []),
    (CALL, None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("Let me check.\n" + CALL + "\n", "Let me check.", [("get_weather", {"city": "Paris", "unit": "c"})]),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), None,
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Rome", "unit": "c"})]),
    ('<tool_call>{"name": "get_time", "arguments": {"hour": 3}}', None, [("get_time", {"hour": 3})]),  # unclosed
    ('<tool_call>{"name": "get_time", "arguments": "{\\"hour\\": 3}"}</tool_call>', None, [("get_time", {"hour": 3})]),
    ('a <tool_call>{"name": oops}</tool_call> b', 'a <tool_call>{"name": oops}</tool_call> b', []),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}'
     '</tool_call>', []),  # not one of the request's functions
    ('<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>', '<tool_call>{"name": "get_time", '
     '"arguments": [1]}</tool_call>', []),
    ('<tool_call>{"name": {"a": 1}}</tool_call>', '<tool_call>{"name": {"a": 1}}</tool_call>', []),
    ("x <tool_ca", "x <tool_ca", []),  # held back while it may open a block, handed out at the end
    ("<tool_call>[1, 2", "<tool_call>[1, 2", []),
])
def test_parse_auto(text, content, calls):
    got_content, got_calls = parse_message(auto(), text)
    assert got_content == content and calls_of(got_calls) == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_parse_without_parallel_calls_keeps_the_first():
    text = CALL + "\n" + CALL.replace("Paris", "Rome") + " done"
    content, calls = parse_message(auto(parallel=False), text)
    assert calls_of(calls) == [("get_weather", {"city": "Paris", "unit": "c"})] and content == " done"


def test_no_tools_or_tool_choice_none_is_plain_content():
    assert parse_message(None, CALL) == (CALL, [])
    assert parse_message(ToolRequest.from_request(TOOLS, "none", None), CALL) == (CALL, [])


@pytest.mark.parametrize("seed", range(30))
def test_streamed_parse_equals_whole(seed):
    """Fed in random pieces (one character at a time included), the parser hands out the same content and calls
    as on the whole text."""
    rng = random.Random(seed)
    parts = ["Sure. ", CALL, "\n", "<tool", "_call> bad </tool_call>", " <x>", "\n\n", CALL.replace("Paris", "Oslo"),
             " \n", "<tool_c"]
    text = "".join(rng.sample(parts, rng.randint(1, len(parts))))
    whole_content, whole_calls = parse_message(auto(), text)
    parser = make_parser(auto())
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text))))) if len(text) > 1 \
        else []
    content, calls = "", []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        d = parser.feed(text[a:b])
        content, calls = content + d.content, calls + d.calls
    d = parser.finish()
    content, calls = content + d.content, calls + d.calls
    assert (content or None if calls else content) == whole_content
    assert calls_of(calls) == calls_of(whole_calls)


# ---- constrained choices -----------------------------------------------------------------------------------------
def test_constraints_of_required_and_named():
    named = ToolRequest.from_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.mode == "named" and named.structured_outputs().json == SCHEMAS["get_time"]
    required = ToolRequest.from_request(TOOLS, "required", None).structured_outputs().json
    single = ToolRequest.from_request(TOOLS, "required", False).structured_outputs().json
    ok_call = {"name": "get_time", "arguments": {"hour": 5}}
    jsonschema.validate([ok_call, {"name": "get_weather", "arguments": {"city": "x", "unit": "f"}}], required)
    jsonschema.validate(ok_call, single)
    for bad, schema in [([], required), ([{"name": "get_time", "arguments": {"city": "x"}}], required),
                        ({"name": "nope", "arguments": {}}, single), ([ok_call], single)]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert ToolRequest.from_request(TOOLS, "auto", None).structured_outputs() is None
    with_refs = ToolRequest.from_request([*TOOLS, ROUTE], "required", None).structured_outputs().json
    stops = {"stops": [{"city": "Oslo", "days": 2}]}
    jsonschema.validate([{"name": "plan_route", "arguments": stops}, ok_call], with_refs)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "plan_route", "arguments": {"stops": [{"city": "Paris", "days": 2}]}}], with_refs)
    assert "$defs" not in required  # inlined when the functions have no "$ref"s


@pytest.mark.parametrize("choice, parallel, text, calls", [
    ("required", None, '[{"name": "get_time", "arguments": {"hour": 1}}, {"name": "get_weather", "arguments": '
     '{"city": "Oslo", "unit": "c"}}]', [("get_time", {"hour": 1}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("required", False, '{"name": "get_time", "arguments": {"hour": 2}}', [("get_time", {"hour": 2})]),
    ({"type": "function", "function": {"name": "get_time"}}, None, '{"hour": 4}', [("get_time", {"hour": 4})]),
    ("required", None, '[{"name": "get_time", "argum', []),  # cut by max_tokens: content
    ("required", None, '[{"name": ["get_time"], "arguments": {}}]', []),
    ({"type": "function", "function": {"name": "get_time"}}, None, '{"hour": ', []),
])
def test_parse_constrained(choice, parallel, text, calls):
    content, got = parse_message(ToolRequest.from_request(TOOLS, choice, parallel), text)
    assert calls_of(got) == calls and content == (None if calls else text)


# ---- validation --------------------------------------------------------------------------------------------------
def fn(**kw) -> dict:
    return {"type": "function", "function": {"name": "f", **kw}}


@pytest.mark.parametrize("tools, choice, parallel, param", [
    (None, "auto", None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    ([], None, None, "tools"),
    ({"type": "function"}, None, None, "tools"),
    ([fn()] * 129, None, None, "tools"),
    (["f"], None, None, "tools.0"),
    ([{"type": "retrieval"}], None, None, "tools.0.type"),
    ([{"type": "function"}], None, None, "tools.0.function"),
    ([{"type": "function", "function": {"description": "no name"}}], None, None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], None, None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, None, "tools.0.function.name"),
    ([fn(), fn()], None, None, "tools.1.function.name"),
    ([fn(parameters=[1])], None, None, "tools.0.function.parameters"),
    ([fn(parameters={"type": "string"})], None, None, "tools.0.function.parameters"),
    ([fn(description=3)], None, None, "tools.0.function.description"),
    ([fn(strict="yes")], None, None, "tools.0.function.strict"),
    ([fn()], "sometimes", None, "tool_choice"),
    ([fn()], {"type": "function", "function": {"name": "g"}}, None, "tool_choice"),
    ([fn()], {"type": "function"}, None, "tool_choice"),
    ([fn()], {"type": "function", "function": {"name": ["f"]}}, None, "tool_choice"),
    ([fn()], {"function": {"name": "f"}}, None, "tool_choice"),
    ([fn()], None, "yes", "parallel_tool_calls"),
])
def test_bad_tools_name_their_field(tools, choice, parallel, param):
    with pytest.raises(ToolError) as e:
        ToolRequest.from_request(tools, choice, parallel)
    assert e.value.param == param


def test_good_tools():
    assert ToolRequest.from_request(None, None, None) is None
    assert ToolRequest.from_request(None, "none", True) is None
    r = ToolRequest.from_request([fn(), fn(name="g", parameters={"type": "object"})], None, None)
    assert r.mode == "auto" and r.parallel and [f.name for f in r.functions] == ["f", "g"]
    assert r.functions[0].parameters == {"type": "object", "properties": {}}  # no parameters: no arguments
    open_type = ToolRequest.from_request([fn(parameters={"properties": {"a": {"type": "integer"}}})], None, None)
    assert open_type.functions[0].parameters == {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert len(ToolRequest.from_request([fn(name=f"f{i}") for i in range(128)], None, None).functions) == 128


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "x"}], "messages.0.tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "x", "tool_call_id": ""}],
     "messages.1.tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages.0.tool_calls"),
    ([{"role": "assistant", "tool_calls": {"id": "a"}}], "messages.0.tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages.0.tool_calls.0.id"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}],
     "messages.0.tool_calls.0.function.name"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": 3}}]}],
     "messages.0.tool_calls.0.function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "code", "function": {"name": "f"}}]}],
     "messages.0.tool_calls.0"),
])
def test_bad_tool_messages_name_their_field(messages, param):
    with pytest.raises(ToolError) as e:
        check_tool_messages(messages)
    assert e.value.param == param


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=12)
tool_like = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]) | json_values},
                                  optional={"function": st.fixed_dictionaries(
                                      {}, optional={"name": st.sampled_from(["f", "g"]) | json_values,
                                                    "parameters": json_values, "description": json_values,
                                                    "strict": json_values})})


@settings(max_examples=200, deadline=None)
@given(tools=st.none() | st.lists(tool_like | json_values, max_size=3) | json_values,
       choice=st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}}])
       | json_values, parallel=st.none() | st.booleans() | json_values, text=st.text(max_size=60))
def test_any_tools_json_is_a_tool_request_or_a_tool_error(tools, choice, parallel, text):
    """Whatever JSON arrives in tools / tool_choice / parallel_tool_calls: a ToolRequest or a ToolError with a
    param, never another exception; and any text parses under any valid request."""
    try:
        request = ToolRequest.from_request(tools, choice, parallel)
    except ToolError as e:
        assert e.param.split(".")[0] in ("tools", "tool_choice", "parallel_tool_calls")
        return
    content, calls = parse_message(request, text + CALL)
    assert isinstance(content, (str, type(None))) and isinstance(calls, list)


# ---- rendering ---------------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "4 C, rain"}]},
]


def test_fallback_rendering_for_a_template_without_tools():
    """The demo template ignores tools: the tools block joins the system message, the calls and their results
    are written as tagged text in assistant and user turns."""
    tok = demo_tokenizer()
    assert not template_reads_tools(tok, tok.chat_template)
    check_tool_messages(CONVERSATION)
    text = render_chat(tok, CONVERSATION, auto())
    system = text[:text.index("<|start_header|>user")]
    assert "Be brief.\n\n# Tools" in system and json.dumps(WEATHER["function"]) in system
    assert json.dumps(TIME["function"]) in system and "<tool_call>" in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert ("user<|end_header|>\n\n<tool_response>\n21 C, sunny\n</tool_response>\n<tool_response>\n4 C, rain\n"
            "</tool_response><|eot|>") in text
    assert text.endswith("<|start_header|>assistant<|end_header|>\n\n")
    no_system = render_chat(tok, CONVERSATION[1:2], auto())
    assert no_system.startswith("<|begin_of_text|><|start_header|>system<|end_header|>\n\n# Tools")
    # tool_choice none: the tools are not shown, the conversation still renders
    none = render_chat(tok, CONVERSATION, ToolRequest.from_request(TOOLS, "none", None))
    assert "# Tools" not in none and "<tool_response>\n21 C, sunny" in none
    assert render_chat(tok, CONVERSATION[:2], None) == tok.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    named = render_chat(tok, CONVERSATION[:2], ToolRequest.from_request(
        TOOLS, {"type": "function", "function": {"name": "get_time"}}, None))
    assert "Call the function get_time now." in named


def test_template_that_reads_tools_gets_them():
    tok = demo_tokenizer()
    assert template_reads_tools(tok, TOOLS_TEMPLATE)
    text = render_chat(tok, CONVERSATION, auto(), chat_template=TOOLS_TEMPLATE)
    assert text.startswith("TOOLS:[") and json.loads(text[6:text.index("\n")]) == TOOLS
    assert 'CALL get_weather {"city": "Paris", "unit": "c"}' in text  # arguments handed over as an object
    assert "tool: 21 C, sunny" in text and "# Tools" not in text


def test_response_shapes_whole_and_streamed():
    from conveyor.tools import ToolStream, chat_message
    text = "Checking.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    message, reason = chat_message(auto(), text, "stop")
    assert reason == "tool_calls" and message["content"] == "Checking."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] * 2
    assert chat_message(auto(), "plain", "stop") == ({"role": "assistant", "content": "plain"}, "stop")
    assert chat_message(auto(), CALL, "length")[1] == "length"
    stream, deltas = ToolStream(auto()), []
    for k in range(0, len(text), 7):
        deltas.append(stream.delta(text[k:k + 7], None))
    deltas.append(stream.delta("", "stop"))
    assert [r for _, r in deltas] == [None] * (len(deltas) - 1) + ["tool_calls"]
    assert "".join(d.get("content", "") for d, _ in deltas) == "Checking."
    calls = [c for d, _ in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1] and all(c["type"] == "function" for c in calls)
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert ToolStream(None).delta("x", None) == ({"content": "x"}, None)


# ---- end to end: `conveyor serve --model demo` with the openai SDK -------------------------------------------------
@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-num-seqs", "32", "--num-kv-blocks", "1024", "--max-model-len", "2048")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


ASK = [{"role": "user", "content": "What time is it, and the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}
# forces the random demo model to write one call block in auto mode, to see the server parse it
FORCED_CALL = r'Let me see\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"hour": 1[0-9]\}\}\n</tool_call>'


def check_calls(calls, names=("get_weather", "get_time")) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def stream_choices(client, **kw) -> dict:
    """The streamed choices, accumulated by the openai SDK's stream helper, by index."""
    with client.chat.completions.stream(model="demo", messages=ASK, tools=TOOLS, **kw) as stream:
        return {c.index: c for c in stream.get_final_completion().choices}


@pytest.mark.parametrize("parallel, n", [(True, 10), (False, 4)])
def test_required_calls_always_validate(client, parallel, n):
    """tool_choice required on the random demo model: every sampled choice is calls whose arguments validate
    against their function's schema, streamed or not (n samples each)."""
    kw = dict(tool_choice="required", parallel_tool_calls=parallel, n=n, temperature=1.0, seed=7, max_tokens=400)
    r = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, **kw)
    streamed = stream_choices(client, **kw)
    for c in [*r.choices, *streamed.values()]:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls)
        assert parallel or len(c.message.tool_calls) == 1
    assert sorted(streamed) == list(range(n))


def test_required_with_refs_in_a_schema(client):
    """A function schema with "$defs"/"$ref" (pydantic's nested models) constrains its calls too."""
    r = client.chat.completions.create(model="demo", messages=ASK, tools=[ROUTE], tool_choice="required",
                                       parallel_tool_calls=False, n=4, temperature=1.0, seed=5, max_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        check_calls(c.message.tool_calls, names=("plan_route",))


def test_named_choice_calls_that_function(client):
    kw = dict(tool_choice=NAMED, n=5, temperature=1.0, seed=3, max_tokens=100)
    r = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, **kw)
    for c in [*r.choices, *stream_choices(client, **kw).values()]:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls, names=("get_time",))


def test_auto_parses_a_call_block_streamed_and_not(client, server):
    """auto: the output (forced here by a regex) holding a <tool_call> block comes back as a tool call, with the
    text before it as content; the raw stream's first delta of the call carries index, id, type, name and
    arguments."""
    kw = dict(model="demo", messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=120,
              extra_body={"structured_outputs": {"regex": FORCED_CALL}})
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me see."
    check_calls(c.message.tool_calls, names=("get_time",))
    deltas = [e["choices"][0] for e in sse_events(server, kw) if e.get("choices")]
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and set(calls[0]) == {"index", "id", "type", "function"} and calls[0]["index"] == 0
    assert calls[0]["function"]["name"] == "get_time" and 10 <= json.loads(calls[0]["function"]["arguments"])["hour"]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == "Let me see."
    assert deltas[0]["delta"]["role"] == "assistant" and deltas[-1]["finish_reason"] == "tool_calls"
    assert all("<" not in (d["delta"].get("content") or "") for d in deltas)
    # auto on the free random model: content (the demo model does not write call blocks on its own)
    plain = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and isinstance(plain.choices[0].message.content, str)


def test_tool_choice_none_is_plain_content(client):
    r = client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=120,
                                       extra_body={"structured_outputs": {"regex": FORCED_CALL}})
    c = r.choices[0]
    assert c.message.tool_calls is None and c.finish_reason == "stop" and c.message.content.startswith("Let me")
    assert "<tool_call>" in c.message.content


def test_tool_results_accepted_back(client):
    """A conversation with the assistant's calls and the tool results renders (the demo template has no tools:
    the fallback text) and is answered."""
    tok = demo_tokenizer()
    r = client.chat.completions.create(model="demo", messages=CONVERSATION, tools=TOOLS, max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True})
    text = render_chat(tok, CONVERSATION, auto())
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="demo", messages=CONVERSATION, max_tokens=2, temperature=0)  # no tools
    assert r.usage.prompt_tokens == len(tok.encode(render_chat(tok, CONVERSATION, None), add_special_tokens=False))


def test_required_and_named_on_the_real_model():
    """SmolLM2-135M-Instruct (the fallback tools block: its template ignores tools) under `conveyor serve`:
    required and named choices give calls whose arguments validate, sampled, streamed and not."""
    from conveyor.model.builtin import DEFAULT_MODEL
    server = ServerProcess(DEFAULT_MODEL, default_model=None)
    try:
        real = server.openai_client()
        kw = dict(model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, temperature=0.8, seed=1, max_tokens=100)
        r = real.chat.completions.create(tool_choice="required", n=3, **kw)
        with real.chat.completions.stream(tool_choice=NAMED, n=2, **kw) as stream:
            named = stream.get_final_completion().choices
    finally:
        server.stop()
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        check_calls(c.message.tool_calls)
    for c in named:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls, names=("get_time",))


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "sometimes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "content": "4 C"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [TIME["function"]]}, "functions"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters"),
])
def test_bad_tool_requests_are_400_naming_the_field(server, extra, param):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


def sse_events(server, kw: dict) -> list[dict]:
    """The parsed events of a raw SSE chat stream of the openai-style kwargs kw."""
    body = {**{k: v for k, v in kw.items() if k != "extra_body"}, **kw.get("extra_body", {}), "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_chat_template_kwargs_reach_the_template_and_are_checked():
    from conveyor.tools import ToolError, check_chat_options, render_chat
    from conveyor.model.demo import demo_tokenizer
    tok = demo_tokenizer()
    template = "{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}"
    text = render_chat(tok, [{"role": "user", "content": "x"}], chat_template=template,
                       add_generation_prompt=False, template_kwargs={"greeting": "hey"})
    assert text == "hey x"
    for kwargs, gen, cont, param in [({"tokenize": True}, True, False, "chat_template_kwargs.tokenize"),
                                     ({"a": float("nan")}, True, False, "chat_template_kwargs.a"),
                                     ({1: 2}, True, False, "chat_template_kwargs"),
                                     (None, True, True, "continue_final_message")]:
        with pytest.raises(ToolError) as e:
            check_chat_options(kwargs, gen, cont)
        assert e.value.param == param
    check_chat_options({"enable_thinking": False, "x": [1, {"y": None}]}, False, True)
