"""Load a Llama-family checkpoint: config.json, safetensors weights (single or sharded), tokenizer.

`load_format="dummy"` gives deterministic random weights for any config. `model="demo"` is the built-in demo model.
A model id that is not a local directory is fetched with huggingface_hub (needs network)."""
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
from conveyor.model import demo
from conveyor.model.llama import ArchConfig, LlamaForCausalLM

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
    if os.path.isdir(model):
        return Path(model)
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
    if cfg.model == "demo":
        hf_cfg, tokenizer, path = dict(demo.DEMO_CONFIG), demo.demo_tokenizer(), None
    else:
        path = resolve_path(cfg.model, cfg.revision)
        hf_cfg = json.loads((path / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(path)
    arch = ArchConfig.from_hf(hf_cfg)
    dtype = resolve_dtype(cfg.dtype, arch.torch_dtype, device)
    max_len = cfg.max_model_len or arch.max_position_embeddings
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(arch, max_len)
    if cfg.model == "demo" or cfg.load_format == "dummy":
        init_dummy_weights(model, cfg.seed)
        if cfg.model == "demo":
            demo.shape_demo_head(model)
    else:
        load_safetensors(model, path)
    model.eval()
    eos = _eos_ids(arch, tokenizer, path)
    log.info("loaded %s (%s, %d layers, hidden %d, dtype %s) on %s", cfg.model, arch.model_type,
             arch.num_layers, arch.hidden_size, str(dtype).removeprefix("torch."), device)
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
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)


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
    for f in files:
        with safe_open(path / f, framework="pt", device="cpu") as st:
            for key in st.keys():
                if "rotary_emb" in key or (key == "lm_head.weight" and arch.tie_word_embeddings):
                    continue
                _load_one(params, key, st.get_tensor(key), arch, loaded)
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
