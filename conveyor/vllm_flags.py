"""vLLM's command-line flags on `conveyor serve` / `generate`: the ones Conveyor can honour under vLLM's names, and
the well-known ones it cannot, refused by name with one line saying why (unknown flags stay argparse errors)."""
from __future__ import annotations

import argparse
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
    "--speculative-config": "speculative decoding is not supported",
    "--kv-transfer-config": "KV transfer between instances (disaggregated prefill) is not supported",
    "--kv-events-config": "KV cache events are not published",
    "--enable-expert-parallel": "no mixture-of-experts models are supported",
    "--distributed-executor-backend": "one device per process: there is no distributed executor",
    "--cpu-offload-gb": "weights are not offloaded (use --swap-space for KV blocks)",
    "--kv-cache-dtype": "the KV cache is kept in the model's --dtype",
    "--reasoning-parser": "reasoning output is not parsed",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--mm-processor-kwargs": "multimodal inputs are not supported",
    "--otlp-traces-endpoint": "OpenTelemetry tracing is not supported",
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


def add_vllm_only(p: argparse.ArgumentParser) -> None:
    """vLLM's parallelism sizes (1 only) and the vLLM flags Conveyor refuses."""
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                        ("--data-parallel-size", "-dp")):
        p.add_argument(flag, short, type=int, default=1, action=OneDevice, help="only 1: a model runs on one device")
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
