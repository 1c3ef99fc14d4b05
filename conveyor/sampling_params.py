"""Per-request sampling settings, named as in vLLM and the OpenAI API."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

_MAX_LOGPROBS = 20
_INT64 = 1 << 63
_MAX_STOP_TOKEN_IDS = 1024
_MAX_LENGTH_PENALTY = 10.0  # |penalty| * ln(max_model_len) must stay far below float's exponent range
_MAX_LOGIT_BIAS_ENTRIES = 2048
_MAX_CONSTRAINT_CHARS = 256 << 10  # a schema, regex or grammar larger than this is refused before compilation
_MAX_CHOICES = 1024


def ensure_utf8(text: str, what: str) -> None:
    """Raise ValueError unless text can be encoded as UTF-8 (JSON's \\ud800 escapes give lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (a lone surrogate at position {e.start})") from None


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's StructuredOutputsParams); exactly one kind is set.

    json: a JSON schema (dict, or its JSON text); json_object: any JSON object; regex: a regular expression the
    whole output matches; choice: the output is exactly one of these strings; grammar: an EBNF grammar (GBNF/Lark
    syntax as the grammar engine reads it). Raises ValueError for none or several kinds, wrong types, or a constraint
    over the size limit. Whether a schema, regex or grammar compiles is checked by the grammar engine."""
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object is True:
            kinds.append("json_object")
        elif self.json_object is not False:
            raise ValueError("structured_outputs.json_object must be true or false")
        if len(kinds) != 1:
            raise ValueError("structured outputs need exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(kinds) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError:
                raise ValueError("structured_outputs.json is not valid JSON") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not 1 <= len(self.choice) <= _MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be 1 to {_MAX_CHOICES} non-empty strings")
            self.choice = list(self.choice)
        try:
            key = self.key()
        except (RecursionError, TypeError, ValueError) as e:  # nested too deeply, or not JSON (offline callers)
            raise ValueError(f"structured_outputs.{self.kind} is not valid: {type(e).__name__}: {str(e)[:100]}") \
                from None
        if len(key) > _MAX_CONSTRAINT_CHARS:
            raise ValueError(f"the structured output constraint is over {_MAX_CONSTRAINT_CHARS} characters")
        ensure_utf8(key, "the structured output constraint")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None) \
            if not self.json_object else "json_object"

    def key(self) -> str:
        """A canonical text of the constraint (its kind and value), the key of the compiled-grammar cache."""
        value = True if self.json_object else getattr(self, self.kind)
        return json.dumps([self.kind, value], sort_keys=True, separators=(",", ":"))


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
    best_of: int | None = None  # draw best_of samples, return the n with the highest cumulative logprob
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] added to its logit
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (the first has none)
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
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
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        """Every value the engine will use is checked here (when made, and again when a request is added), so no
        request can fail inside a step: integers are ints within int64, floats finite and in range, strings valid
        UTF-8. Raises ValueError."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "seed", "priority", "beam_width",
                     "best_of", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None and name in ("max_tokens", "logprobs", "seed", "best_of", "prompt_logprobs")
                  or isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
            hi = 1 << 64 if name == "seed" else _INT64  # seeds may be given as signed or unsigned 64-bit
            check(v is None or -_INT64 <= v < hi, f"{name} is out of the 64-bit integer range")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "length_penalty"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}")
        for name in ("ignore_eos", "skip_special_tokens", "use_beam_search", "include_stop_str_in_output"):
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
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= _MAX_LOGPROBS,
              f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        check(self.best_of is None or self.n <= self.best_of <= 128,
              f"best_of must be an integer in [n, 128] (n={self.n}), got {self.best_of!r}")
        self._validate_logit_bias(check)
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs must be a StructuredOutputsParams")
        if self.use_beam_search:
            check(1 <= self.beam_width <= 64, f"beam_width must be an integer in [1, 64], got {self.beam_width!r}")
            check(self.n <= self.beam_width, f"n ({self.n}) must not exceed beam_width ({self.beam_width})")
            check(not self.stop_list and self.logprobs is None and self.min_tokens == 0,
                  "beam search does not take stop strings, logprobs or min_tokens")
            check(not self.logit_bias and self.structured_outputs is None and self.best_of in (None, self.n),
                  "beam search does not take logit_bias, structured outputs or best_of")

    def _validate_logit_bias(self, check) -> None:
        b = self.logit_bias
        check(b is None or isinstance(b, dict), "logit_bias must map token ids to numbers")
        if not b:
            return
        check(len(b) <= _MAX_LOGIT_BIAS_ENTRIES, f"logit_bias has more than {_MAX_LOGIT_BIAS_ENTRIES} entries")
        for t, v in b.items():
            check(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _INT64,
                  f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -100 <= v <= 100,
                  f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {t}")

    @property
    def num_samples(self) -> int:
        """Sequences the engine runs for this request: best_of when set, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
