"""The built-in demo model: a small Llama-architecture config with deterministic random weights and a byte-level
tokenizer with special tokens and a chat template. It needs no files and no network. Its text is random."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header|>", "<|end_header|>",
                  "<|eot|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header|>{{ m['role'] }}<|end_header|>\n\n{{ m['content'] }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header|>assistant<|end_header|>\n\n{% endif %}"
)

DEMO_CONFIG = {
    "model_type": "llama",
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 256,
    "eos_token_id": [257, 261],
}


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte (ids 0..255) plus the special tokens (ids 256..)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE)


def _byte_of(ch: str) -> int:
    """Inverse of the GPT-2 byte-to-unicode table, so token id == byte value."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@torch.no_grad()
def shape_demo_head(model: torch.nn.Module) -> None:
    """Make the random demo model print readable random text: the output head only favours printable ASCII,
    whitespace and the end tokens (other bytes get a zero logit, far below the typical winner)."""
    head = model.lm_head.weight
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[list(range(32, 127)) + [10]] = True
    keep[DEMO_CONFIG["eos_token_id"]] = True
    head[~keep] = 0.0
    head[keep] *= 12.0
