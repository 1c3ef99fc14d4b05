"""Builds bench/models/llama-100m's tokenizer: a byte-level BPE trained here, on this Python's standard library
source, to the model's full vocabulary of 32000 ids, so that every id a dummy-weight model samples decodes to text.

    .venv/bin/python bench/models/make_llama100m_tokenizer.py

Byte-level BPE needs no unknown token; the training corpus is local (no downloads) and sorted, so the result is
reproducible for one Python version. Special tokens take the last six ids; config.json names bos/eos by id.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 32000
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
OUT = Path(__file__).parent / "llama-100m"


def corpus(max_bytes: int = 40 << 20):
    """Yields the standard library's .py files in sorted order, up to max_bytes of text."""
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        total += len(text)
        yield text
        if total >= max_bytes:
            return


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB - len(SPECIALS), tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2])
    fast.chat_template = (OUT / "chat_template.jinja").read_text()
    fast.save_pretrained(OUT)
    cfg_path = OUT / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token_id"], cfg["eos_token_id"] = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"wrote {OUT}: vocab {VOCAB}, bos {cfg['bos_token_id']}, eos {cfg['eos_token_id']}")


if __name__ == "__main__":
    main()
