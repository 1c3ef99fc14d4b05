"""A choice's text as OpenAI's chat message (content, tool_calls, finish_reason), whole or as streamed deltas."""
from __future__ import annotations

from typing import Any

from conveyor.tools.parser import finish_reason, make_parser, parse_message
from conveyor.tools.spec import ToolRequest


def chat_message(tools: ToolRequest | None, text: str, engine_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """(message, finish reason) of a finished choice: {"role": "assistant", "content": ..., "tool_calls": [...]}
    (tool_calls only when calls were made)."""
    content, calls = parse_message(tools, text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.as_dict() for c in calls]
    return message, finish_reason(engine_reason, bool(calls))


class ToolStream:
    """One streamed choice: turns each piece of new text into the fields of its delta.

    A call's first and only delta carries index, id, type and the function's name and whole arguments (OpenAI's
    chunk shape; the openai SDK's stream accumulation joins it as any other)."""

    def __init__(self, tools: ToolRequest | None) -> None:
        self._parser = make_parser(tools)

    def delta(self, new_text: str, engine_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(delta fields, finish reason) for new_text; engine_reason is set on the choice's last piece. Without a
        parser the delta is {"content": new_text}; with one, fields are left out while text is held back."""
        p = self._parser
        if p is None:
            return {"content": new_text}, engine_reason
        d = p.feed(new_text)
        if engine_reason is not None:
            rest = p.finish()
            d.content, d.calls = d.content + rest.content, d.calls + rest.calls
        fields: dict[str, Any] = {}
        if d.content:
            fields["content"] = d.content
        if d.calls:
            first = len(p.calls) - len(d.calls)
            fields["tool_calls"] = [c.as_dict(first + k) for k, c in enumerate(d.calls)]
        return fields, finish_reason(engine_reason, bool(p.calls))
