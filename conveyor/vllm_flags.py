"""vLLM's command-line flags on `conveyor serve` / `generate`: the ones Conveyor can honour under vLLM's names, and
the well-known ones it cannot, refused by name with one line saying why (unknown flags stay argparse errors).
Numeric flags are checked against their ranges while parsing (`Bounded`), before any model loads."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# flag -> why Conveyor refuses it; each takes an optional value so that `--flag VALUE` and `--flag=VALUE` both reach
# the refusal instead of argparse's "unrecognized arguments". HARMLESS: the value that asks for what Conveyor does.
UNSUPPORTED: dict[str, str] = {
    "--enable-lora": "LoRA adapters are not supported",
    "--lora-modules": "LoRA adapters are not supported",
    "--max-loras": "LoRA adapters are not supported",
    "--max-lora-rank": "LoRA adapters are not supported",
    "--kv-transfer-config": "KV transfer between instances (disaggregated prefill) is not supported",
    "--kv-events-config": "KV cache events are not published",
    "--enable-expert-parallel": "no mixture-of-experts models are supported",
    "--distributed-executor-backend": "one device per process: there is no distributed executor",
    "--cpu-offload-gb": "weights are not offloaded (use --swap-space for KV blocks)",
    "--kv-cache-dtype": "the KV cache is kept in the model's --dtype",
    "--reasoning-parser": "reasoning output is not parsed",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--mm-processor-kwargs": "multimodal inputs are not supported",
    "--rope-scaling": "the checkpoint's own rope scaling is used; it cannot be overridden",
    "--hf-overrides": "the checkpoint's config cannot be overridden",
    "--num-scheduler-steps": "one scheduling decision per step",
    "--enable-sleep-mode": "sleep mode is not supported",
}
HARMLESS = {"--kv-cache-dtype": "auto", "--cpu-offload-gb": "0", "--num-scheduler-steps": "1"}


def refuse(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit 2 with one line (argparse's own errors print the whole usage first)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


class Unsupported(argparse.Action):
    """A vLLM flag Conveyor does not support: parsing it is an error that names it."""

    def __init__(self, option_strings, dest, **kw) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kw)
        self.flag = option_strings[0]

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values is None or values != HARMLESS.get(self.flag):
            refuse(parser, f"{option_string} is not supported by Conveyor: {UNSUPPORTED[self.flag]}")


class OneDevice(argparse.Action):
    """vLLM's parallelism sizes: 1 is what Conveyor does; more is refused by name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values != 1:
            refuse(parser, f"{option_string} {values} is not supported: Conveyor runs a model on one device (run "
                           f"replicas behind `conveyor gateway` to scale out)")
        setattr(namespace, self.dest, values)


class Bounded(argparse.Action):
    """A number within [lo, hi] (`above`: strictly greater than lo), finite; else one line naming the flag, exit 2.
    Use with type=int, float or human_int: a value that is not a number stays argparse's error."""

    def __init__(self, option_strings, dest, lo: float | None = None, hi: float | None = None, above: bool = False,
                 **kw) -> None:
        super().__init__(option_strings, dest, **kw)
        self.lo, self.hi, self.above = lo, hi, above

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        lo_ok = self.lo is None or (values > self.lo if self.above else values >= self.lo)
        if not (math.isfinite(values) and lo_ok and (self.hi is None or values <= self.hi)):
            refuse(parser, f"{option_string} {values}: must be {self._range()}")
        setattr(namespace, self.dest, values)

    def _range(self) -> str:
        if self.hi is None:
            return f"{'>' if self.above else '>='} {self.lo}"
        return f"in {'(' if self.above else '['}{self.lo}, {self.hi}]"


class Choice(argparse.Action):
    """A vLLM flag whose values Conveyor honours only in part: `ok` values are kept, others refused by name with
    `why` (what Conveyor does instead)."""

    def __init__(self, option_strings, dest, ok: tuple[str, ...] = (), why: str = "", **kw) -> None:
        super().__init__(option_strings, dest, **kw)
        self.ok, self.why = ok, why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values not in self.ok:
            refuse(parser, f"{option_string} {values} is not supported: {self.why}")
        setattr(namespace, self.dest, values)


class StructuredOutputsConfig(argparse.Action):
    """vLLM's --structured-outputs-config, JSON: only {"backend": "auto" | "xgrammar"} is what Conveyor does."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            cfg = json.loads(values)
        except ValueError:
            refuse(parser, f"{option_string} must be a JSON object, such as '{{\"backend\": \"xgrammar\"}}'")
        if not isinstance(cfg, dict):
            refuse(parser, f"{option_string} must be a JSON object, such as '{{\"backend\": \"xgrammar\"}}'")
        for key, value in cfg.items():
            if key != "backend":
                refuse(parser, f"{option_string}: {key} is not supported (only backend: xgrammar)")
            if value not in STRUCTURED_BACKENDS:
                refuse(parser, f"{option_string}: backend {value} is not supported: {_XGRAMMAR_ONLY}")
        setattr(namespace, self.dest, cfg)


class SpeculativeConfigFlag(argparse.Action):
    """vLLM's --speculative-config, a JSON object (conveyor.config.SpeculativeConfig's keys), parsed and validated
    while parsing: bad JSON, an unknown key or a bad value is one line naming the flag, exit 2."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from conveyor.config import SpeculativeConfig

        try:
            cfg = json.loads(values)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep for the parser
            refuse(parser, f"{option_string} is not valid JSON ({e}); for example "
                           f"'{{\"method\": \"ngram\", \"num_speculative_tokens\": 3}}'")
        try:
            setattr(namespace, self.dest, SpeculativeConfig.from_dict(cfg))
        except ValueError as e:  # a key may hold a line break: the message stays one line
            refuse(parser, f"{option_string}: {' '.join(str(e).splitlines())}")


STRUCTURED_BACKENDS = ("auto", "xgrammar")
_XGRAMMAR_ONLY = "Conveyor's structured outputs are compiled by xgrammar (auto or xgrammar)"
MAX_LOGPROBS = 20  # the sampler's limit on logprobs and prompt_logprobs (SamplingParams)


def add_vllm_only(p: argparse.ArgumentParser) -> None:
    """vLLM's parallelism sizes (1 only), its flags for what Conveyor always does (accepted with the values that
    ask for that, refused by name otherwise), and the vLLM flags Conveyor refuses."""
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                        ("--data-parallel-size", "-dp")):
        p.add_argument(flag, short, type=int, default=1, action=OneDevice, help="only 1: a model runs on one device")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines: tool_choice auto is always on (Hermes-style parsing)")
    p.add_argument("--tool-call-parser", action=Choice, ok=("hermes",), default="hermes",
                   why="Conveyor parses Hermes-style <tool_call> blocks (hermes) only",
                   help="only hermes: tool calls are parsed from <tool_call>{...}</tool_call> blocks")
    for flag in ("--guided-decoding-backend", "--structured-outputs-config.backend"):
        p.add_argument(flag, action=Choice, ok=STRUCTURED_BACKENDS, default="auto", why=_XGRAMMAR_ONLY,
                       help="auto or xgrammar: structured outputs are compiled by xgrammar")
    p.add_argument("--structured-outputs-config", action=StructuredOutputsConfig, default=None,
                   help='JSON; only {"backend": "xgrammar"} (or "auto")')
    p.add_argument("--speculative-config", action=SpeculativeConfigFlag, default=None,
                   help='JSON: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": A, '
                        '"prompt_lookup_min": B} or {"model": DRAFT, "num_speculative_tokens": K}')
    p.add_argument("--max-logprobs", type=int, action=Bounded, lo=0, hi=MAX_LOGPROBS, default=MAX_LOGPROBS,
                   help=f"most logprobs and prompt_logprobs a request may ask for (at most {MAX_LOGPROBS})")
    p.add_argument("--generation-config", action=Choice, ok=("vllm",), default="vllm",
                   why="a request's unset sampling fields take vLLM's defaults; a checkpoint's generation_config.json "
                       "is read only for its EOS ids (--generation-config vllm)",
                   help="only vllm: unset sampling fields take vLLM's defaults, not generation_config.json's")
    for flag in UNSUPPORTED:
        p.add_argument(flag, action=Unsupported, help=argparse.SUPPRESS)


_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int:
    """An argparse type for sizes written as vLLM accepts them: 4096, 32k (x 1000), 25.6k, 8G (x 2**30). Lowercase
    suffixes are decimal, uppercase binary (whole numbers only)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)", text.strip())
    if not m or ("." in m[1] and not m[2].islower()):
        raise argparse.ArgumentTypeError(f"not an integer (such as 4096, 32k or 8G): {text!r}")
    return int(float(m[1]) * _SUFFIXES[m[2]]) if m[2] else int(m[1])


def resolve_quantization(value: str | None, model: str, load_format: str) -> str | None:
    """vLLM's --quantization value as ModelConfig takes it. `gguf` (vLLM's name for a GGUF file's own formats) is
    Conveyor's default for a GGUF model, so it becomes None. Raises ValueError naming the supported methods."""
    from conveyor.config import QUANTIZATIONS
    from conveyor.model.builtin import is_builtin

    if value == "gguf":
        if not (model.endswith(".gguf") or is_builtin(model) or load_format == "gguf"):
            raise ValueError(f"--quantization gguf needs a GGUF model, got {model!r}")
        return None
    if value not in QUANTIZATIONS:
        raise ValueError(f"--quantization {value} is not supported: Conveyor quantizes weights to int8 or int4 at "
                         f"load, keeps a GGUF file's Q8_0/Q4_0/Q4_1 (gguf), or dequantizes (none)")
    return value


def check_chunked_prefill(enabled: bool) -> None:
    """Conveyor always splits long prompts across steps (within --max-num-batched-tokens). Raises ValueError when
    asked not to."""
    if not enabled:
        raise ValueError("--no-enable-chunked-prefill is not supported: Conveyor always chunks prefills; to give a "
                         "prompt one step, raise --max-num-batched-tokens to --max-model-len")


def check_tokenizer(tokenizer: str | None, model: str) -> None:
    """vLLM's --tokenizer: a directory or a hub id. Refused with the demo model (its byte tokenizer is part of its
    random weights, so another could not be honoured), and when it is written as a path (/, ./, ../, ~) that does
    not exist, before any model loads. Raises ValueError."""
    if tokenizer is None:
        return
    if model == "demo":
        raise ValueError("--tokenizer cannot be used with --model demo: the demo model has its own byte tokenizer")
    if tokenizer.startswith(("/", "./", "../", "~")) and not Path(tokenizer).expanduser().is_dir():
        raise ValueError(f"--tokenizer {tokenizer!r}: no such directory")


def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: a Jinja template inline, or the path of a file holding one. Text with none of '{', '}'
    or a newline is taken as a path. Raises ValueError for a missing file or a template that does not parse."""
    if not any(c in value for c in "{}\n"):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--chat-template {value!r}: no such file (an inline template has Jinja tags)")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {str(path)!r} could not be read ({e})") from None
    try:
        ImmutableSandboxedEnvironment().parse(value)  # transformers renders templates in this environment
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template does not parse: {e.message} (line {e.lineno})") from None
    return value
