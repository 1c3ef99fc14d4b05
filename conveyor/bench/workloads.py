"""Seeded benchmark workloads: named generators, JSONL trace replay, arrival processes, max-model-len clipping.

Prompts are token ids in the target model's tokenizer so their lengths are exact on the server; they are built from
random ordinary words (each encoded once, with a leading space) so they decode to readable text.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

WORKLOADS = ("chat", "long-context", "mixed", "shared-prefix", "bursty")

WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by word "
    "but what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men change went light"
).split()


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int
    arrival_s: float | None = None  # offset from the start of the run; None: the arrival process decides


@dataclass(frozen=True)
class Lengths:
    prompt: int  # mean prompt tokens
    output: int  # mean output tokens


DEFAULT_LENGTHS = {
    "chat": Lengths(128, 256),
    "long-context": Lengths(2048, 64),
    "mixed": Lengths(512, 160),
    "shared-prefix": Lengths(1024, 128),
    "bursty": Lengths(128, 256),
}
SHARED_PREFIXES = 4  # distinct system prompts in `shared-prefix`
SHARED_FRACTION = 0.75  # share of a `shared-prefix` prompt that is the shared system prompt
BURST_SIZE = 8  # requests per burst in `bursty`
BURSTY_DEFAULT_RATE = 4.0  # req/s on average when `bursty` runs without a finite --request-rate


def load_tokenizer(spec: str) -> Any:
    """'demo' (the built-in byte-level tokenizer) or a checkpoint directory / hub id."""
    if spec == "demo":
        from conveyor.model.demo import demo_tokenizer

        return demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


class TextTokens:
    """Random ordinary text of an exact length in one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words = [ids for w in WORDS if (ids := tokenizer.encode(" " + w, add_special_tokens=False))]

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        out: list[int] = []
        for i in rng.integers(len(self.words), size=n):  # every word is >= 1 token, so n words always suffice
            out.extend(self.words[i])
            if len(out) >= n:
                break
        return out[:n]


# ---- named workloads -------------------------------------------------------------------------------------------
def make_workload(name: str, n: int, text: TextTokens, seed: int, lengths: Lengths | None = None,
                  rate: float = math.inf) -> list[BenchRequest]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)} or a .jsonl trace")
    rng = np.random.default_rng(seed)
    m = lengths or DEFAULT_LENGTHS[name]
    if name == "shared-prefix":
        return _shared_prefix(n, text, rng, m)
    if name == "mixed":
        prompt_lens, output_lens = _lognormal(rng, m.prompt, 1.0, n), _lognormal(rng, m.output, 0.8, n)
    elif name == "long-context":
        prompt_lens, output_lens = _uniform(rng, m.prompt, 0.25, n), _uniform(rng, m.output, 0.5, n)
    else:  # chat, bursty
        prompt_lens, output_lens = _uniform(rng, m.prompt, 0.5, n), _uniform(rng, m.output, 0.5, n)
    reqs = [BenchRequest(text.sample(rng, p), o) for p, o in zip(prompt_lens, output_lens)]
    if name == "bursty":
        rate = rate if math.isfinite(rate) else BURSTY_DEFAULT_RATE
        for r, t in zip(reqs, burst_offsets(n, rate, BURST_SIZE, rng)):
            r.arrival_s = t
    return reqs


def _uniform(rng: np.random.Generator, mean: int, spread: float, n: int) -> list[int]:
    """Integers uniform in mean × [1 - spread, 1 + spread], at least 1."""
    lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def _lognormal(rng: np.random.Generator, mean: int, sigma: float, n: int) -> list[int]:
    """Long-tailed integers with the given mean (mu is set so E[X] = mean), at least 1."""
    xs = rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size=n)
    return [max(1, int(round(x))) for x in xs]


def _shared_prefix(n: int, text: TextTokens, rng: np.random.Generator, m: Lengths) -> list[BenchRequest]:
    prefix_len = max(1, round(m.prompt * SHARED_FRACTION))
    prefixes = [text.sample(rng, prefix_len) for _ in range(min(SHARED_PREFIXES, max(n, 1)))]
    suffix_lens = _uniform(rng, max(1, m.prompt - prefix_len), 0.5, n)
    output_lens = _uniform(rng, m.output, 0.5, n)
    picks = rng.integers(len(prefixes), size=n)
    return [BenchRequest(prefixes[k] + text.sample(rng, s), o) for k, s, o in zip(picks, suffix_lens, output_lens)]


# ---- arrivals --------------------------------------------------------------------------------------------------
def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send offsets: all at 0 for rate inf, else gaps ~ Gamma(shape=burstiness, scale=1/(rate·burstiness)), whose
    mean is 1/rate at any burstiness; burstiness 1 is Poisson, below 1 burstier, above 1 more regular."""
    if not math.isfinite(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    return [0.0] + [float(x) for x in np.cumsum(gaps[:-1])] if n else []


def burst_offsets(n: int, rate: float, burst: int, rng: np.random.Generator) -> list[float]:
    """Bursts of `burst` requests (spread over ~10 ms each) whose starts are Poisson with mean gap burst/rate."""
    num_bursts = -(-n // burst)
    starts = np.concatenate([[0.0], np.cumsum(rng.exponential(burst / rate, size=max(num_bursts - 1, 0)))])
    jitter = rng.exponential(0.01, size=n)
    return sorted(float(starts[i // burst] + jitter[i]) for i in range(n))


def assign_arrivals(reqs: list[BenchRequest], rate: float, burstiness: float, seed: int) -> bool:
    """Fill in arrival offsets from the arrival process unless the workload brought its own (True if it did)."""
    if reqs and all(r.arrival_s is not None for r in reqs):
        return True
    rng = np.random.default_rng([seed, 1])  # its own stream: changing the rate never changes the prompts
    for r, t in zip(reqs, arrival_offsets(len(reqs), rate, burstiness, rng)):
        r.arrival_s = t
    return False


# ---- trace replay ----------------------------------------------------------------------------------------------
def load_trace(path: str, text: TextTokens, seed: int) -> list[BenchRequest]:
    """One JSON object per line: {"arrival_s": float (optional), "prompt": str | "prompt_len": int,
    "output_len": int}. Arrivals are shifted so the first one is at 0; requests are sorted by arrival."""
    rng = np.random.default_rng(seed)
    reqs: list[BenchRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                reqs.append(_trace_request(line, text, rng, f"{path}:{lineno}"))
    has_arrival = [r.arrival_s is not None for r in reqs]
    if any(has_arrival) and not all(has_arrival):
        raise ValueError(f"{path}: either every line has arrival_s or none does")
    if reqs and all(has_arrival):
        first = min(r.arrival_s for r in reqs)
        reqs = sorted((replace(r, arrival_s=r.arrival_s - first) for r in reqs), key=lambda r: r.arrival_s)
    return reqs


def _trace_request(line: str, text: TextTokens, rng: np.random.Generator, where: str) -> BenchRequest:
    try:
        d = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply for the parser
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object")
    out = d.get("output_len")
    if not isinstance(out, int) or isinstance(out, bool) or out < 1:
        raise ValueError(f"{where}: output_len must be an integer >= 1")
    if isinstance(d.get("prompt"), str) and d["prompt"]:
        ids = text.tokenizer.encode(d["prompt"], add_special_tokens=False)
    elif isinstance(d.get("prompt_len"), int) and not isinstance(d["prompt_len"], bool) and d["prompt_len"] >= 1:
        ids = text.sample(rng, d["prompt_len"])
    else:
        raise ValueError(f"{where}: needs a non-empty 'prompt' string or an integer 'prompt_len' >= 1")
    arrival = d.get("arrival_s")
    if arrival is not None and (not isinstance(arrival, (int, float)) or isinstance(arrival, bool)
                                or not math.isfinite(arrival) or arrival < 0):
        raise ValueError(f"{where}: arrival_s must be a number >= 0")
    return BenchRequest(ids or text.sample(rng, 1), out, None if arrival is None else float(arrival))


def is_trace(spec: str) -> bool:
    """A workload name wins over a file of the same name; anything else must be an existing trace file."""
    if spec in WORKLOADS:
        return False
    if not os.path.isfile(spec):
        raise ValueError(f"unknown workload {spec!r}: choose one of {', '.join(WORKLOADS)} or a JSONL trace file")
    return True


def lengths_for(name: str, prompt: int | None = None, output: int | None = None) -> Lengths:
    """The named workload's mean lengths, either overridden."""
    base = DEFAULT_LENGTHS[name]
    return Lengths(prompt or base.prompt, output or base.output)


# ---- limits ----------------------------------------------------------------------------------------------------
def fit_to_model_len(reqs: list[BenchRequest], max_model_len: int | None) -> int:
    """Clip prompt + output to max_model_len: the prompt's tail goes first (a shared prefix survives), then the
    output. Returns how many requests were clipped."""
    if not max_model_len:
        return 0
    if max_model_len < 2:
        raise ValueError("max_model_len must be >= 2")
    clipped = 0
    for r in reqs:
        if len(r.prompt_ids) + r.output_len <= max_model_len:
            continue
        clipped += 1
        r.prompt_ids = r.prompt_ids[:max(1, max_model_len - r.output_len)]
        r.output_len = min(r.output_len, max_model_len - len(r.prompt_ids))
    return clipped
