"""A request body as the gateway reads it: parsed, checked and summarised before any concurrency slot or token
reservation is taken, so a malformed body is a 400 here and never an exception later.

Checked: valid JSON (finite numbers only), an object, nesting at most MAX_DEPTH deep, no lone surrogates (text
that cannot be UTF-8), and the fields the gateway itself interprets — with the same types, and the same lax
coercions, as `conveyor serve` — so that the gateway and the replica read a request the same way. The fields that
size the token reservation (max_tokens, n, best_of, beam_width) are checked against the replica's own bounds
(SamplingParams's), so that a request the replica will refuse is a 400 naming the field, never a 429 for a
reservation it could never need. Every other field is passed through untouched for the replica to judge. An
error's `param` is the field's path as the replica names it (`messages.0.content`).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from conveyor.openai_fields import as_openai_reads
from conveyor.sampling_params import SamplingParams

MAX_DEPTH = 32
COMPLETION_MAX_TOKENS = 16  # a completion's max_tokens when the field is left out (OpenAI, vLLM, conveyor serve)


class BodyError(Exception):
    """A body the gateway refuses: 400 with `message` (and `param` when one field is at fault)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _as_openai_reads(cls, data: Any) -> Any:  # as the replica reads it: null is the default, 4.0 is 4
        return as_openai_reads(cls.model_fields, data)


class _Part(_Loose):
    type: str | None = None
    text: str | None = None


class _Message(_Loose):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(_Loose):
    include_usage: bool = False


class _Fields(_Loose):
    """Only what the gateway reads (routing, rate limits, coalescing, affinity, usage)."""
    model: str
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    seed: int | None = None
    best_of: int | None = None
    use_beam_search: bool | None = None
    beam_width: int | None = None
    cache_salt: str | None = None


class _Completion(_Fields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None


class _Chat(_Fields):
    messages: list[_Message] | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass
class Parsed:
    """body: the JSON object as sent (forwarded, with the gateway's own changes); the rest is read from it."""
    body: dict[str, Any]
    model: str
    chat: bool
    stream: bool
    include_usage: bool
    coalescable: bool  # deterministic: temperature 0 or a seed
    max_tokens: int | None  # the client's limit (chat: max_completion_tokens, else max_tokens); None: not set
    replica_max_tokens: int | None  # the replica's own limit when max_tokens is None; None: up to max_model_len
    n: int  # sequences generated per prompt: n, or best_of / beam_width when larger
    num_prompts: int
    texts: list[str]  # the prompt strings (chat: "role:content" per message)
    id_lengths: list[int]  # the length of each prompt given as token ids
    messages: list[dict[str, str]] | None  # chat: role and text of each message, for the chat template
    tools: list[dict[str, Any]] | None  # chat: the tool definitions, rendered by the chat template too
    cache_salt: str | None
    # sha256 of the body without what never changes a response (see _digest): "the same request"; None when it
    # was not asked for (no Idempotency-Key) and the request is not coalescable (nothing keys on it)
    digest: str | None
    counts: dict[str | None, int] = field(default_factory=dict)  # prompt tokens by tokenizer, once counted

    @property
    def token_ids(self) -> int:
        """Prompt tokens given as ids."""
        return sum(self.id_lengths)

    @property
    def text(self) -> str:
        """The prompt as one string, for prefix affinity."""
        return "".join(self.texts) if self.chat else "\n".join(self.texts)


def parse_body(raw: bytes, chat: bool, digest: bool = True) -> Parsed:
    """Parse and check a completion or chat request body (CPU work: callers run it off the event loop); `digest`:
    whether to compute Parsed.digest even for a request that is not coalescable. Raises BodyError."""
    body = parse_object(raw)
    try:
        f = (_Chat if chat else _Completion).model_validate(body)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the deepest: the most specific of a union's
        # a union's members each fail somewhere: the field holding the union is the one at fault
        loc = list(itertools.takewhile(lambda x: not _is_union_tag(x), err["loc"]))
        where = ".".join(map(str, loc)) or None
        msg = "Input should be an object" if err["type"] == "model_type" else err["msg"]
        raise BodyError(f"{where}: {msg}", where) from None
    _check_sizes(f, chat)
    return _summarise(body, f, chat, digest)


def _check_sizes(f: _Fields, chat: bool) -> None:
    """What sizes the reservation, within the bounds the replica enforces (SamplingParams validates them there
    too, so the message is the replica's). Chat has no best_of: the replica refuses or ignores it, so it is not
    read. Raises BodyError naming the field as the replica does."""
    max_tokens = f.max_completion_tokens if chat and f.max_completion_tokens is not None else f.max_tokens
    n = 1 if f.n is None else f.n
    error = _size_error(n, max_tokens, None if chat else f.best_of, bool(f.use_beam_search),
                        n if f.beam_width is None else f.beam_width)
    if error is not None:
        raise BodyError(error, _size_param(error, chat and f.max_completion_tokens is not None))


@functools.lru_cache(maxsize=1024, typed=True)  # a few shapes repeat; a SamplingParams per request showed in profiles
def _size_error(n: int, max_tokens: int | None, best_of: int | None, use_beam_search: bool,
                beam_width: int) -> str | None:
    """SamplingParams' message for these sizes, or None when it accepts them."""
    try:
        SamplingParams(n=n, max_tokens=max_tokens, best_of=best_of, use_beam_search=use_beam_search,
                       beam_width=beam_width)
    except ValueError as e:
        return str(e)
    return None


def _size_param(message: str, completion_tokens: bool) -> str | None:
    """The request field a SamplingParams message about these fields names (its first word, as the replica reads
    it); chat's max_completion_tokens when the client sent that."""
    word = message.split(" ", 1)[0]
    if word == "max_tokens" and completion_tokens:
        return "max_completion_tokens"
    if word in ("n", "max_tokens", "best_of", "beam_width"):
        return word
    return "use_beam_search" if message.startswith("beam search") else None


def parse_object(raw: bytes) -> dict[str, Any]:
    """A body as JSON text: an object of finite numbers and valid strings, nested at most MAX_DEPTH deep, with a
    string `model`. Raises BodyError."""
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise BodyError(f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # includes bytes that are not UTF-8
        raise BodyError(f"the body is not valid JSON: {_short(e)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BodyError("the body must be a JSON object")
    _check_tree(body)
    if not isinstance(body.get("model"), str):
        raise BodyError("'model' is required (a string)", "model", "missing_model")
    return body


def _summarise(body: dict, f: _Fields, chat: bool, digest: bool) -> Parsed:
    texts: list[str] = []
    id_lengths: list[int] = []
    num_prompts, messages, tools = 1, None, None
    if chat:
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in f.messages or []]
        texts = [f"{m['role']}:{m['content']}\n" for m in messages]
        if f.tools:
            tools = f.tools
            texts.insert(0, "tools:" + json.dumps(tools, separators=(",", ":")) + "\n")
    else:
        p = f.prompt
        if isinstance(p, str):
            texts = [p]
        elif p and all(isinstance(x, int) for x in p):
            id_lengths = [len(p)]
        elif p:
            num_prompts = len(p)
            texts = [x for x in p if isinstance(x, str)]
            id_lengths = [len(x) for x in p if isinstance(x, list)]
    max_tokens = f.max_completion_tokens if chat and f.max_completion_tokens is not None else f.max_tokens
    # the replica's own default when the limit is left out: 16 for a completion (OpenAI's and vLLM's), while an
    # explicit null, and chat either way, mean up to max_model_len
    default = COMPLETION_MAX_TOKENS if not chat and "max_tokens" not in body else None
    n = f.n if f.n is not None else 1
    n = max(n, 0 if chat else f.best_of or 0, (f.beam_width or 0) if f.use_beam_search else 0)
    coalescable = f.temperature == 0 or f.seed is not None
    return Parsed(body=body, model=f.model, chat=chat, stream=f.stream,
                  include_usage=f.stream and f.stream_options is not None and f.stream_options.include_usage,
                  coalescable=coalescable, max_tokens=max_tokens,
                  replica_max_tokens=default, n=n, num_prompts=num_prompts, texts=texts, id_lengths=id_lengths,
                  messages=messages, tools=tools, cache_salt=f.cache_salt,
                  digest=_digest(body) if digest or coalescable else None)


def _digest(body: dict) -> str:
    """What identifies a request's response: every field but the model's name (aliases share), `stream` (callers
    key on it separately), `stream_options.include_usage` (the gateway asks for usage itself and hides it from
    clients that did not), `user` (a label) and `priority` (replaced by the tenant's)."""
    content = {k: v for k, v in body.items() if k not in ("user", "model", "stream", "stream_options", "priority")}
    so = body.get("stream_options")
    if isinstance(so, dict) and any(k != "include_usage" for k in so):
        content["stream_options"] = {k: v for k, v in so.items() if k != "include_usage"}
    elif so is not None and not isinstance(so, dict):
        content["stream_options"] = so
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _content_text(content: str | list[_Part] | None) -> str:
    if isinstance(content, list):
        return "".join(p.text or "" for p in content)
    return content or ""


def _check_tree(root: Any) -> None:
    """Depth at most MAX_DEPTH, and every string (keys too) encodable as UTF-8; a bad string's error names its path
    (a bad key: the path to the key). Iterative: no recursion limit."""
    stack: list[tuple[Any, int, str]] = [(root, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"the body is nested more than {MAX_DEPTH} levels deep")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and not _is_text(k):
                raise _surrogate(path or None)
            if isinstance(v, str) and not _is_text(v):
                raise _surrogate(where)
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1, where))


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(param: str | None) -> BodyError:
    where = f"{param}: " if param else ""
    return BodyError(f"{where}the body contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text", param,
                     "invalid_text")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number out of range: {s[:40]}")
    return v


def _reject_constant(s: str) -> float:
    raise ValueError(f"{s} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)  # one, not one per body


def _is_union_tag(x: Any) -> bool:
    """pydantic names union members in error locations (`str`, `list[int]`): not part of the field's path."""
    return isinstance(x, str) and (x in ("str", "int", "bool", "float", "none") or "[" in x or x.startswith("_"))


def _short(e: Exception) -> str:
    return str(e)[:200]
