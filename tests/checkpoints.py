"""Tiny Hugging Face checkpoints with random weights, written by transformers' save_pretrained, and a BPE
tokenizer trained here on a few sentences. Nothing is downloaded. forward_logits: our model's logits at every
position, to compare with a reference's."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config)

from conveyor.model.attention import kv_cache_shape, prompt_metadata, resolve_backend

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets finished sequences leave and new ones join at every step.",
    "Une phrase en français, avec des accents: été, où, garçon.",
    "数字和符号 123 456 789 !?",
    "def f(x):\n    return x * 2\n",
] * 20

VOCAB = 320

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def make_config(kind: str):
    if kind == "llama":
        return LlamaConfig(**COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "llama-tied":
        return LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=500000.0)
    if kind == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**COMMON)
    if kind == "qwen3":
        return Qwen3Config(**COMMON, head_dim=32)
    raise ValueError(kind)


def write_checkpoint(kind: str, path: Path, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(make_config(kind), dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    train_tokenizer().save_pretrained(path)
    return path


@torch.inference_mode()
def forward_logits(model: nn.Module, arch, dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    """Float32 logits [len(ids), vocab] at every position: one prefill of ids through our model's forward over a
    fresh paged KV cache (blocks of 16)."""
    n, bs = len(ids), 16
    nb = -(-n // bs)
    kv = [torch.zeros(kv_cache_shape(nb, bs, arch.num_kv_heads, arch.head_dim), dtype=dtype)
          for _ in range(arch.num_layers)]
    pos = torch.arange(n)
    cpu = torch.device("cpu")
    meta = prompt_metadata(n, bs, arch.sliding_window, resolve_backend("auto", cpu), cpu)
    return model.compute_logits(model(torch.tensor(ids), pos, kv, meta)).float()
