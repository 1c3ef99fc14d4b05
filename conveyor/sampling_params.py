"""Per-request sampling settings, named as in vLLM and the OpenAI API."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

_MAX_LOGPROBS = 20
_INT64 = 1 << 63
_MAX_STOP_TOKEN_IDS = 1024
_MAX_LENGTH_PENALTY = 10.0  # |penalty| * ln(max_model_len) must stay far below float's exponent range


def ensure_utf8(text: str, what: str) -> None:
    """Raise ValueError unless text can be encoded as UTF-8 (JSON's \\ud800 escapes give lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (a lone surrogate at position {e.start})") from None


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
        if not (self.stop is None or isinstance(self.stop, (str, list, tuple))):
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if not (self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple))):
            raise ValueError(f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}")
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Every value the engine will use is checked here (when made, and again when a request is added), so no
        request can fail inside a step: integers are ints within int64, floats finite and in range, strings valid
        UTF-8. Raises ValueError."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "seed", "priority", "beam_width"):
            v = getattr(self, name)
            check(v is None and name in ("max_tokens", "logprobs", "seed")
                  or isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
            hi = 1 << 64 if name == "seed" else _INT64  # seeds may be given as signed or unsigned 64-bit
            check(v is None or -_INT64 <= v < hi, f"{name} is out of the 64-bit integer range")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "length_penalty"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}")
        for name in ("ignore_eos", "skip_special_tokens", "use_beam_search"):
            check(isinstance(getattr(self, name), bool), f"{name} must be true or false")

        check(1 <= self.n <= 128, f"n must be an integer in [1, 128], got {self.n!r}")
        check(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 10.0, f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        check(abs(self.length_penalty) <= _MAX_LENGTH_PENALTY, f"length_penalty must be in "
              f"[-{_MAX_LENGTH_PENALTY:g}, {_MAX_LENGTH_PENALTY:g}], got {self.length_penalty}")
        check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS,
              f"logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        check(all(isinstance(s, str) and s for s in self.stop_list), "stop must be non-empty strings")
        check(len(self.stop_list) <= 16, "at most 16 stop strings")
        for s in self.stop_list:
            ensure_utf8(s, "a stop string")
        check(isinstance(self.stop_token_ids, list) and len(self.stop_token_ids) <= _MAX_STOP_TOKEN_IDS,
              f"stop_token_ids must be a list of at most {_MAX_STOP_TOKEN_IDS} integers")
        check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _INT64 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative 64-bit integers")
        check(self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'")
        if self.use_beam_search:
            check(1 <= self.beam_width <= 64, f"beam_width must be an integer in [1, 64], got {self.beam_width!r}")
            check(self.n <= self.beam_width, f"n ({self.n}) must not exceed beam_width ({self.beam_width})")
            check(not self.stop_list and self.logprobs is None and self.min_tokens == 0,
                  "beam search does not take stop strings, logprobs or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
