"""What cumulative_logprob costs: the sampler computes every row's sampled-token logprob (one log_softmax and a
gather over the step's [rows, vocab] logits) even when no logprobs were asked for. Runs a batch of greedy requests
without logprobs and reports the share of the engine's step time spent in Sampler._logprobs.

    .venv/bin/python bench/sampler_logprobs.py [--model smollm2-135m-instruct] [--batch 32] [--max-tokens 32] \
        [--quantization none --dtype float32]
"""
from __future__ import annotations

import argparse
import statistics
import time

from conveyor import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="none: dequantize a GGUF's low-bit weights to --dtype")
    args = ap.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization)
    eng = llm.engine
    spent: list[float] = []
    inner = eng.sampler._logprobs

    def timed(*a):
        t = time.perf_counter()
        out = inner(*a)
        spent.append(time.perf_counter() - t)
        return out

    eng.sampler._logprobs = timed  # an instance attribute shadows the method for this run only
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(str(i), f"Question {i}: name a prime number larger than {i}.", params)
    steps: list[float] = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    decode = steps[1:]  # the first step is the batch's prefill
    lp = spent[1:len(steps)]
    print(f"model {eng.model_name}, vocab {eng.vocab_size}, batch {args.batch}, {len(decode)} decode steps")
    print(f"median decode step {statistics.median(decode) * 1e3:.1f} ms, median logprobs "
          f"{statistics.median(lp) * 1e3:.2f} ms, share of decode time {sum(lp) / sum(decode) * 100:.1f} %")


if __name__ == "__main__":
    main()
