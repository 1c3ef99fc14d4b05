"""Prompt token counts for rate limiting and routing: the model's tokenizer when configured (`tokenizer: demo` or
a tokenizer directory), else an estimate of one token per 4 characters.

Counting is CPU work (seconds for megabytes of text), so the gateway runs it in a small thread pool, never on its
event loop, and tokenizes at most `max_chars` characters of a request: beyond that the count is extrapolated at the
ratio measured on what was tokenized.
"""
from __future__ import annotations

import functools
import math

from conveyor.gateway.body import Parsed


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str | None):
    if spec is None:
        return None
    if spec == "demo":
        from conveyor.model.demo import demo_tokenizer

        return demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def count_prompt_tokens(p: Parsed, tokenizer, max_chars: int) -> int:
    """Prompt tokens of the whole request (every prompt of a batched completion; chat through its template when
    the text is short enough to template whole). Never raises: a tokenizer failure falls back to chars / 4."""
    try:
        if p.chat and tokenizer is not None and getattr(tokenizer, "chat_template", None) \
                and sum(map(len, p.texts)) <= max_chars:
            text = tokenizer.apply_chat_template(p.messages, tools=p.tools, tokenize=False,
                                                 add_generation_prompt=True)
            return len(tokenizer.encode(text, add_special_tokens=False))  # the template has its specials
        return p.token_ids + _count("".join(p.texts), tokenizer, max_chars)
    except Exception:  # noqa: BLE001 - e.g. a template that rejects these roles: the replica will say why
        return p.token_ids + math.ceil(sum(len(t) for t in p.texts) / 4)


def _count(text: str, tokenizer, max_chars: int) -> int:
    if tokenizer is None or not text:
        return math.ceil(len(text) / 4)
    head = text[:max_chars]
    n = len(tokenizer.encode(head, add_special_tokens=False))
    if len(text) > len(head):  # extrapolate the rest at the ratio measured on the head
        n += math.ceil((len(text) - len(head)) * n / len(head))
    return n


def prompt_floor(p: Parsed, tokenizer, max_chars: int, counted: int | None = None) -> int:
    """Tokens the replica will count at least in the request's shortest prompt: a prompt of ids exactly; a text
    prompt through the model's tokenizer without special tokens (the replica's count adds them, never removes) when
    one is configured and the text is at most `max_chars`; else 0, as for chat, whose template the replica may
    render differently. `counted`: count_prompt_tokens's result with this tokenizer, which is that count already
    for a single text prompt (not tokenized twice; had the tokenizer failed there, the replica's fails too). Never
    raises: a tokenizer failure counts 0."""
    if p.chat:
        return 0
    if counted is not None and len(p.texts) == 1 and not p.id_lengths and tokenizer is not None \
            and len(p.texts[0]) <= max_chars:
        return counted
    counts = list(p.id_lengths)
    for text in p.texts:
        if tokenizer is None or len(text) > max_chars:
            return 0
        try:
            counts.append(len(tokenizer.encode(text, add_special_tokens=False)))
        except Exception:  # noqa: BLE001 - no lower bound known
            return 0
    return min(counts, default=0)
