"""A request's tools and tool choice, validated: what the prompt offers and how the output is constrained."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.sampling_params import StructuredOutputsParams

MAX_TOOLS = 128  # OpenAI's limit on tools per request
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

Mode = Literal["none", "auto", "required", "named"]


class ToolError(ValueError):
    """A bad tools, tool_choice or tool message field; `param` is the request field's path (OpenAI's `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of the arguments object

    def as_tool(self) -> dict[str, Any]:
        """The OpenAI tool dict, as chat templates expect it."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": {**fn, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolRequest:
    """tools + tool_choice + parallel_tool_calls of one chat request.

    mode: "none" (plain content, tools not shown), "auto" (the model decides; calls parsed from its text),
    "required" (at least one call, constrained), "named" (a call to `name`, constrained)."""
    functions: tuple[Function, ...]
    mode: Mode
    name: str | None = None
    parallel: bool = True

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolRequest | None:
        """None when the request has no tools and no tool_choice. Raises ToolError naming the field."""
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
        if tools is None:
            if tool_choice not in (None, "none"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            return None
        functions = parse_tools(tools)
        mode, name = parse_tool_choice(tool_choice, {f.name for f in functions})
        return cls(functions, mode, name, parallel_tool_calls is not False)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def rendered_tools(self) -> list[dict[str, Any]] | None:
        """The tools shown to the model: none under tool_choice "none", since the answer must be plain content
        and a prompt that invites calls would only make the model write call markup into it."""
        return None if self.mode == "none" else [f.as_tool() for f in self.functions]

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The JSON-schema constraint for required / named choices (None otherwise).

        named: the output is the function's arguments object. required: {"name": const, "arguments": schema}
        with anyOf over the tools, or (parallel) a non-empty array of those."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.function(self.name).parameters)
        if self.mode != "required":
            return None
        defs = {f.name: _rebased(f.parameters, f"#/$defs/{f.name}") for f in self.functions
                if _has_local_ref(f.parameters)}
        calls = [{"type": "object",
                  "properties": {"name": {"const": f.name},
                                 "arguments": {"$ref": f"#/$defs/{f.name}"} if f.name in defs else f.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "items": one, "minItems": 1} if self.parallel else dict(one)
        if defs:  # a function's own "$ref"s (to its "$defs", or "#") now resolve under "#/$defs/<name>"
            schema["$defs"] = defs
        return StructuredOutputsParams(json=schema)

    def function(self, name: str) -> Function:
        return next(f for f in self.functions if f.name == name)


def _has_local_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        return any(k == "$ref" and isinstance(v, str) and v.startswith("#") or _has_local_ref(v)
                   for k, v in schema.items())
    return isinstance(schema, list) and any(_has_local_ref(v) for v in schema)


def _rebased(schema: Any, base: str) -> Any:
    """schema with each local "$ref" ("#", "#/$defs/X", any "#/pointer") made to point into `base`, where the
    schema is placed in a larger document."""
    if isinstance(schema, dict):
        return {k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, base)
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    return schema


_TOOL_KEYS = ("type", "function")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


def unknown_tool_fields(tools: Any) -> list[str]:
    """Paths ("tools.0.function.bogus") of the keys in `tools` and their function objects that OpenAI's tool
    schema does not define; what is not an object is parse_tools' to refuse."""
    found: list[str] = []
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(tool, dict):
            continue
        found += [f"tools.{i}.{k}" for k in tool if k not in _TOOL_KEYS]
        fn = tool.get("function")
        if isinstance(fn, dict):
            found += [f"tools.{i}.function.{k}" for k in fn if k not in _FUNCTION_KEYS]
    return found


def parse_tools(tools: Any) -> tuple[Function, ...]:
    """Validate OpenAI `tools` (a list of {"type": "function", "function": {name, description?, parameters?,
    strict?}}). Raises ToolError for a non-list, more than MAX_TOOLS, another type, a missing or invalid or
    duplicate name, a non-string description, or parameters that are not an object schema."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list of tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        f = _parse_tool(tool, f"tools.{i}")
        if any(g.name == f.name for g in functions):
            raise ToolError(f"two tools are named {f.name!r}", f"tools.{i}.function.name")
        functions.append(f)
    return tuple(functions)


def _parse_tool(tool: Any, param: str) -> Function:
    if not isinstance(tool, dict):
        raise ToolError("a tool must be an object", param)
    if tool.get("type") != "function":
        raise ToolError(f"only tools of type 'function' are supported, got {str(tool.get('type'))[:50]!r}",
                        f"{param}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolError("a function tool needs a 'function' object", f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError("a function needs a name of 1 to 64 letters, digits, '_' or '-'", f"{param}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError("a function's description must be a string", f"{param}.function.description")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = _EMPTY_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolError("a function's parameters must be a JSON schema of an object", f"{param}.function.parameters")
    if "type" not in parameters:  # arguments are always an object, also under a schema that leaves the type open
        parameters = {"type": "object", **parameters}
    if fn.get("strict") not in (None, True, False):
        raise ToolError("strict must be true or false", f"{param}.function.strict")
    return Function(name, description, parameters)


def parse_tool_choice(choice: Any, names: set[str]) -> tuple[Mode, str | None]:
    """(mode, function name) of OpenAI `tool_choice`: "none" | "auto" | "required" |
    {"type": "function", "function": {"name": ...}}; absent means "auto". Raises ToolError."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice")
        return choice, None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise ToolError("a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    name = choice["function"].get("name")
    if name is None:
        raise ToolError("a named tool_choice needs function.name", "tool_choice.function.name")
    if not isinstance(name, str) or name not in names:
        raise ToolError(f"tool_choice names the function {str(name)[:64]!r}, which is not among the tools",
                        "tool_choice")
    return "named", name


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Validate the tool parts of OpenAI chat messages (role, content, tool_calls, tool_call_id): a tool message
    needs a tool_call_id; an assistant's tool_calls are {"id", "type": "function", "function": {"name",
    "arguments"}} with arguments a JSON text (or an object). Raises ToolError naming messages.N.field."""
    for i, m in enumerate(messages):
        if m["role"] == "tool" and not (isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]):
            raise ToolError("a message with role 'tool' needs a tool_call_id", f"messages.{i}.tool_call_id")
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m["role"] != "assistant":
            raise ToolError("only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
        if not isinstance(calls, list):
            raise ToolError("tool_calls must be a list", f"messages.{i}.tool_calls")
        for j, call in enumerate(calls):
            _check_call(call, f"messages.{i}.tool_calls.{j}")


def _check_call(call: Any, param: str) -> None:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise ToolError("a tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                        param)
    if not isinstance(call.get("id"), str):
        raise ToolError("a tool call needs an id", f"{param}.id")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError("a tool call needs a function name", f"{param}.function.name")
    if not isinstance(fn.get("arguments"), (str, dict)):
        raise ToolError("a tool call's arguments must be a JSON text", f"{param}.function.arguments")


def arguments_object(arguments: str | dict) -> dict[str, Any] | str:
    """A call's arguments as an object when they are JSON of one (what chat templates expect), else as given."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments
