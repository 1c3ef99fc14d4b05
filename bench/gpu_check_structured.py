"""One command for a CUDA machine: do structured outputs and logit_bias work on CUDA? CI covers only the CPU path.

    python bench/gpu_check_structured.py         # under a minute; one line per check, exits 1 on a failure
    python bench/gpu_check_structured.py cpu     # the same checks on CPU (a dry run of the script itself)

Needs xgrammar beside torch (the lent machines have no network: carry its wheel, `pip download --no-deps xgrammar`,
and `pip install --no-deps` it there). The grammar bitmask is filled on the host by xgrammar and applied to the
logits on their device (conveyor/engine/structured_output.py: apply_grammar_masks), so this checks that hand-off.

Checks, on the demo model (random weights) placed on the device:
1. json_schema, sampled (temperature 1, n=8): every output parses and validates against the schema.
2. regex and choice, sampled: every output fullmatches / is one of the choices.
3. A mixed batch: the unconstrained neighbour's greedy tokens equal its tokens when run alone.
4. logit_bias +100 forces its token, -100 bans the greedy one.
"""
from __future__ import annotations

import json
import re
import sys

from conveyor import LLM, SamplingParams
from conveyor.sampling_params import StructuredOutputsParams

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tag": {"enum": ["a", "b", "c"]}},
          "required": ["name", "age", "tag"], "additionalProperties": False}
failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def valid(text: str) -> bool:
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"name", "age", "tag"} and isinstance(v["name"], str)
            and len(v["name"]) <= 8 and type(v["age"]) is int and 0 <= v["age"] <= 120 and v["tag"] in "abc")


def constrained(llm: LLM, so: StructuredOutputsParams, n: int = 8) -> list[str]:
    params = SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=64, structured_outputs=so)
    return [c.text for c in llm.generate("x", params)[0].outputs]


def main() -> None:
    llm = LLM(model="demo", device=DEVICE)
    outs = constrained(llm, StructuredOutputsParams(json=SCHEMA))
    check("json_schema sampled", all(valid(t) for t in outs), repr(outs[:2]))
    outs = constrained(llm, StructuredOutputsParams(regex=r"[a-c]{2,5}-[0-9]{1,3}"))
    check("regex sampled", all(re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", t) for t in outs), repr(outs[:3]))
    choices = ["yes", "no", "maybe later"]
    outs = constrained(llm, StructuredOutputsParams(choice=choices))
    check("choice sampled", all(t in choices for t in outs), repr(outs[:3]))

    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = llm.generate("hello", free)[0].outputs[0].token_ids
    mixed = llm.generate(["hello", "x"], [free, SamplingParams(
        temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(json=SCHEMA))])
    check("mixed batch leaves free rows alone", mixed[0].outputs[0].token_ids == alone)

    greedy = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    first = greedy.outputs[0].token_ids[0]
    forced = llm.generate("hello", SamplingParams(temperature=1.0, seed=1, max_tokens=4, ignore_eos=True,
                                                  logit_bias={42: 100.0}))[0].outputs[0].token_ids
    check("logit_bias +100 forces", forced == [42] * 4, repr(forced))
    banned = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                  logit_bias={first: -100.0}))[0].outputs[0].token_ids
    check("logit_bias -100 bans", first not in banned, repr(banned))
    print(f"{DEVICE}: {'all checks passed' if not failures else f'{len(failures)} failed: {failures}'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
