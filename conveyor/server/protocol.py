"""OpenAI request schemas (with vLLM's extensions) and their mapping onto SamplingParams.

Strictness: every schema, nested ones too, keeps unknown fields (`extra="allow"`) so that the server can refuse them
by their full path (`unknown_fields`: "response_format.json_schema.bogus", "tools.0.function.bogus"), or ignore them
under `--lenient-request-fields`. Types are strict, as OpenAI's are: an integer field refuses "5" and true, a boolean
refuses "yes", a float field takes an integer; as OpenAI and vLLM do, an integer field takes a whole float (4.0) and
`null` for a field that is not nullable here means its default (clients send `"n": null`). Fields OpenAI defines that the server cannot
honour are declared and refused when set (`unsupported`). Harmless fields are accepted and have no effect: `user`,
`metadata` and `safety_identifier` (labels for the caller's records), `prompt_cache_key` (a cache-routing hint; the
prefix cache needs none), `store` when false (nothing is ever stored), `service_tier` "auto" or "default" (there is
one tier). Every error is a RequestError naming the request field (`param`).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conveyor.openai_fields import as_openai_reads
from conveyor.sampling_params import SamplingParams, StructuredOutputsParams
from conveyor.tools import ToolError, ToolRequest, check_chat_options
from conveyor.tools.spec import unknown_tool_fields

_INT64 = 1 << 63
Int64 = Annotated[int, Field(ge=-_INT64, lt=_INT64)]  # seeds: the signed 64-bit range, as OpenAI and vLLM take
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,19}")


class RequestError(ValueError):
    """A request the server cannot serve as asked; `param` is the request field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    """A request schema: strict types, unknown fields kept to be named by `unknown_fields`."""
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _as_openai_reads(cls, data: Any) -> Any:
        return as_openai_reads(cls.model_fields, data)


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Paths of the fields sent in `model` and the models nested in it that their schemas do not define, in the
    order sent ("messages.0.foo")."""
    found = [prefix + k for k in model.model_extra or {}]
    for name, info in type(model).model_fields.items():
        value, key = getattr(model, name), f"{prefix}{info.alias or name}"
        if isinstance(value, BaseModel):
            found += unknown_fields(value, key + ".")
        elif isinstance(value, list):
            found += [u for i, v in enumerate(value) if isinstance(v, BaseModel)
                      for u in unknown_fields(v, f"{key}.{i}.")]
    return found


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: running usage in every chunk


class JSONSchemaFormat(_Strict):
    """response_format.json_schema, as OpenAI defines it."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def check(self) -> None:
        """Raises RequestError for a json_schema given with another type (it would be dropped silently)."""
        if self.json_schema is not None and self.type != "json_schema":
            raise RequestError(f"response_format of type {self.type} takes no json_schema; use type json_schema",
                               "response_format.json_schema")


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` object (exactly one kind; options we do not have are refused by name)."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Common(_Strict):

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted, no effect (see the module docstring)
    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt
    use_beam_search: bool = False
    beam_width: int | None = None  # default: n
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unknown_fields(self) -> list[str]:
        """Fields the schemas do not define, with their paths, top-level ones first."""
        return unknown_fields(self)

    def unsupported(self) -> RequestError | None:
        """The first known field set to something this server cannot do, else None."""
        if self.store:
            return RequestError("store=true is not supported: this server stores nothing", "store")
        if self.service_tier not in (None, "auto", "default"):
            return RequestError(f"service_tier {self.service_tier[:50]!r} is not supported; "
                                "use 'auto' or 'default'", "service_tier")
        if self.stream_options is not None and not self.stream:
            return RequestError("stream_options is only allowed when stream is true", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            return RequestError("prompt_logprobs is not available with stream=true", "prompt_logprobs")
        return None

    def structured_output(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint of the request, from response_format, structured_outputs or a
        guided_* field; raises RequestError for several at once or an invalid one."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            rf.check()
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise RequestError("response_format of type json_schema needs json_schema.schema",
                                   "response_format")
            given.append(("response_format", {"json": rf.json_schema.json_schema}))
        if self.structured_outputs is not None:
            so = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            so = {k: v for k, v in so.items() if k not in (self.structured_outputs.model_extra or {})}
            if so.get("json_object") is False:
                del so["json_object"]
            given.append(("structured_outputs", so))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {kind: getattr(self, name)}))
        if not given:
            return None
        if len(given) > 1:
            raise RequestError(f"only one structured output constraint may be given; got {given[0][0]} and "
                               f"{given[1][0]}", given[1][0])
        param, kwargs = given[0]
        try:
            return StructuredOutputsParams(**kwargs)
        except ValueError as e:
            raise RequestError(f"{param}: {e}", param) from None

    def token_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with its JSON keys ("123") as token ids; raises RequestError for a key that is not one."""
        if self.logit_bias is None:
            return None
        for k in self.logit_bias:
            if not _TOKEN_ID_KEY.fullmatch(k):
                raise RequestError(f"logit_bias keys must be token ids (decimal integers), got {k[:50]!r}",
                                   "logit_bias")
        return {int(k): v for k, v in self.logit_bias.items()}

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        best_of: int | None = None) -> SamplingParams:
        """The request as SamplingParams; raises RequestError naming the field of an invalid value."""
        structured = self.structured_output()
        bias = self.token_logit_bias()
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                priority=self.priority, use_beam_search=self.use_beam_search,
                beam_width=self.beam_width if self.beam_width is not None else self.n,
                length_penalty=self.length_penalty, early_stopping=self.early_stopping, best_of=best_of,
                logit_bias=bias, prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output, structured_outputs=structured)
        except ValueError as e:
            raise RequestError(str(e), self.param_of(str(e))) from None

    def param_of(self, message: str) -> str | None:
        """The request field a SamplingParams or engine validation message is about (they start with the
        SamplingParams field's name, or say which it is), translated to this endpoint's name for it."""
        field = _message_field(message)
        if field == "structured_outputs":
            return self._constraint_param()
        return self._request_field(field) if field else None

    def _request_field(self, field: str) -> str:
        return field

    def _constraint_param(self) -> str:
        names = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar")
        return next((n for n in names if getattr(self, n) is not None), "structured_outputs")


_PARAM_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                 "logprobs", "skip_special_tokens", "priority", "use_beam_search", "beam_width", "length_penalty",
                 "early_stopping", "best_of", "logit_bias", "prompt_logprobs", "include_stop_str_in_output",
                 "structured_outputs"}
_MESSAGE_FIELDS = [("at most 16 stop strings", "stop"), ("a stop string", "stop"),
                   ("beam search does not take", "use_beam_search"), ("beam search with", "beam_width"),
                   ("the structured output constraint", "structured_outputs"),
                   ("structured outputs need", "structured_outputs"), ("the schema", "structured_outputs"),
                   ("samples or beams exceed", "n")]


def _message_field(message: str) -> str | None:
    """The SamplingParams field a validation message names: its first word, or a phrase it contains."""
    first = re.match(r"[a-z_]+", message)
    if first and first.group() in _PARAM_FIELDS:
        return first.group()
    low = message.lower()
    return next((f for phrase, f in _MESSAGE_FIELDS if phrase in low), None)


def find_invalid_text(obj: Any) -> str | None:
    """The path ("messages.0.content") of the first string in a parsed body, dict keys included, that is not valid
    UTF-8 text (JSON's \\ud800 escapes decode to lone surrogates); None when every string is valid."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:  # iterative: bodies may nest deeply
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            stack += [(path, k) for k in v]
            stack += [(f"{path}.{k}" if path else str(k), x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v)]
    return None


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[Any]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # an empty prompt list is rejected downstream as an empty prompt (400)
        if p and all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]

    def unsupported(self) -> RequestError | None:
        if self.suffix:
            return RequestError("suffix is not supported: the model has no fill-in-the-middle", "suffix")
        if self.best_of is not None and self.best_of > self.n and self.stream:  # best_of == n is n (LangChain sends 1)
            return RequestError("best_of > n cannot be used with stream=true", "best_of")
        return super().unsupported()

    def to_sampling_params(self) -> SamplingParams:
        """With echo and logprobs, the prompt's logprobs are computed too (the response starts with them)."""
        prompt_lps = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_lps = max(prompt_lps or 0, self.logprobs)
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_lps, self.best_of)

    def _request_field(self, field: str) -> str:
        if field == "prompt_logprobs" and self.prompt_logprobs is None:
            return "logprobs"  # asked for through echo + logprobs
        return field


class ContentPart(_Strict):
    """One part of a message's content; OpenAI's other part kinds are declared so that they are refused as
    unsupported, not as unknown fields."""
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers
    name: str | None = None
    # what the openai SDK's message.model_dump() carries back into the next turn: accepted when empty
    refusal: str | None = None
    audio: Any = None
    function_call: Any = None
    annotations: list[Any] | None = None

    def unsupported(self) -> str | None:
        """The first field of this message the server cannot honour, else None."""
        for name in ("audio", "function_call"):
            if getattr(self, name) is not None:
                return name
        return None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type == "refusal" and self.role == "assistant" and isinstance(part.refusal, str):
                parts.append(part.refusal)  # an earlier refusal is what the assistant said
            elif part.type != "text" or part.text is None:
                raise ValueError("only text content parts are supported")
            else:
                parts.append(part.text)
        return "".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates and conveyor.tools read it (content as text)."""
        text = self.text() or (self.refusal if self.content is None and self.refusal else "")
        m: dict[str, Any] = {"role": self.role, "content": text}
        if self.tool_calls is not None:
            m["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as dicts (ChatMessage.as_dict); raises RequestError naming the message at fault: content is
    required except on an assistant message, and must be text."""
    out = []
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":
            raise RequestError(f"a message with role {m.role!r} needs content", f"messages.{i}.content")
        bad = m.unsupported()
        if bad is not None:
            raise RequestError(f"messages.{i}.{bad} is not supported by this server", f"messages.{i}.{bad}")
        try:
            out.append(m.as_dict())
        except ValueError as e:
            raise RequestError(str(e), f"messages.{i}.content") from None
    return out


class _ChatOptions(_Strict):
    """vLLM's chat rendering options, shared by chat completions and /tokenize."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check_chat_options(self) -> None:
        """Raises RequestError (conveyor.tools.check_chat_options)."""
        try:
            check_chat_options(self.chat_template_kwargs, self.add_generation_prompt, self.continue_final_message)
        except ToolError as e:
            raise RequestError(str(e), e.param) from None


class ChatCompletionRequest(_ChatOptions, _Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # tool calling: declared here, handled in the chat path (conveyor/server/tools.py)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # OpenAI's, not available here: refused when set
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def unknown_fields(self) -> list[str]:
        return super().unknown_fields() + unknown_tool_fields(self.tools)

    def chat_logprobs(self) -> int | None:
        """Top-N logprobs per generated token, None when off; raises RequestError."""
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def unsupported(self) -> RequestError | None:
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                return RequestError(f"{name} is not supported by this server", name)
        if self.modalities is not None and self.modalities != ["text"]:
            return RequestError("only the text modality is supported", "modalities")
        for name in ("functions", "function_call"):  # OpenAI's deprecated form of tools / tool_choice
            if getattr(self, name) is not None:
                return RequestError(f"{name} is deprecated and not supported; use tools and tool_choice", name)
        return super().unsupported()

    def tool_request(self) -> ToolRequest | None:
        """tools, tool_choice and parallel_tool_calls validated (conveyor.tools); raises RequestError."""
        try:
            return ToolRequest.from_request(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ToolError as e:
            raise RequestError(str(e), e.param) from None

    def structured_output(self) -> StructuredOutputsParams | None:
        """A required or named tool_choice constrains the output to its calls' JSON, alone."""
        own = super().structured_output()
        tools = self.tool_request()
        if tools is None or not tools.constrained:
            return own
        if own is not None:
            raise RequestError("tool_choice 'required' or a named function cannot be combined with another "
                               "structured output constraint", "tool_choice")
        return tools.structured_outputs()

    def _constraint_param(self) -> str:
        if self.tools and self.tool_choice not in (None, "none", "auto"):
            return "tools"  # a function's parameters schema the grammar engine refused (the server names which)
        return super()._constraint_param()

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_new_tokens(), self.chat_logprobs(), self.prompt_logprobs)

    def _request_field(self, field: str) -> str:
        if field == "logprobs":
            return "top_logprobs"
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return field


class TokenizeRequest(_ChatOptions):
    """vLLM's /tokenize: a prompt, or messages (with tools) rendered with the chat template. add_special_tokens
    defaults to true for a prompt and false for messages (the template writes them)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    def unknown_fields(self) -> list[str]:
        return unknown_fields(self) + unknown_tool_fields(self.tools)

    def special_tokens(self) -> bool:
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None

    def chat_messages(self) -> list[dict[str, Any]]:
        """Raises RequestError."""
        if self.prompt is not None:
            raise RequestError("give either prompt or messages, not both", "messages")
        self.check_chat_options()
        return chat_dicts(self.messages or [])

    def tool_request(self) -> ToolRequest | None:
        """The tools to render with the messages; raises RequestError."""
        if self.tools is not None and self.messages is None:
            raise RequestError("tools are rendered with messages; give messages", "tools")
        try:
            return ToolRequest.from_request(self.tools, None, None)
        except ToolError as e:
            raise RequestError(str(e), e.param) from None


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize: token ids -> text."""

    model: str | None = None
    tokens: list[int]

    def unknown_fields(self) -> list[str]:
        return unknown_fields(self)
