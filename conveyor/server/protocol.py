"""OpenAI request schemas (with vLLM's extensions) and their mapping onto SamplingParams."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0
    skip_special_tokens: bool = True
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt
    use_beam_search: bool = False
    beam_width: int | None = None  # default: n
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError for out-of-range values."""
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            priority=self.priority, use_beam_search=self.use_beam_search,
            beam_width=self.beam_width if self.beam_width is not None else self.n,
            length_penalty=self.length_penalty, early_stopping=self.early_stopping)


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

    def prompts(self) -> list[Any]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # an empty prompt list is rejected downstream as an empty prompt (400)
        if p and all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def chat_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            return None
        return self.top_logprobs or 0
