"""Tiny GGUF checkpoints written with the `gguf` package's writer from the tiny Hugging Face checkpoints of
tests/checkpoints.py, as llama.cpp's converter lays them out (Llama's q/k rows permuted for its rotary layout,
tokenizer and chat template in the metadata). Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from checkpoints import write_checkpoint

ARCH = {"llama-tied": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1}

_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order for Llama q/k rows: (head, 2, d/2) -> (head, d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a weight becomes after quantizing to qtype and dequantizing (gguf's own code): the reference."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), Q[qtype]), Q[qtype])


def _encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Q | None]:
    if qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), Q[qtype]), Q[qtype]


def write_gguf(kind: str, hf_dir: Path, out: Path, qtype: str = "F32", embed_qtype: str | None = None,
               with_tokenizer: bool = True, arch: str | None = None,
               raw_tensors: dict[str, tuple[np.ndarray, Q | None]] | None = None) -> Path:
    """Write the HF checkpoint at hf_dir (written by tests.checkpoints.write_checkpoint(kind)) as a GGUF file:
    2-D weights in qtype (any type gguf.quants.quantize supports: TYPES, also Q5_0, Q5_1...; the embedding in
    embed_qtype, default qtype), norms in F32. raw_tensors: GGUF tensor name -> (data, type) written instead of
    that tensor: raw bytes of a type the gguf package cannot quantize, or a float array (type None)."""
    arch = arch or ARCH[kind]
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if with_tokenizer:
        _add_tokenizer(w, hf_dir)
    for name, t in load_file(hf_dir / "model.safetensors").items():
        a = t.float().numpy()
        if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
            a = permute_rows(a, heads if "q_proj" in name else kv_heads)
        if gguf_name(name) in (raw_tensors or {}):
            data, raw = raw_tensors[gguf_name(name)]
        elif a.ndim == 1:
            data, raw = a.astype(np.float32), None
        else:
            data, raw = _encode(a, (embed_qtype or qtype) if "embed_tokens" in name else qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tokenizer(w: gguf.GGUFWriter, hf_dir: Path) -> None:
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for added in tj["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tc.get("bos_token") or "<s>"])
    w.add_eos_token_id(vocab[tc.get("eos_token") or "</s>"])
    w.add_pad_token_id(vocab[tc.get("pad_token") or "<pad>"])
    w.add_add_bos_token(False)
    template = tc.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)


def reference_hf_model(kind: str, hf_dir: Path, qtype: str, embed_qtype: str | None = None):
    """transformers' model for hf_dir with every 2-D weight replaced by its qtype round trip: what a correct
    loader of the GGUF must compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if t.ndim == 2:
                q = (embed_qtype or qtype) if "embed_tokens" in name else qtype
                if "lm_head" in name and model.config.tie_word_embeddings:
                    continue
                t.copy_(torch.from_numpy(roundtrip(t.numpy(), q)))
    return model.eval()


__all__ = ["write_checkpoint", "write_gguf", "reference_hf_model", "roundtrip", "TYPES"]
