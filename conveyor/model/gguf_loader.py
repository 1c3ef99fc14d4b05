"""GGUF checkpoints (llama.cpp's single-file format), read with the `gguf` package's reader.

The metadata gives the architecture, hyper-parameters, tokenizer, chat template and BOS/EOS ids; tensors are mapped
onto our Llama-family modules (q/k/v and gate/up fused). Q8_0, Q4_0 and Q4_1 weights stay low-bit in memory
(conveyor.model.quant) unless a quantization says otherwise; any other type the `gguf` package can dequantize loads
at the model dtype.

llama.cpp's converter reorders the rows of Llama's q and k projections for its interleaved rotary layout
(convert_hf_to_gguf.py, `LlamaModel.permute`); we undo it, on raw quantized rows as well, since the blocks of a row
never cross rows. Qwen2/Qwen3 files keep Hugging Face's order.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conveyor.model.llama import ArchConfig
from conveyor.progress import weight_load_progress

log = logging.getLogger("conveyor.loader")

# GGUF general.architecture -> our model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
KEPT_QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")  # types that run low-bit without expanding


class GGUFError(ValueError):
    """A GGUF file we cannot serve; the message is one line naming the file and the reason."""


@dataclass
class GGUFCheckpoint:
    path: Path
    arch: str  # general.architecture
    hf_config: dict  # the Hugging Face config.json equivalent (conveyor.model.llama.ArchConfig.from_hf reads it)
    tensors: dict  # tensor name -> gguf.ReaderTensor (data is a read-only memmap of the file)
    metadata: dict  # scalar and string fields (token lists left out)


def is_gguf(path: str | Path) -> bool:
    """True for an existing file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF file's metadata and tensor index (tensor data stays memory-mapped).

    Raises GGUFError for a missing, truncated or malformed file, or an architecture we do not implement."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such GGUF file")
    try:
        reader = GGUFReader(p)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on a damaged file
        raise GGUFError(f"{p}: not a readable GGUF file (truncated or damaged?): {type(e).__name__}: {e}") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a field type the reader cannot decode; nothing we use
            continue
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{p}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    hf_config = _hf_config(p, arch, meta, tensors)
    try:
        ArchConfig.from_hf(hf_config)  # the checks the model's construction makes, here with the file named
    except ValueError as e:
        raise GGUFError(f"{p}: the metadata does not describe a valid model: {e}") from None
    _check_layers(p, hf_config["num_hidden_layers"], tensors)
    return GGUFCheckpoint(p, arch, hf_config, tensors, meta)


def _check_layers(path: Path, block_count: int, tensors: dict) -> None:
    """GGUFError unless the file's blk.N tensors are exactly layers 0..block_count-1: checked before the model is
    built, so that a lying block_count neither drops layers silently nor builds millions of modules."""
    layers = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    contiguous = bool(layers) and len(layers) == max(layers) + 1  # exactly 0..max
    if not (contiguous and len(layers) == block_count):
        found = f"layers 0..{max(layers)}" if contiguous else \
            f"{len(layers)} layers numbered {min(layers)}..{max(layers)}" if layers else "no layers"
        raise GGUFError(f"{path}: block_count is {block_count} but the file has tensors for {found}")


def _hf_config(path: Path, arch: str, meta: dict, tensors: dict) -> dict:
    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None or get("block_count") is None:
        raise GGUFError(f"{path}: metadata lacks {arch}.block_count / embedding_length / attention.head_count")
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1 style) are not supported yet")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: the file lacks tensor token_embd.weight")
    vocab = get("vocab_size") or len(tensors["token_embd.weight"].data)
    scaling = None
    if get("rope.scaling.type", "none") not in ("none", None):
        if get("rope.scaling.type") != "linear":
            raise GGUFError(f"{path}: rope scaling {get('rope.scaling.type')!r} is not supported (linear is)")
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}  # checked by ArchConfig
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]
    cfg = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length"),  # None: hidden // heads (ArchConfig.from_hf)
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": scaling,
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "sliding_window": get("attention.sliding_window"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted(set(eos)),
    }
    if cfg["sliding_window"] is not None and arch in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = True
    return cfg


def tensor_types(ckpt: GGUFCheckpoint) -> Counter:
    return Counter(t.tensor_type.name for t in ckpt.tensors.values())


def default_dtype(ckpt: GGUFCheckpoint, quantization: str | None, device: str) -> torch.dtype:
    """The dtype `--dtype auto` picks: bfloat16 when weights stay low-bit (the CPU low-bit kernels are only fast
    with bfloat16 activations), else the file's float type (float16 becomes float32 on CPU)."""
    types = tensor_types(ckpt)
    if quantization in (None, "int8", "int4") and (quantization or any(t in types for t in KEPT_QUANTIZED)):
        return torch.bfloat16
    if types.get("BF16"):
        return torch.bfloat16
    if types.get("F16") and device != "cpu":
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def load_gguf_tokenizer(ckpt: GGUFCheckpoint, cache_root: Path):
    """The tokenizer (with its chat template) converted by transformers from the file's metadata. Converting takes
    seconds to tens of seconds, so the result is saved under cache_root, keyed by the file's path, size and mtime.

    Raises GGUFError when the file carries no tokenizer (pass --tokenizer then)."""
    from transformers import AutoTokenizer

    if "tokenizer.ggml.model" not in ckpt.metadata:
        raise GGUFError(f"{ckpt.path}: the file has no tokenizer in its metadata; pass --tokenizer DIR")
    st = ckpt.path.stat()
    key = hashlib.sha256(f"{ckpt.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_root / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)  # damaged cache entry: convert again
    log.info("converting the tokenizer of %s from its GGUF metadata (once; cached in %s)", ckpt.path.name, cached)
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
    except Exception as e:
        raise GGUFError(f"{ckpt.path}: could not build its tokenizer ({type(e).__name__}: {e}); "
                        f"pass --tokenizer DIR") from None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only or racing cache costs only the next start-up's conversion
        log.warning("could not cache the tokenizer in %s: %s", cached, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


# ---------------------------------------------------------------------------------------------------------------
# weights


def _unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: rows (head, d/2, 2) back to Hugging Face's (head, 2, d/2)."""
    rows = a.shape[0]
    return a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _parts(ckpt: GGUFCheckpoint, layer: int, names: list[str]) -> list:
    missing = [n for n in names if f"blk.{layer}.{n}" not in ckpt.tensors]
    if missing:
        raise GGUFError(f"{ckpt.path}: layer {layer} lacks tensors {missing}")
    return [ckpt.tensors[f"blk.{layer}.{n}"] for n in names]


def _rows(ckpt: GGUFCheckpoint, t, raw: bool) -> np.ndarray:
    """A tensor's rows, raw bytes [N, bytes_per_row] or dequantized float32 [N, K], q/k un-permuted."""
    from gguf import quants

    if raw:
        a = np.asarray(t.data)
    else:
        try:
            a = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{ckpt.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                            f"dequantized (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the types the gguf "
                            f"package dequantizes)") from None
    if ckpt.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name) and a.ndim == 2:
        c = ckpt.hf_config
        a = _unpermute_rows(a, c["num_attention_heads"] if ".attn_q." in t.name else c["num_key_value_heads"])
    return a


def _float(ckpt: GGUFCheckpoint, tensors: list, dtype: torch.dtype, device: str) -> torch.Tensor:
    a = np.concatenate([_rows(ckpt, t, raw=False) for t in tensors]) if len(tensors) > 1 \
        else _rows(ckpt, tensors[0], raw=False)
    # a copy: an F32 tensor would otherwise alias the read-only memory map of the file
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True)).to(device=device, dtype=dtype)


def _keep_low_bit(tensors: list, quantization: str | None) -> bool:
    types = {t.tensor_type.name for t in tensors}
    return quantization is None and len(types) == 1 and types.pop() in KEPT_QUANTIZED


def _linear(ckpt: GGUFCheckpoint, tensors: list, bias: list | None, module: nn.Linear, quantization: str | None,
            dtype: torch.dtype, device: str) -> nn.Module:
    """The module for one (possibly fused) projection: a QuantizedLinear over the file's own blocks (packed on
    `device`: the kernels' packed layouts differ by device), or the nn.Linear filled with dequantized weights."""
    b = _checked(ckpt, bias, (module.out_features,), dtype, device) if bias else None
    shape = (module.out_features, module.in_features)
    if _keep_low_bit(tensors, quantization):
        raw = np.concatenate([_rows(ckpt, t, raw=True) for t in tensors])
        return _from_gguf(ckpt, tensors, raw, shape, b, dtype, device)
    w = _checked(ckpt, tensors, shape, dtype, device)
    lin = nn.Linear(module.in_features, module.out_features, bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _checked(ckpt: GGUFCheckpoint, tensors: list, shape: tuple[int, ...], dtype: torch.dtype,
             device: str) -> torch.Tensor:
    """The tensors dequantized (rows concatenated); GGUFError unless that has the shape the metadata implies."""
    w = _float(ckpt, tensors, dtype, device)
    if tuple(w.shape) != shape:
        raise GGUFError(f"{ckpt.path}: {'+'.join(t.name for t in tensors)} has shape {tuple(w.shape)}, expected "
                        f"{shape} from the metadata")
    return w


def _from_gguf(ckpt: GGUFCheckpoint, tensors: list, raw: np.ndarray, shape: tuple[int, int],
               bias: torch.Tensor | None, dtype: torch.dtype, device: str) -> nn.Module:
    from conveyor.model.quant import QuantizedLinear

    try:
        return QuantizedLinear.from_gguf(raw, tensors[0].tensor_type, shape, bias, dtype, device)
    except ValueError as e:  # the blocks do not hold the shape the metadata implies
        raise GGUFError(f"{ckpt.path}: {'+'.join(t.name for t in tensors)}: {e}") from None


@torch.no_grad()
def load_gguf_weights(model: nn.Module, ckpt: GGUFCheckpoint, quantization: str | None, dtype: torch.dtype,
                      device: str) -> Counter:
    """Fill `model` (built on the meta device) from the file: every module gets real tensors on `device`.
    Projections whose parts share one of KEPT_QUANTIZED (and quantization is None) become QuantizedLinear; the
    embedding too, shared with lm_head when tied. Returns how many tensors of each type were kept low-bit."""
    c = model.config
    kept: Counter = Counter()
    with weight_load_progress(len(ckpt.tensors), "Loading GGUF weights") as bar:
        for i, layer in enumerate(model.model.layers):
            _load_layer(ckpt, i, layer, c, quantization, dtype, device, kept)
            bar.update(sum(n.startswith(f"blk.{i}.") for n in ckpt.tensors))
        _load_ends(model, ckpt, quantization, dtype, device, kept)
        bar.update(bar.total - bar.n)
    return kept


def _load_layer(ckpt: GGUFCheckpoint, i: int, layer: nn.Module, c: ArchConfig, quantization: str | None,
                dtype: torch.dtype, device: str, kept: Counter) -> None:
    """Decoder layer i's projections and norms; counts the projections kept low-bit in `kept`."""
    att, mlp = layer.self_attn, layer.mlp
    qkv = _parts(ckpt, i, ["attn_q.weight", "attn_k.weight", "attn_v.weight"])
    qkv_bias = _parts(ckpt, i, ["attn_q.bias", "attn_k.bias", "attn_v.bias"]) if c.qkv_bias else None
    att.qkv_proj = _linear(ckpt, qkv, qkv_bias, att.qkv_proj, quantization, dtype, device)
    o_bias = _parts(ckpt, i, ["attn_output.bias"]) if att.o_proj.bias is not None else None
    att.o_proj = _linear(ckpt, _parts(ckpt, i, ["attn_output.weight"]), o_bias, att.o_proj, quantization,
                         dtype, device)
    gate_up = _parts(ckpt, i, ["ffn_gate.weight", "ffn_up.weight"])
    mlp.gate_up_proj = _linear(ckpt, gate_up, None, mlp.gate_up_proj, quantization, dtype, device)
    mlp.down_proj = _linear(ckpt, _parts(ckpt, i, ["ffn_down.weight"]), None, mlp.down_proj, quantization,
                            dtype, device)
    for t in qkv + gate_up + _parts(ckpt, i, ["attn_output.weight", "ffn_down.weight"]):
        kept[t.tensor_type.name] += _keep_low_bit([t], quantization)
    hidden, head_dim = (c.hidden_size,), (c.head_dim,)
    layer.input_layernorm.weight = _param(_checked(ckpt, _parts(ckpt, i, ["attn_norm.weight"]), hidden, dtype,
                                                   device))
    layer.post_attention_layernorm.weight = _param(
        _checked(ckpt, _parts(ckpt, i, ["ffn_norm.weight"]), hidden, dtype, device))
    if att.q_norm is not None:
        att.q_norm.weight = _param(_checked(ckpt, _parts(ckpt, i, ["attn_q_norm.weight"]), head_dim, dtype,
                                            device))
        att.k_norm.weight = _param(_checked(ckpt, _parts(ckpt, i, ["attn_k_norm.weight"]), head_dim, dtype,
                                            device))


def _load_ends(model: nn.Module, ckpt: GGUFCheckpoint, quantization: str | None, dtype: torch.dtype,
               device: str, kept: Counter) -> None:
    """The final norm, the embedding and the output head (tied to the embedding when the file has no output)."""
    from conveyor.model.quant import QuantizedEmbedding

    c = model.config
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in ckpt.tensors:
            raise GGUFError(f"{ckpt.path}: the file lacks tensor {name}")
    model.model.norm.weight = _param(_checked(ckpt, [ckpt.tensors["output_norm.weight"]], (c.hidden_size,), dtype,
                                              device))
    embd = ckpt.tensors["token_embd.weight"]
    head = ckpt.tensors.get("output.weight", embd)
    if _keep_low_bit([embd], quantization):
        shape = (c.vocab_size, c.hidden_size)
        table = _from_gguf(ckpt, [embd], np.asarray(embd.data), shape, None, dtype, device)
        model.model.embed_tokens = QuantizedEmbedding(table, dtype)
        kept[embd.tensor_type.name] += 1
        if head is embd:
            model.lm_head = table
    else:
        model.model.embed_tokens.weight = _param(_checked(ckpt, [embd], (c.vocab_size, c.hidden_size), dtype,
                                                          device))
        if head is embd:
            model.lm_head.weight = model.model.embed_tokens.weight
    if head is not embd:
        model.lm_head = _linear(ckpt, [head], None, model.lm_head, quantization, dtype, device)
        kept[head.tensor_type.name] += _keep_low_bit([head], quantization)
