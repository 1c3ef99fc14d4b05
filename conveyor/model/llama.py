"""One implementation of the Llama family: Llama (incl. Llama 3 rope scaling), Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm). Parameter names follow Hugging Face checkpoints, with q/k/v and gate/up fused."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from conveyor.model.attention import AttentionMetadata, paged_attention
from conveyor.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, add_rms_norm, apply_rotary

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_id: list[int]

    def __post_init__(self) -> None:
        """Raises ValueError for a config no model can be built from (damaged or hand-edited checkpoints)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("rotary embeddings need an even head_dim")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        for name in ("rms_norm_eps", "rope_theta"):
            _positive_number(name, getattr(self, name))
        _check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf(cls, cfg: dict) -> ArchConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu is)")
        # transformers >= 5 writes rope_parameters; older checkpoints write rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
        heads = _positive_int("num_attention_heads", cfg.get("num_attention_heads"))
        hidden = _positive_int("hidden_size", cfg.get("hidden_size"))
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=cfg.get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size"),
            num_layers=cfg.get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta) if isinstance(theta, (int, float)) else theta,  # else __post_init__ says why
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[eos] if isinstance(eos, int) else list(eos or []),
        )


def _positive_number(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"config {name} must be a positive number, got {v!r}")
    return v


def _check_rope_scaling(scaling) -> None:
    """The rope_scaling dict RotaryEmbedding understands: None, or a type with its numeric parameters."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"config rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    needs = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "original_max_position_embeddings")}.get(kind)
    if needs is None:
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")
    for name in needs:
        _positive_number(f"rope_scaling.{name}", scaling.get(name))
    for name in ("low_freq_factor", "high_freq_factor"):
        if kind == "llama3" and name in scaling:
            _positive_number(f"rope_scaling.{name}", scaling[name])
    if kind == "llama3" and scaling.get("high_freq_factor", 4.0) <= scaling.get("low_freq_factor", 1.0):
        raise ValueError("config rope_scaling.high_freq_factor must exceed low_freq_factor")


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"config {name} must be a positive integer, got {v!r}")
    return v


class Attention(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=c.qkv_bias and c.model_type != "qwen2")
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.scale = c.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim)  # q and k heads get one rotary pass
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1)
        q, k = apply_rotary(qk, *rope, fused=meta.backend == "cpp").split([self.num_heads, self.num_kv_heads], dim=1)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, c: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata, next_norm: RMSNorm, fused: bool) -> torch.Tensor:
        """h: input_layernorm(residual) [T, hidden]; residual is updated in place. Returns next_norm(residual)
        after this layer (the next layer's input_layernorm, or the model's final norm): each residual add is
        fused with the norm that follows it."""
        a = self.self_attn(h, rope, kv_cache, meta)
        h = add_rms_norm(a, residual, self.post_attention_layernorm, fused)
        return add_rms_norm(self.mlp(h, fused), residual, next_norm, fused)


class LlamaModel(nn.Module):
    def __init__(self, c: ArchConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary = RotaryEmbedding(c.head_dim, max_position, c.rope_theta, c.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, c: ArchConfig, max_position: int) -> None:
        super().__init__()
        self.config = c
        self.model = LlamaModel(c, max(max_position, c.max_position_embeddings))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Flattened tokens [T] -> final hidden states [T, hidden]."""
        residual = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.tables(positions, residual.dtype)
        fused = meta.backend == "cpp"  # the fused ops come with the C++ attention kernel
        if fused:  # the residual stream in float32: 30 layers of rounded bf16 sums tip near-tied greedy choices
            residual = residual.float()
        layers = self.model.layers
        h = add_rms_norm(None, residual, layers[0].input_layernorm, fused)
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches)):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h = layer(h, residual, rope, kv_cache, meta, nxt, fused)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
