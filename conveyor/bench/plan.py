"""Capacity planning: from an arrival rate, token lengths, a latency and a replica's throughput to the number of
replicas and the KV memory they need, with every step of the arithmetic written out.

    L  = λ × W                           concurrent sequences (Little's law; W = mean end-to-end latency)
    T  = L × (P + O/2)                   tokens in flight: each sequence holds its prompt and, on average over its
                                         life, half of its output
    B  = 2 × layers × kv_heads × head_dim × dtype_bytes      KV bytes per token (K and V, every layer)
    KV = T × B
    D  = λ × O                           output tokens/s demanded
    replicas = ceil(D × (1 + headroom) / R)                   R = one replica's output tokens/s
             (and, when given, ceil(KV × (1 + headroom) / replica KV memory), ceil(L × (1 + headroom) / max_num_seqs))
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def shape_from_config(cfg: dict) -> ModelShape:
    """A Hugging Face config.json's KV shape (dtype from torch_dtype / dtype, default 2 bytes)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return ModelShape(cfg["num_hidden_layers"], cfg.get("num_key_value_heads") or heads, head_dim,
                      _DTYPE_BYTES.get(str(dtype), 2))


def load_shape(model: str) -> ModelShape:
    if model == "demo":
        from conveyor.model.demo import DEMO_CONFIG

        return shape_from_config(DEMO_CONFIG)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    with open(path) as f:
        return shape_from_config(json.load(f))


@dataclass
class PlanInputs:
    arrival_rate: float  # λ, requests/s
    prompt_tokens: float  # P, mean
    output_tokens: float  # O, mean
    latency_s: float  # W, mean end-to-end latency
    latency_source: str  # where W came from, for the printout
    replica_throughput: float  # R, output tokens/s of one replica
    shape: ModelShape
    headroom: float = 0.3
    replica_kv_bytes: float | None = None
    max_num_seqs: int | None = None


@dataclass
class Plan:
    concurrency: float
    tokens_in_flight: float
    kv_bytes_per_token: int
    kv_bytes: float
    output_demand: float
    replicas_by_throughput: int
    replicas_by_kv: int | None
    replicas_by_slots: int | None
    replicas: int
    steps: list[str] = field(default_factory=list)

    def to_json(self, inputs: PlanInputs) -> dict:
        return {"inputs": asdict(inputs), **asdict(self)}

    def conclusion(self, n: int, i: PlanInputs) -> str:
        """The recommendation line for a fleet of n replicas."""
        return (f"=> replicas needed = {n}; per replica: {self.concurrency / n:.2f} concurrent sequences, "
                f"{_gib(self.kv_bytes / n)} of KV cache, {self.output_demand / n:,.1f} output tokens/s "
                f"({self.output_demand / n / i.replica_throughput:.0%} of its throughput)")


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def _ceil(x: float) -> int:
    return max(1, math.ceil(round(x, 9)))  # round first: 3.0000000001 from float noise is 3 replicas, not 4


def make_plan(i: PlanInputs) -> Plan:
    lam, P, O, W, h = i.arrival_rate, i.prompt_tokens, i.output_tokens, i.latency_s, i.headroom
    s = i.shape
    L = lam * W
    T = L * (P + O / 2)
    B = s.kv_bytes_per_token
    KV = T * B
    D = lam * O
    by_tput = _ceil(D * (1 + h) / i.replica_throughput)
    steps = [
        f"inputs: λ = {lam:g} req/s, P = {P:.1f} prompt tokens, O = {O:.1f} output tokens (means), "
        f"R = {i.replica_throughput:.1f} output tokens/s per replica, headroom = {h:g}",
        f"mean end-to-end latency W = {W * 1e3:.1f} ms ({i.latency_source})",
        f"concurrent sequences L = λ × W = {lam:g} × {W:.4g} s = {L:.2f}",
        f"tokens in flight T = L × (P + O/2) = {L:.2f} × ({P:.1f} + {O / 2:.1f}) = {T:,.0f}",
        f"KV bytes per token B = 2 × layers × kv_heads × head_dim × dtype_bytes = 2 × {s.layers} × "
        f"{s.kv_heads} × {s.head_dim} × {s.dtype_bytes} = {B:,} B",
        f"KV memory in flight = T × B = {T:,.0f} × {B:,} B = {_gib(KV)}",
        f"output token demand D = λ × O = {lam:g} × {O:.1f} = {D:,.1f} tokens/s",
        f"replicas for throughput = ceil(D × (1 + headroom) / R) = ceil({D:,.1f} × {1 + h:g} / "
        f"{i.replica_throughput:,.1f}) = ceil({D * (1 + h) / i.replica_throughput:.3f}) = {by_tput}",
    ]
    by_kv = by_slots = None
    if i.replica_kv_bytes:
        by_kv = _ceil(KV * (1 + h) / i.replica_kv_bytes)
        steps.append(f"replicas for KV memory = ceil(KV × (1 + headroom) / replica KV) = ceil({_gib(KV)} × "
                     f"{1 + h:g} / {_gib(i.replica_kv_bytes)}) = {by_kv}")
    if i.max_num_seqs:
        by_slots = _ceil(L * (1 + h) / i.max_num_seqs)
        steps.append(f"replicas for batch slots = ceil(L × (1 + headroom) / max_num_seqs) = ceil({L:.2f} × "
                     f"{1 + h:g} / {i.max_num_seqs}) = {by_slots}")
    n = max(x for x in (by_tput, by_kv, by_slots) if x is not None)
    steps = steps[:1] + [f"{k}. {line}" for k, line in enumerate(steps[1:], 1)]
    plan = Plan(L, T, B, KV, D, by_tput, by_kv, by_slots, n, steps)
    steps.append(plan.conclusion(n, i))
    return plan


def inputs_from_result(res: dict) -> dict:
    """Mean lengths, latency and throughput measured by a `bench serve` result."""
    n = res["completed"]
    if not n:
        raise ValueError("the result has no completed requests")
    return {"prompt_tokens": res["total_input_tokens"] / n, "output_tokens": res["total_output_tokens"] / n,
            "latency_s": res["e2el_ms"]["mean"] / 1e3, "replica_throughput": res["output_throughput"],
            "tpot_ms": res["tpot_ms"]["mean"]}


def choose_latency(output_tokens: float, measured: dict | None, e2el_ms: float | None,
                   tpot_ms: float | None) -> tuple[float, str, list[str]]:
    """W for Little's law: the measured mean E2EL when there is a result (checked against the SLO), else the
    latency the SLO allows. Returns (W seconds, where it came from, SLO check lines)."""
    if measured is not None:
        checks = []
        for name, slo, got in (("E2EL", e2el_ms, measured["latency_s"] * 1e3), ("TPOT", tpot_ms, measured["tpot_ms"])):
            if slo is not None and got is not None:
                verdict = "meets" if got <= slo else "MISSES"
                checks.append(f"SLO check: measured mean {name} {got:.1f} ms {verdict} the {name} SLO of {slo:g} ms")
        return measured["latency_s"], "measured mean E2EL of the bench result", checks
    if e2el_ms is not None:
        return e2el_ms / 1e3, "the E2EL SLO: the longest mean latency allowed", []
    if tpot_ms is not None:
        return output_tokens * tpot_ms / 1e3, f"O × TPOT SLO = {output_tokens:.1f} × {tpot_ms:g} ms; prefill " \
            "time not counted", []
    raise ValueError("need a latency: --from RESULT.json, --e2el-ms or --tpot-ms")
