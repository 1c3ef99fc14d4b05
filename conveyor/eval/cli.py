"""`conveyor eval perplexity`: its flags and command (wired into conveyor/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# config.QUANTIZATIONS but None, spelled out: building any `conveyor` command line must not import torch (the gateway
# and the autoscaler never load it); a test keeps the two equal
QUANTIZATION_CHOICES = ("none", "int8", "int4")


def add_perplexity_args(p: argparse.ArgumentParser) -> None:
    from conveyor.model.builtin import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a .gguf file, a checkpoint directory, a hub id, a built-in name (default: {DEFAULT_MODEL})")
    p.add_argument("--text", required=True, help="a UTF-8 text file, e.g. bench/data/perplexity_en.txt")
    p.add_argument("--context", type=int, default=512, help="tokens per window; the second half of each is scored")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --context)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantization", default=None, choices=QUANTIZATION_CHOICES,
                   help="weight-only quantization (default: the checkpoint's own format)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory overriding the model's own")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such text file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def encode(tokenizer, text: str) -> tuple[list[int], bool]:
    """The text's token ids without special tokens, and whether the tokenizer adds a BOS by default (then each
    window starts with it, as in llama.cpp)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    return ids, adds_bos


def cmd_perplexity(a: argparse.Namespace) -> int:
    """Print one line (or JSON): model, dtype, quantization, tokens scored, NLL, perplexity, seconds, tokens/s.
    Bad input (no such file, no text, text shorter than one window, context < 2, a model that does not load):
    one `error:` line on stderr, exit 2."""
    import torch

    from conveyor.config import ModelConfig
    from conveyor.eval.perplexity import perplexity, windows
    from conveyor.model.loader import load_model

    try:
        text = _read_text(a.text)
        windows(a.context, a.context, a.stride)  # context and stride checked before the model loads
        device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
        loaded = load_model(ModelConfig(model=a.model, dtype=a.dtype, quantization=a.quantization,
                                        tokenizer=a.tokenizer), device)
        ids, adds_bos = encode(loaded.tokenizer, text)
        t0 = time.perf_counter()
        r = perplexity(loaded, ids, a.context, a.stride, device,
                       bos_token_id=loaded.tokenizer.bos_token_id if adds_bos else None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = dict(model=a.model, dtype=str(loaded.dtype).removeprefix("torch."),
               quantization=a.quantization or "checkpoint", device=device, context=a.context,
               stride=a.stride or a.context, bos=adds_bos, text_tokens=len(ids), windows=r.windows,
               tokens_scored=r.num_tokens, nll=r.nll, ppl=r.ppl, seconds=seconds,
               tokens_per_s=r.windows * a.context / seconds)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']} dtype={out['dtype']} quantization={out['quantization']} device={device} "
              f"context={a.context} bos={'yes' if adds_bos else 'no'}: {r.num_tokens} tokens scored in "
              f"{r.windows} windows, nll={r.nll:.4f} ppl={r.ppl:.4f} ({seconds:.2f}s, "
              f"{out['tokens_per_s']:.0f} tokens/s forwarded)")
    return 0
