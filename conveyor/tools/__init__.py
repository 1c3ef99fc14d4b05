"""Tool calling on chat completions (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).

Design:
- Validation (spec.py): tools are function tools with a name (OpenAI's rule: 1-64 of [A-Za-z0-9_-]), unique, at
  most 128, parameters an object schema (absent: no arguments); tool_choice "none" | "auto" (the default) |
  "required" | {"type": "function", "function": {"name"}} naming one of them; tool_choice without tools, tool
  messages without tool_call_id and malformed assistant tool_calls are refused. Errors are ToolError (a
  ValueError) carrying the request field's path, for the HTTP 400's `param`.
- Rendering (template.py): `tools=[...]` goes to the model's chat template when the template renders it (probed
  once per template: a conversation rendered with and without a tool differs). Otherwise (SmolLM2's ChatML and
  the demo template ignore tools) a text block listing each function's JSON and the call format
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes style, which Qwen2.5 and Hermes models are
  trained on) is merged into the first system message; earlier assistant calls are written as such blocks and
  tool results as `<tool_response>` blocks in a user turn, so any template can render them. Under
  tool_choice "none" the tools are not shown at all: the answer must be plain content, and a prompt inviting
  calls would only make the model write call markup into it.
- auto (parser.py, HermesParser): the output is parsed for `<tool_call>` blocks holding JSON of a call to one of
  the request's functions; text outside them is content (null when only whitespace remains); a block that is not
  such a call stays in the content as written. Streaming holds back text that may be the start of `<tool_call>`
  and hands each call out whole when its block closes (or at the end: an unclosed last block still counts).
- required / named: the output is constrained by a JSON schema (ToolRequest.structured_outputs, applied by the
  engine's grammar mask): named gives the function's arguments object; required gives {"name": const,
  "arguments": schema} with anyOf over the tools, an array of at least one when parallel calls are allowed. So
  the arguments always validate against the function's schema unless max_tokens cuts the output (then the text
  comes back as content with finish_reason "length"). The calls are handed out when the output is complete.
- Calls get ids `call_<24 hex>`; the finish reason is "tool_calls" when the model stopped after making calls.
"""
from conveyor.tools.parser import Delta, ToolCall, finish_reason, make_parser, parse_message
from conveyor.tools.response import ToolStream, chat_message
from conveyor.tools.spec import ToolError, ToolRequest, check_tool_messages
from conveyor.tools.template import check_chat_options, render_chat

__all__ = ["Delta", "ToolCall", "ToolError", "ToolRequest", "ToolStream", "chat_message", "check_chat_options",
           "check_tool_messages",
           "finish_reason", "make_parser", "parse_message", "render_chat"]
