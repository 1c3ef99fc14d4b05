"""Model routing: a name or alias picks a pool; `model: "auto"` picks the small or the large model.

The `auto` rule, in order: an `X-Conveyor-Route: small|large` header decides; else the small model when the prompt
has at most `max_prompt_tokens_small` tokens (and max_tokens is at most `max_tokens_small`, when set); else the large
model. An `interactive` tenant with `allow_degrade: true` whose request went to the large model is sent to the small
one instead while the large model is overloaded (its queue at least `degrade_queue_ratio` full) and the small is not.
"""
from __future__ import annotations

from collections.abc import Callable

from conveyor.gateway.config import GatewayConfig, ModelConfig, TenantConfig


def auto_route(cfg: GatewayConfig, prompt_tokens: int, max_tokens: int | None, hint: str | None,
               tenant: TenantConfig, overloaded: Callable[[str], bool]) -> tuple[ModelConfig, str]:
    """Returns the model and why it was chosen (for logs)."""
    rule = cfg.auto_route
    assert rule is not None
    hint = (hint or "").strip().lower()
    if hint in ("small", "large"):
        side, why = hint, "hint"
    elif prompt_tokens <= rule.max_prompt_tokens_small and (
            rule.max_tokens_small is None or (max_tokens is not None and max_tokens <= rule.max_tokens_small)):
        side, why = "small", "short"
    else:
        side, why = "large", "long"
    if (side == "large" and tenant.cls == "interactive" and tenant.allow_degrade and overloaded(rule.large)
            and not overloaded(rule.small)):
        side, why = "small", "degraded"
    model = cfg.model(rule.small if side == "small" else rule.large)
    assert model is not None
    return model, why
