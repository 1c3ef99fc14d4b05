"""A request's token reservation: its prompt plus what the replica will actually let it generate.

The replica's own limit when the client sets none: 16 tokens for a completion without `max_tokens` (OpenAI's and
vLLM's default), else up to `max_model_len` minus the prompt (chat without `max_completion_tokens`/`max_tokens`, or
a completion with `"max_tokens": null`). A model's `default_max_tokens`, when the operator sets one, caps that: the
cap is then forwarded as the request's limit, so the replica never generates more than was reserved.

A request whose prompt and limit cannot fit the replica's context is refused before any reservation (`check_fits`),
with the replica's 400 rather than a 429 for tokens it could never use.
"""
from __future__ import annotations

from dataclasses import dataclass

from conveyor.gateway.body import BodyError, Parsed


@dataclass(frozen=True)
class Budget:
    reserve: int  # tokens: prompt + every sequence's generation limit
    max_tokens: int | None  # the limit to forward (the operator's cap), or None: the request goes as sent


def budget(p: Parsed, prompt_tokens: int, max_model_len: int, cap: int | None) -> Budget:
    """The reservation of a request with `prompt_tokens` prompt tokens (all its prompts together) on replicas with
    a context of `max_model_len` tokens; `cap` is the model's default_max_tokens (None: no cap)."""
    assert prompt_tokens >= 0 and max_model_len > 0
    sequences = p.n * p.num_prompts
    if p.max_tokens is not None:  # at least 1 (parse_body checked it)
        return Budget(prompt_tokens + p.max_tokens * sequences, None)
    # every prompt may run to the end of the context; the shortest room is at most that of the whole text
    room = max(max_model_len - prompt_tokens, 1)
    limit = p.replica_max_tokens if p.replica_max_tokens is not None else room
    if cap is not None and cap < limit:
        return Budget(prompt_tokens + cap * sequences, cap)
    if p.replica_max_tokens is not None:
        return Budget(prompt_tokens + limit * sequences, None)
    return Budget(prompt_tokens + p.n * max(p.num_prompts * max_model_len - prompt_tokens, 0), None)


def least_limit(p: Parsed, cap: int | None) -> int:
    """The fewest tokens the replica will be asked to leave room for: the client's limit, else the replica's
    default (capped by the model's default_max_tokens `cap`), at least 1."""
    if p.max_tokens is not None:
        return p.max_tokens
    return min(p.replica_max_tokens or 1, cap or 1 << 63)


def check_fits(p: Parsed, prompt_floor: int, max_model_len: int, cap: int | None) -> None:
    """Refuse what the replica will surely refuse: a prompt of at least `prompt_floor` tokens (tokens.prompt_floor)
    plus the limit it will be given (the client's; else the replica's default capped by `cap`, at least 1) over
    `max_model_len`. Raises BodyError naming the prompt, as the replica does."""
    limit = least_limit(p, cap)
    if prompt_floor + limit > max_model_len:
        what = "max_completion_tokens" if p.chat and p.body.get("max_completion_tokens") is not None else "max_tokens"
        raise BodyError(f"the prompt (at least {prompt_floor} tokens) plus {what} ({limit}) exceeds the model's "
                        f"maximum length of {max_model_len} tokens", "messages" if p.chat else "prompt")
