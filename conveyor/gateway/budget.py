"""A request's token reservation: its prompt plus what the replica will actually let it generate.

The replica's own limit when the client sets none: 16 tokens for a completion without `max_tokens` (OpenAI's and
vLLM's default), else up to `max_model_len` minus the prompt (chat without `max_completion_tokens`/`max_tokens`, or
a completion with `"max_tokens": null`). A model's `default_max_tokens`, when the operator sets one, caps that: the
cap is then forwarded as the request's limit, so the replica never generates more than was reserved.
"""
from __future__ import annotations

from dataclasses import dataclass

from conveyor.gateway.body import Parsed


@dataclass(frozen=True)
class Budget:
    reserve: int  # tokens: prompt + every sequence's generation limit
    max_tokens: int | None  # the limit to forward (the operator's cap), or None: the request goes as sent


def budget(p: Parsed, prompt_tokens: int, max_model_len: int, cap: int | None) -> Budget:
    """The reservation of a request with `prompt_tokens` prompt tokens (all its prompts together) on replicas with
    a context of `max_model_len` tokens; `cap` is the model's default_max_tokens (None: no cap)."""
    assert prompt_tokens >= 0 and max_model_len > 0
    sequences = p.n * p.num_prompts
    if p.max_tokens is not None:  # a negative limit is the replica's to refuse; it generates nothing
        return Budget(prompt_tokens + max(p.max_tokens, 0) * sequences, None)
    # every prompt may run to the end of the context; the shortest room is at most that of the whole text
    room = max(max_model_len - prompt_tokens, 1)
    limit = p.replica_max_tokens if p.replica_max_tokens is not None else room
    if cap is not None and cap < limit:
        return Budget(prompt_tokens + cap * sequences, cap)
    if p.replica_max_tokens is not None:
        return Budget(prompt_tokens + limit * sequences, None)
    return Budget(prompt_tokens + p.n * max(p.num_prompts * max_model_len - prompt_tokens, 0), None)
