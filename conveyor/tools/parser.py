"""Tool calls out of a model's text: Hermes-style <tool_call> blocks (auto) and the JSON of a constrained choice
(required / named), whole or incrementally as a stream arrives."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from conveyor.tools.spec import ToolRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool_calls entry; with index, the form of a streamed delta."""
        d: dict[str, Any] = {"id": self.id, "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


@dataclass
class Delta:
    """What one piece of model text adds to a message: content text and completed tool calls."""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def new_call(name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


class HermesParser:
    """Incremental parser of `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

    Text outside blocks is content; text that may be the start of an opening tag is held back until it is
    decided. A block whose JSON is not a call of one of the request's functions stays in the content as written.
    Trailing whitespace of the content is held back too, and dropped where a call follows it or the text ends
    after calls (so a message of calls alone has null content); how the text is split never changes the result.
    Without parallel calls, blocks after the first call are dropped."""

    def __init__(self, names: set[str], parallel: bool) -> None:
        self._names, self._parallel = names, parallel
        self._held: list[str] = []  # text not yet handed out, in pieces: joined only when it may be decided
        self._tail = ""  # its last characters, where a closing tag may have begun
        self._in_call = False
        self._space = ""  # trailing whitespace of the content, held back
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Delta:
        out = Delta()
        if self._in_call and CLOSE not in self._tail + text:  # a long block arriving token by token: no rescans
            self._held.append(text)
            self._tail = (self._tail + text)[-len(CLOSE):]
            return out
        buf = "".join(self._held) + text
        while True:
            if self._in_call:
                end = buf.find(CLOSE)
                if end < 0:
                    break
                self._close(buf[:end], out, closed=True)
                buf, self._in_call = buf[end + len(CLOSE):], False
                continue
            start = buf.find(OPEN)
            if start < 0:
                cut = len(buf) - _open_prefix_len(buf)
                self._content(buf[:cut], out)
                buf = buf[cut:]
                break
            self._content(buf[:start], out)
            buf, self._in_call = buf[start + len(OPEN):], True
        self._held, self._tail = [buf], buf[-len(CLOSE):]
        return out

    def finish(self) -> Delta:
        """The rest once the text is complete: an unclosed last block still counts if its JSON is a call (models
        often end on the stop token instead of the closing tag)."""
        out = Delta()
        rest = "".join(self._held)
        if self._in_call:
            self._close(rest, out, closed=False)
        else:
            self._content(rest, out)
        if not self.calls:
            out.content += self._space
        self._held, self._tail, self._space, self._in_call = [], "", "", False
        return out

    def _content(self, text: str, out: Delta) -> None:
        body = text.rstrip()
        if body:
            out.content += self._space + body
            self._space = ""
        self._space += text[len(body):]

    def _close(self, body: str, out: Delta, closed: bool) -> None:
        call = self._call(body)
        if call is None:
            self._content(OPEN + body + (CLOSE if closed else ""), out)
            return
        self._space = ""
        if self._parallel or not self.calls:
            self.calls.append(call)
            out.calls.append(call)

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in self._names:
            return None
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        return new_call(value["name"], arguments) if isinstance(arguments, dict) else None


class ConstrainedParser:
    """The output of a required / named choice: JSON made under ToolRequest.structured_outputs(). The calls come
    when the text is complete; a text that does not parse (cut by max_tokens) is handed back as content."""

    def __init__(self, tools: ToolRequest) -> None:
        self._tools = tools
        self._text = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Delta:
        self._text += text
        return Delta()

    def finish(self) -> Delta:
        calls = self._parse()
        if calls is None:
            return Delta(content=self._text)
        self.calls = calls
        return Delta(calls=calls)

    def _parse(self) -> list[ToolCall] | None:
        try:
            value = json.loads(self._text)
        except ValueError:
            return None
        if self._tools.mode == "named":
            return [new_call(self._tools.name, value)] if isinstance(value, dict) else None
        items = value if isinstance(value, list) else [value]
        names = {f.name for f in self._tools.functions}
        if not items or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] in names
                                and isinstance(c.get("arguments"), dict) for c in items):
            return None
        return [new_call(c["name"], c["arguments"]) for c in items]


Parser = HermesParser | ConstrainedParser


def make_parser(tools: ToolRequest | None) -> Parser | None:
    """The parser of one choice's text; None when the text is plain content (no tools, or tool_choice "none")."""
    if tools is None or tools.mode == "none":
        return None
    if tools.constrained:
        return ConstrainedParser(tools)
    return HermesParser({f.name for f in tools.functions}, tools.parallel)


def parse_message(tools: ToolRequest | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished choice's text. Content is None when calls were made and no other text
    was written; without calls it is the text unchanged."""
    parser = make_parser(tools)
    if parser is None:
        return text, []
    first, rest = parser.feed(text), parser.finish()
    content = first.content + rest.content
    return (content or None) if parser.calls else content, parser.calls


def finish_reason(engine_reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if made_calls and engine_reason == "stop" else engine_reason


def _open_prefix_len(text: str) -> int:
    """Length of the longest end of text that is a proper prefix of the opening tag."""
    for n in range(min(len(text), len(OPEN) - 1), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
