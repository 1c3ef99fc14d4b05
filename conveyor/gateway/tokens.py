"""Prompt token counts for rate limiting and routing: the model's tokenizer when configured (`tokenizer: demo` or
a tokenizer directory), else an estimate of one token per 4 characters."""
from __future__ import annotations

import functools
import math
from typing import Any


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str | None):
    if spec is None:
        return None
    if spec == "demo":
        from conveyor.model.demo import demo_tokenizer

        return demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt as one string (chat: the message contents), for estimates and prefix affinity."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}:{c or ''}\n" if isinstance(m, dict) else "")
        return "".join(parts)
    p = body.get("prompt", "")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return "\n".join(p)
    return ""


def count_prompt_tokens(body: dict[str, Any], tokenizer) -> int:
    """Prompt tokens of the whole request (every prompt of a batched completion; chat through its template)."""
    if "messages" in body:
        msgs = body.get("messages") or []
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            try:
                conv = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in msgs]
                text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                return len(tokenizer.encode(text, add_special_tokens=False))  # the template has its specials
            except Exception:  # noqa: BLE001 - malformed messages: the replica will say why; estimate here
                pass
        return _count(prompt_text(body), tokenizer)
    p = body.get("prompt", "")
    if isinstance(p, str):
        return _count(p, tokenizer)
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return len(p)
    if isinstance(p, list):
        return sum(len(x) if isinstance(x, list) else _count(str(x), tokenizer) for x in p)
    return 0


def num_prompts(body: dict[str, Any]) -> int:
    p = body.get("prompt")
    if isinstance(p, list) and p and not all(isinstance(x, int) for x in p):
        return len(p)
    return 1


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _count(text: str, tokenizer) -> int:
    if tokenizer is None:
        return math.ceil(len(text) / 4)
    return len(tokenizer.encode(text, add_special_tokens=False))
