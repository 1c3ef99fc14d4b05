"""Engine configuration as plain dataclasses, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

QUANTIZATIONS = (None, "none", "int8", "int4")
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass
class ModelConfig:
    model: str = "demo"
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype (float32 on CPU for float16 checkpoints)
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    seed: int = 0
    revision: str | None = None
    tokenizer: str | None = None  # a tokenizer directory or hub id overriding the checkpoint's own
    # weight-only quantization: None keeps a GGUF's own formats (Q8_0/Q4_0/Q4_1 stay low-bit) and loads other
    # checkpoints at dtype; int8 (per output channel) and int4 (group-wise) quantize at load; none dequantizes a GGUF
    quantization: str | None = None
    max_logprobs: int = 20  # vLLM's --max-logprobs: most logprobs / prompt_logprobs a request may ask for

    def __post_init__(self) -> None:
        if not 0 <= self.max_logprobs <= 20:  # the sampler's own limit (SamplingParams)
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {[q for q in QUANTIZATIONS if q]}, got {self.quantization!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides the memory budget when set
    # bytes of KV cache (vLLM's kv_cache_memory_bytes); None: DEFAULT_CPU_KV_CACHE_BYTES on CPU, and on CUDA what
    # gpu_memory_utilization leaves
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + activations + KV on CUDA
    # paged: blocks are given as tokens need them. contiguous: a request reserves one run of consecutive blocks
    # for prompt + max_tokens when admitted (the pre-paging layout, kept to measure what paging saves)
    kv_layout: str = "paged"
    enable_prefix_caching: bool = True
    watermark: float = 0.01  # share of blocks admission leaves free for running sequences to grow into
    preemption_mode: str = "recompute"  # recompute | swap (falls back to recompute when swap space is full)
    swap_space: float = 0.0  # GiB of host memory for swapped-out blocks

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.kv_layout not in ("paged", "contiguous"):
            raise ValueError(f"kv_layout must be paged or contiguous, got {self.kv_layout!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in [1, 256], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


BATCHING_MODES = ("continuous", "static", "dynamic", "none")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048  # set from the model when the engine starts
    # continuous: sequences join and leave at every step. static / dynamic: a batch of up to max_num_seqs is formed
    # when the previous one has fully finished, once max_num_seqs are waiting or the oldest has waited
    # batch_timeout_s (static: a long flush timeout) / batch_window_s (dynamic). none: one sequence at a time.
    batching: str = "continuous"
    batch_window_s: float = 0.05
    batch_timeout_s: float = 2.0
    scheduling_policy: str = "fcfs"  # fcfs | priority (lower SamplingParams.priority runs first, as in vLLM)
    long_prefill_token_threshold: int = 0  # most tokens one prompt may prefill in a step; 0: no cap

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.batch_window_s < 0 or self.batch_timeout_s < 0:
            raise ValueError("batch_window_s and batch_timeout_s must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


SPEC_CONFIG_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                    "disable_by_batch_size", "quantization")


@dataclass
class SpeculativeConfig:
    """vLLM's --speculative-config: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": a,
    "prompt_lookup_min": b} proposes from the sequence's own prompt and output; {"model": path_or_name,
    "num_speculative_tokens": k} from a smaller draft model sharing the target's tokenizer (method "draft_model").
    Proposals are adaptive (see conveyor.engine.spec_decode): none once disable_by_batch_size sequences run."""
    num_speculative_tokens: int
    method: str | None = None  # ngram | draft_model; None: draft_model when a model is given, else an error
    model: str | None = None  # the draft model: a built-in name, a Hugging Face directory or a GGUF file
    prompt_lookup_max: int | None = None  # longest n-gram matched (ngram); None: prompt_lookup_min or 4
    prompt_lookup_min: int | None = None  # shortest n-gram matched (ngram); None: prompt_lookup_max or 2
    disable_by_batch_size: int | None = None  # no proposals once this many sequences run; None: by device
    quantization: str | None = None  # the draft model's weight-only quantization (as ModelConfig.quantization)

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.method is None:
            if self.model is None:
                raise ValueError("speculative_config needs a method (\"ngram\") or a draft \"model\"")
            self.method = "draft_model"
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config method must be ngram or draft_model, got {self.method!r}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise ValueError("speculative_config method draft_model needs a draft \"model\"")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config method ngram takes no draft \"model\"")
            for name in ("prompt_lookup_min", "prompt_lookup_max"):  # before the defaults: 0 is not "unset"
                v = getattr(self, name)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64):
                    raise ValueError(f"speculative_config {name} must be an integer in [1, 64], got {v!r}")
            self.prompt_lookup_max = self.prompt_lookup_max or self.prompt_lookup_min or 4
            self.prompt_lookup_min = self.prompt_lookup_min or min(2, self.prompt_lookup_max)
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) exceeds "
                                 f"prompt_lookup_max ({self.prompt_lookup_max})")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be a positive integer, got {b!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"speculative_config quantization must be one of "
                             f"{[q for q in QUANTIZATIONS if q]}, got {self.quantization!r}")

    @classmethod
    def from_dict(cls, d: dict) -> SpeculativeConfig:
        """vLLM's JSON shape. Raises ValueError naming an unknown key or a bad value."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(map(str, set(d) - set(SPEC_CONFIG_KEYS)))
        if unknown:
            raise ValueError(f"unknown speculative_config keys: {', '.join(unknown)[:200]} (known: "
                             f"{', '.join(SPEC_CONFIG_KEYS)})")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return cls(**d)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "auto"  # auto | cpu | cuda
    speculative: SpeculativeConfig | None = None
    # vLLM's --attention-backend: auto (cpp on CPU, triton on CUDA), cpp, triton or torch (conveyor.model.attention)
    attention_backend: str = "auto"
    enforce_eager: bool = False  # vLLM's --enforce-eager: no CUDA graphs for decode batches
    # vLLM's --async-scheduling: schedule step N + 1 while step N runs (conveyor.engine.async_scheduling)
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "cpp", "triton", "torch"):
            raise ValueError(f"attention_backend must be auto, cpp, triton or torch, got {self.attention_backend!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            self.speculative = SpeculativeConfig.from_dict(self.speculative)  # a dict; anything else: ValueError
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available")
