"""What the engine hands back for a request, in vLLM's shape."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[dict[int, float]] | None = None
    num_new_tokens: int = 0  # tokens added since the previous output of this request
    new_text: str = ""  # text added since the previous output (for streaming)
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs (raw distribution)
    # the first num_emitted_tokens of token_ids have their text entirely within the text handed out so far (the
    # new_text of this and earlier outputs): a stream sends a token's logprobs in the chunk that carries its text.
    # Text held back (a stop string may be forming, an incomplete UTF-8 character) holds its tokens back too; all
    # tokens once finished (also those of a stop string cut from the text)
    num_emitted_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    # per prompt token: {token: logprob, top-N...}; None for the first token (nothing precedes it)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # tokens generated so far over all the request's sequences: with best_of, also the candidates not returned
    # (usage.completion_tokens bills them all, as OpenAI does; vllm:generation_tokens counts them)
    num_generated_tokens: int = 0
    error: str | None = None  # the engine failed this request inside a step and ended it (finish reason "error")
