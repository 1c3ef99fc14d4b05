"""Per-request sampling settings, named as in vLLM and the OpenAI API."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    skip_special_tokens: bool = True
    priority: int = 0
    # beam search (transformers' semantics): the best n of beam_width beams, scored with length_penalty
    use_beam_search: bool = False
    beam_width: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never"
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "seed", "priority"):
            check(not isinstance(getattr(self, name), bool), f"{name} must be an integer, not a boolean")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}")

        check(isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be an integer in [1, 128], got {self.n!r}")
        check(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 10.0, f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= _MAX_LOGPROBS),
              f"logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        check(all(isinstance(s, str) and s for s in self.stop_list), "stop must be non-empty strings")
        check(len(self.stop_list) <= 16, "at most 16 stop strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative ints")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        check(isinstance(self.priority, int), f"priority must be an integer, got {self.priority!r}")
        if self.use_beam_search:
            check(isinstance(self.beam_width, int) and 1 <= self.beam_width <= 64,
                  f"beam_width must be an integer in [1, 64], got {self.beam_width!r}")
            check(self.n <= self.beam_width, f"n ({self.n}) must not exceed beam_width ({self.beam_width})")
            check(self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'")
            check(isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty),
                  "length_penalty must be a finite number")
            check(not self.stop_list and self.logprobs is None and self.min_tokens == 0,
                  "beam search does not take stop strings, logprobs or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
