"""The step cost model behind speculative decoding's adaptive policy (conveyor.engine.spec_decode.SpecPolicy): the
time of one target forward as a function of its tokens, for N decodes and for one or four sequences verifying k
proposals each. A fit of time = a + b * tokens over the decode batches gives a / b, the batch at which a step's
per-token cost equals its fixed cost (the policy's break-even batch, disable_by_batch_size / 4).

    .venv/bin/python bench/spec_step_cost.py [--model smollm2-135m-instruct] [--context 300] [--repeats 7]

Each time is the minimum over --repeats forwards (the machine is shared and noisy), with the CPU time of this
process over the whole run in % of all cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conveyor import LLM, SamplingParams  # noqa: E402
from conveyor.engine.scheduler import ScheduledSeq  # noqa: E402
from conveyor.engine.sequence import Sequence  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=300, help="tokens already in each sequence's KV cache")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    eng = LLM(a.model).engine
    ids = (eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (a.context // 8 + 1)))[:a.context]
    seqs = []
    for i in range(32):
        s = Sequence(f"r{i}", 0, list(ids), len(ids), SamplingParams(max_tokens=64), 64)
        assert eng.kv.allocate_slots(s, len(ids) + 16)
        s.num_computed_tokens = len(ids) - 1
        seqs.append(s)

    def ms(batch: list[ScheduledSeq]) -> float:
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            eng.runner.execute(batch)
            best = min(best, time.perf_counter() - t0)
        return best * 1000

    wall0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    decode = {n: ms([ScheduledSeq(s, 1) for s in seqs[:n]]) for n in (1, 2, 4, 8, 16, 32)}
    for n, t in decode.items():
        print(f"decode  batch {n:2d}: {t:6.1f} ms  ({t / n:5.1f} ms/token)")
    for width in (1, 4):
        for k in (1, 2, 4, 8):
            batch = [ScheduledSeq(s, 1, num_spec_slots=k, spec_token_ids=[ids[0]] * k) for s in seqs[:width]]
            print(f"verify  {width} seq x (1 + {k}) tokens: {ms(batch):6.1f} ms")
    xs, ys = list(decode), list(decode.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - b * mx
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    busy = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (time.perf_counter() - wall0)
    print(f"fit: {fixed:.1f} ms + {b:.2f} ms/token -> break-even batch a/b = {fixed / b:.1f}")
    print(f"CPU: {100 * busy / os.cpu_count():.0f} % of {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
