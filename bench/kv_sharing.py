"""KV sharing and scheduling policy benchmarks, each measured side by side with its baseline in one run.

1. shared-prefix: TTFT p50 with prefix caching vs without; hit rate.
2. n=8 samples of a long prompt: peak KV blocks with sharing (one request, n=8) vs without (8 requests, no cache).
3. a KV budget that forces preemption: throughput and p95 latency with swap vs recompute.
4. one long prompt arriving into 64 decoding streams: the decoders' largest inter-token gap with chunked prefill
   vs without.

    .venv/bin/python bench/kv_sharing.py [--model demo] [--quick] [--output bench/results/kv_sharing.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from conveyor import LLM, SamplingParams


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def drive(llm: LLM, requests: list[tuple[float, dict, SamplingParams]]) -> dict:
    """Replay (arrival_s, prompt, params) in real time; per request TTFT and latency, per step token times."""
    eng = llm.engine
    pending = sorted(requests, key=lambda r: r[0])
    t0 = time.perf_counter()
    arrival, first, done, token_times = {}, {}, {}, {}
    i = 0
    while i < len(pending) or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i][0] <= now:
            rid = str(i)
            eng.add_request(rid, pending[i][1], pending[i][2])
            arrival[rid] = now
            i += 1
        outs = eng.step()
        now = time.perf_counter() - t0
        for out in outs:
            if any(c.num_new_tokens for c in out.outputs):
                first.setdefault(out.request_id, now)
                token_times.setdefault(out.request_id, []).append(now)
            if out.finished:
                done[out.request_id] = now
        if not eng.last_step_num_seqs:
            time.sleep(0.0005)
    duration = time.perf_counter() - t0
    ttft = [first[r] - arrival[r] for r in first]
    lat = [done[r] - arrival[r] for r in done]
    return {"duration_s": duration, "ttft": ttft, "latency": lat, "token_times": token_times, "stats": llm.stats()}


def shared_prefix(model: str, n: int, prefix_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    systems = [[rng.randrange(32, 127) for _ in range(prefix_len)] for _ in range(4)]
    reqs = [(0.05 * i, {"prompt_token_ids": rng.choice(systems) + [rng.randrange(32, 127) for _ in range(24)]},
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for i in range(n)]
    res = {}
    for caching in (False, True):
        llm = LLM(model, enable_prefix_caching=caching, max_num_seqs=32)
        r = drive(llm, reqs)
        st = r["stats"]
        res["caching" if caching else "no_caching"] = {
            "ttft_p50_ms": pct(r["ttft"], 50) * 1e3, "ttft_p95_ms": pct(r["ttft"], 95) * 1e3,
            "hit_rate": st["prefix_cache_hits"] / max(1, st["prefix_cache_queries"])}
    return res


def parallel_sampling(model: str, n: int, prompt_len: int, out_len: int) -> dict:
    prompt = {"prompt_token_ids": [32 + (7 * i) % 90 for i in range(prompt_len)]}
    shared = LLM(model, enable_prefix_caching=False)
    shared.generate(prompt, SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=out_len, ignore_eos=True))
    separate = LLM(model, enable_prefix_caching=False)
    separate.generate([prompt] * n, SamplingParams(temperature=1.0, seed=0, max_tokens=out_len, ignore_eos=True))
    bs = shared.engine.kv.block_size
    return {"n": n, "prompt_tokens": prompt_len, "output_tokens": out_len, "block_size": bs,
            "peak_blocks_shared": shared.stats()["kv_blocks_peak"],
            "peak_blocks_unshared": separate.stats()["kv_blocks_peak"],
            "copy_on_write_copies": shared.stats()["num_cow_copies"]}


def preemption(model: str, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    reqs = [(0.0, {"prompt_token_ids": [rng.randrange(32, 127) for _ in range(rng.randint(64, 256))]},
             SamplingParams(temperature=0, max_tokens=rng.randint(64, 192), ignore_eos=True)) for _ in range(n)]
    res = {}
    for mode in ("recompute", "swap"):
        llm = LLM(model, num_kv_blocks=120, max_num_seqs=32, preemption_mode=mode, swap_space=1.0,
                  enable_prefix_caching=False)
        r = drive(llm, reqs)
        st = r["stats"]
        out_tokens = sum(p.max_tokens for _, _, p in reqs)
        res[mode] = {"output_throughput": out_tokens / r["duration_s"], "p95_latency_ms": pct(r["latency"], 95) * 1e3,
                     "preemptions": st["num_preemptions"], "blocks_swapped_out": st["blocks_swapped_out"]}
    return res


def long_prompt_into_decodes(model: str, streams: int, prompt_len: int, budget: int) -> dict:
    res = {}
    for name, kw in (("no_chunking", {"max_num_batched_tokens": prompt_len + streams}),
                     ("chunked", {"max_num_batched_tokens": budget, "long_prefill_token_threshold": budget // 2})):
        llm = LLM(model, max_num_seqs=streams + 1, max_model_len=prompt_len + 256, **kw)
        decoders = [(0.0, {"prompt_token_ids": [40 + i % 50] * 16}, SamplingParams(temperature=0, max_tokens=120,
                                                                                     ignore_eos=True))
                    for i in range(streams)]
        long = (0.3, {"prompt_token_ids": [33 + i % 90 for i in range(prompt_len)]},
                SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        r = drive(llm, decoders + [long])
        gaps = [b - a for rid, ts in r["token_times"].items() if int(rid) < streams for a, b in zip(ts, ts[1:])]
        res[name] = {"max_itl_ms": max(gaps) * 1e3, "p99_itl_ms": pct(gaps, 99) * 1e3,
                     "long_prompt_ttft_ms": r["ttft"][-1] * 1e3 if len(r["ttft"]) > streams else None}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    q = a.quick
    result = {
        "shared_prefix": shared_prefix(a.model, 16 if q else 64, 256 if q else 1024, a.seed),
        "parallel_sampling": parallel_sampling(a.model, 8, 256 if q else 2048, 16 if q else 64),
        "preemption": preemption(a.model, 12 if q else 48, a.seed),
        "long_prompt_into_decodes": long_prompt_into_decodes(a.model, 16 if q else 64, 512 if q else 4096, 512),
        "config": {"model": a.model, "quick": q, "seed": a.seed},
    }
    sp, ps, pr, lp = (result[k] for k in ("shared_prefix", "parallel_sampling", "preemption",
                                           "long_prompt_into_decodes"))
    print(f"shared prefix   TTFT p50 {sp['no_caching']['ttft_p50_ms']:.1f} ms without caching, "
          f"{sp['caching']['ttft_p50_ms']:.1f} ms with ({sp['no_caching']['ttft_p50_ms'] / sp['caching']['ttft_p50_ms']:.2f}x); "
          f"hit rate {sp['caching']['hit_rate']:.1%}")
    print(f"n=8 samples     peak KV blocks {ps['peak_blocks_unshared']} unshared, {ps['peak_blocks_shared']} shared "
          f"({ps['peak_blocks_unshared'] / ps['peak_blocks_shared']:.1f}x less)")
    print(f"preemption      recompute {pr['recompute']['output_throughput']:.0f} tok/s p95 "
          f"{pr['recompute']['p95_latency_ms']:.0f} ms; swap {pr['swap']['output_throughput']:.0f} tok/s p95 "
          f"{pr['swap']['p95_latency_ms']:.0f} ms ({pr['recompute']['preemptions']} / {pr['swap']['preemptions']} "
          f"preemptions)")
    print(f"long prompt     decoders' max ITL {lp['no_chunking']['max_itl_ms']:.0f} ms without chunking, "
          f"{lp['chunked']['max_itl_ms']:.0f} ms with")
    print(json.dumps(result, indent=1))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
