"""Chat prompts with tools: through the model's chat template when it reads `tools`, else through a text fallback
(a tools block in the system message; calls and results written as Hermes-style tagged text)."""
from __future__ import annotations

import json
from typing import Any

from conveyor.tools.parser import CLOSE, OPEN
from conveyor.tools.spec import ToolError, ToolRequest, arguments_object

_PROBE_MESSAGES = [{"role": "user", "content": "ping"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool_f3a9", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_reads_tools: dict[str, bool] = {}  # chat template text -> whether it renders `tools`

_TOOLS_BLOCK = """# Tools

You can call functions to help with the user's request. Each function is described by a JSON object on its own \
line inside <tools></tools>; "parameters" is the JSON schema of its arguments.
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags, one \
block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments>}}}}
</tool_call>
The results come back inside <tool_response></tool_response> tags.{rule}"""


# apply_chat_template's own arguments and the names the template's variables have: chat_template_kwargs cannot
# set these (each has its own request field, or is the renderer's)
_RESERVED_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                              "add_generation_prompt", "continue_final_message", "tokenize", "padding", "truncation",
                              "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                              "tokenizer_kwargs", "sanitize_control_tokens"})


def check_chat_options(template_kwargs: Any, add_generation_prompt: bool, continue_final_message: bool) -> None:
    """vLLM's chat_template_kwargs and continue_final_message, validated: the kwargs are an object of JSON values
    whose keys are not the renderer's own arguments; continue_final_message (the last message is left open, the
    reply continues it) excludes add_generation_prompt. Raises ToolError naming the field."""
    if continue_final_message and add_generation_prompt:
        raise ToolError("continue_final_message and add_generation_prompt cannot both be true; set "
                        "add_generation_prompt to false", "continue_final_message")
    if template_kwargs is None:
        return
    if not isinstance(template_kwargs, dict) or not all(isinstance(k, str) for k in template_kwargs):
        raise ToolError("chat_template_kwargs must be an object", "chat_template_kwargs")
    for key, value in template_kwargs.items():
        if key in _RESERVED_KWARGS:
            raise ToolError(f"chat_template_kwargs cannot set {key!r}; it has its own request field",
                            f"chat_template_kwargs.{key}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ToolError("chat_template_kwargs values must be JSON values", f"chat_template_kwargs.{key}") from None


def render_chat(tokenizer, messages: list[dict[str, Any]], tools: ToolRequest | None = None,
                add_generation_prompt: bool = True, chat_template: str | None = None,
                continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text of OpenAI chat messages (role, content, tool_calls, tool_call_id) with the request's tools.

    Templates that read `tools` (Qwen2.5, Hermes, Llama 3.1 ...) get the tools and the messages as they are, the
    calls' arguments as objects. Others (SmolLM2's ChatML, the demo's) get the fallback: see fallback_messages.
    continue_final_message and template_kwargs (variables for the template) as check_chat_options validates them.
    Raises whatever the template raises on messages it does not accept."""
    template = chat_template or tokenizer.chat_template
    shown = tools.rendered_tools() if tools is not None else None
    opts = {**(template_kwargs or {}), "tokenize": False, "chat_template": template,
            "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message}
    if template_reads_tools(tokenizer, template):
        messages = [_with_argument_objects(m) for m in messages]
        return tokenizer.apply_chat_template(messages, tools=shown, **opts)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), **opts)


def template_reads_tools(tokenizer, template: str) -> bool:
    """Whether the chat template renders a `tools` argument: a probe rendered with and without tools differs.
    Cached per template text."""
    if template not in _reads_tools:
        def render(tools):
            return tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=tools, tokenize=False, chat_template=template)
        try:
            _reads_tools[template] = render(_PROBE_TOOLS) != render(None)
        except Exception:  # a template that fails on the probe is used without tools
            _reads_tools[template] = False
    return _reads_tools[template]


def fallback_messages(messages: list[dict[str, Any]], tools: ToolRequest | None) -> list[dict[str, str]]:
    """Messages any template can render (role and text content only): the tools block (tools_block) is appended
    to the first system message, or is a system message of its own; an assistant's tool calls become
    <tool_call> blocks after its content; each run of tool results becomes one user message of
    <tool_response> blocks."""
    out: list[dict[str, str]] = []
    after_tool = False  # the last message out holds tool results
    for m in messages:
        content = _text(m.get("content"))
        if m["role"] == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            after_tool = True
            continue
        calls = m.get("tool_calls") or []
        text = "\n".join([content] * bool(content) + [_call_text(c) for c in calls])
        out.append({"role": m["role"], "content": text})
        after_tool = False
    block = tools_block(tools)
    if block is None:
        return out
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def tools_block(tools: ToolRequest | None) -> str | None:
    """The system-prompt text describing the tools and the call format (None when no tools are shown)."""
    shown = tools.rendered_tools() if tools is not None else None
    if not shown:
        return None
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in shown)
    rule = ""
    if tools.mode == "named":
        rule = f"\nCall the function {tools.name} now."
    elif tools.mode == "required":
        rule = "\nCall at least one function now." if tools.parallel else "\nCall exactly one function now."
    elif not tools.parallel:
        rule = "\nCall at most one function."
    return _TOOLS_BLOCK.format(tools=lines, rule=rule)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """Message content as text: OpenAI's list of text parts joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": arguments_object(fn["arguments"])}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def _with_argument_objects(m: dict[str, Any]) -> dict[str, Any]:
    if not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c["function"], "arguments": arguments_object(c["function"]["arguments"])}}
             for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}
