"""One command for a CUDA machine (torch + transformers + the xgrammar wheel, no network): does speculative
decoding keep its promises on CUDA? CI covers only CPU.

    python bench/gpu_check_spec.py            # well under a minute; one line per check, exits 1 on a failure
    python bench/gpu_check_spec.py cpu        # the same checks on CPU (a dry run of the script itself)

Checks, for the ngram method and a draft model (the demo model drafting for itself), on the demo model:
1. greedy and seeded outputs (token ids, text, finish reason) equal the engine's without speculation, with n = 2,
   stop strings, penalties, a JSON schema and queueing (max_num_seqs 4), and proposals were verified;
2. no KV block in use afterwards, and the spec_decode counters are consistent (accepted <= draft tokens,
   per-position counts non-increasing and summing to accepted);
3. unseeded sampling with the draft model (rejection sampling on the device) runs and ends cleanly.
"""
from __future__ import annotations

import sys

from conveyor import LLM, SamplingParams

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
failures: list[str] = []
PROMPTS = ["one two three four five six seven eight one two three four five six seven eight one two three",
           "the cat sat on the mat and the cat sat on the mat and the cat", "a b a b a b a b", "hello"]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}
PARAMS = [SamplingParams(max_tokens=40, temperature=0),
          SamplingParams(max_tokens=40, temperature=0.8, seed=7, top_k=20, n=2),
          SamplingParams(max_tokens=40, temperature=0, stop=["the"], repetition_penalty=1.2, presence_penalty=0.3),
          SamplingParams(max_tokens=40, temperature=0.9, seed=3, min_p=0.05, logprobs=2),
          SamplingParams(max_tokens=40, temperature=0, structured_outputs={"json": SCHEMA})]


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def outputs(llm: LLM) -> list:
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
            for sp in PARAMS for o in llm.generate(PROMPTS * 2, sp)]


def main() -> None:
    common = dict(device=DEVICE, seed=0, max_num_seqs=4, block_size=4)
    want = outputs(LLM("demo", **common))
    for spec in ({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 1000},
                 {"model": "demo", "num_speculative_tokens": 3, "disable_by_batch_size": 1000}):
        name = spec.get("method") or "draft"
        llm = LLM("demo", **common, speculative_config=spec)
        got = outputs(llm)
        st = llm.stats()
        check(f"{name}: identical greedy and seeded outputs", got == want,
              f"({sum(a != b for a, b in zip(got, want))} of {len(want)} differ)")
        check(f"{name}: proposals verified", st["spec_decode_num_draft_tokens"] > 0,
              f"(drafts {st['spec_decode_num_drafts']}, acceptance {st['spec_decode_acceptance_rate']:.2f})")
        per_pos = st["spec_decode_num_accepted_tokens_per_pos"]
        check(f"{name}: counters consistent", st["spec_decode_num_accepted_tokens"] <= st["spec_decode_num_draft_tokens"]
              and per_pos == sorted(per_pos, reverse=True) and sum(per_pos) == st["spec_decode_num_accepted_tokens"])
        check(f"{name}: no KV block in use", st["kv_blocks_in_use"] == 0, f"({st['kv_blocks_in_use']})")
    llm = LLM("demo", **common, speculative_config={"model": "demo", "num_speculative_tokens": 3,
                                                    "disable_by_batch_size": 1000})
    outs = llm.generate(PROMPTS * 4, SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9))
    check("draft: unseeded rejection sampling ends cleanly", all(o.outputs[0].finish_reason for o in outs)
          and llm.stats()["kv_blocks_in_use"] == 0 and llm.stats()["spec_decode_num_draft_tokens"] > 0)
    print("all passed" if not failures else f"{len(failures)} failed: {', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
