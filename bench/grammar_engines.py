"""Compare the grammar engines that could back structured outputs: xgrammar, llguidance and outlines-core.

For each engine and each tokenizer (the demo model's 262-token byte vocabulary and SmolLM2's 49,152 tokens) it prints
the time to compile a few JSON schemas and a regex into something that yields token masks, the time per token to
compute a mask while walking a valid output, and which constraint kinds the engine takes (JSON schema, regex, choice,
EBNF, any JSON). Compilation is timed cold (each engine's own caches cleared or bypassed).

    .venv/bin/python bench/grammar_engines.py [--skip-smollm2] [--repeat 3]

SmolLM2's tokenizer comes from the built-in model's cache (fetched once by conveyor.model.builtin). llguidance and
outlines-core are not dependencies: `.venv/bin/pip install llguidance outlines-core` first. setup_ms includes
importing the engine's package (and, for llguidance, its Hugging Face tokenizer bridge) the first time.

Recorded (2026-12-07, 2-core VM (AMD EPYC with AVX-512 bf16), load ~3 from other jobs; xgrammar 0.2.9,
llguidance 1.9.1, outlines-core 0.2.14; compile times in ms, mask times in us per token):

    tokenizer  engine         json:person  json:order  json:nested  regex  mask median  mask p99  EBNF  any JSON
    demo       xgrammar           0.5         0.8          0.4       0.1       0.9         6.6     yes    yes
    demo       llguidance         0.4         0.8          0.7       0.7      10.1        86.8     yes    yes
    demo       outlines-core      2.7         6.1          3.5       FAIL      0.3         6.8     no     no
    smollm2    xgrammar           5.5         9.9          0.5      10.0       1.4        27.2     yes    yes
    smollm2    llguidance         0.4         0.8          0.9       0.8      17.1       515.9     yes    yes
    smollm2    outlines-core     72.4       157.7         25.8       FAIL      0.4        70.2     no     no

outlines-core's FAIL: its index for `[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{1,2})?` rejects the valid "Widget 42.5" (as
it does `[0-9]{1,3}(\.[0-9])?` for "42.5"). xgrammar was chosen: every kind, the cheapest masks by an order of
magnitude (llguidance compiles lazily, so its cost moves into the masks), compilation cached by the engine."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Tokyo", "Lima"]}}, "required": ["name", "age", "city"],
        "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty"]}},
        "paid": {"type": "boolean"}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["id", "items", "paid"]},
    "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
               "properties": {"c": {"type": "array", "items": {"type": "string", "format": "date"}}}}}}}},
}
SAMPLES = {
    "person": {"name": "Ada Lovelace", "age": 36, "city": "Lima"},
    "order": {"id": "ABC-1234", "items": [{"sku": "X1", "qty": 2, "price": 9.5}, {"sku": "Y22", "qty": 1}],
              "paid": True, "note": None},
    "nested": {"a": {"b": {"c": ["2024-01-02", "2025-12-31"]}}},
}
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3}(\.[0-9]{1,2})?"
REGEX_SAMPLE = "Widget 42.5"
EBNF_GBNF = 'root ::= "yes" | "no" | "maybe"'


def ms(f: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median wall time of f() in ms over repeat runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=eos)
        self.vocab_size = vocab_size

    def _compiler(self):
        return self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile_json(self, schema):
        return self._compiler().compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                      separators=(",", ":"))

    def compile_regex(self, regex):
        return self._compiler().compile_regex(regex)

    def compile_ebnf(self, gbnf):
        return self._compiler().compile_grammar(gbnf)

    def compile_any_json(self):
        return self._compiler().compile_builtin_json_grammar()

    def walk(self, compiled, ids: list[int]) -> list[float]:
        m = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), t
        return times


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.gbnf_to_lark
        import llguidance.hf
        import llguidance.torch
        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size, eos_token=eos[0])
        self.vocab_size = vocab_size

    def _matcher(self, grammar: str):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def compile_json(self, schema):
        return self._matcher(self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}))

    def compile_regex(self, regex):
        return self._matcher(self.ll.LLMatcher.grammar_from_regex(regex))

    def compile_ebnf(self, gbnf):
        return self._matcher(self.ll.LLMatcher.grammar_from_lark(self.ll.gbnf_to_lark.gbnf_to_lark(gbnf)))

    def compile_any_json(self):
        return self._matcher(self.ll.LLMatcher.grammar_from_json_schema({"type": "object"}))

    def walk(self, m, ids: list[int]) -> list[float]:
        mask = self.ll.torch.allocate_token_bitmask(1, self.tok.vocab_size)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            self.ll.torch.fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), (t, m.get_error())
        return times


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab_size: int, eos: list[int]) -> None:
        import outlines_core
        self.oc = outlines_core
        words: dict[bytes, list[int]] = {}
        for i in range(len(tok)):
            if i in eos:
                continue
            raw = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
            words.setdefault(raw.encode(), []).append(i)
        words.pop(b"", None)
        self.vocab = outlines_core.Vocabulary(eos[0], words)
        self.vocab_size = vocab_size

    def compile_json(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def compile_regex(self, regex):
        return self.oc.Index(regex, self.vocab)

    def compile_ebnf(self, gbnf):
        raise NotImplementedError("outlines-core has no context-free grammars (regular languages only)")

    def compile_any_json(self):
        raise NotImplementedError("outlines-core has no unbounded JSON (a regex cannot nest)")

    def walk(self, index, ids: list[int]) -> list[float]:
        g = self.oc.Guide(index)
        mask = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            times.append(time.perf_counter() - t0)
            g.advance(t)
        return times


def tokenizers(skip_smollm2: bool):
    from conveyor.model import demo
    yield "demo", demo.demo_tokenizer(), demo.DEMO_CONFIG["vocab_size"], demo.DEMO_CONFIG["eos_token_id"]
    if skip_smollm2:
        return
    from conveyor.model import builtin, gguf_loader
    ckpt = gguf_loader.open_gguf(builtin.resolve_builtin(builtin.DEFAULT_MODEL))
    tok = gguf_loader.load_gguf_tokenizer(ckpt, builtin.cache_dir())
    yield "smollm2", tok, ckpt.hf_config["vocab_size"], [tok.eos_token_id]


def run_engine(cls, tok, vocab_size: int, eos: list[int], repeat: int) -> dict:
    """One engine on one tokenizer: compile times (ms), mask times (us) and support, failures recorded per cell."""
    t0 = time.perf_counter()
    eng = cls(tok, vocab_size, eos)
    row: dict[str, object] = {"engine": cls.name, "setup_ms": (time.perf_counter() - t0) * 1e3}
    masks: list[float] = []
    cases = [(f"json:{n}", lambda s=s: eng.compile_json(s), json.dumps(SAMPLES[n], separators=(",", ":")))
             for n, s in SCHEMAS.items()] + [("regex", lambda: eng.compile_regex(REGEX), REGEX_SAMPLE)]
    for name, compile_, sample in cases:
        try:
            row[f"{name}_ms"], _ = ms(compile_, repeat)
            masks += eng.walk(compile_(), tok.encode(sample))  # a fresh one: llguidance's matcher is stateful
        except Exception as e:  # a grammar it cannot compile, or a valid output it rejects
            row[name] = f"FAIL({type(e).__name__}: {str(e)[:80]})"
    masks_us = sorted(t * 1e6 for t in masks)
    row["mask_us_median"] = statistics.median(masks_us)
    row["mask_us_p99"] = masks_us[int(0.99 * (len(masks_us) - 1))]
    for kind, f in (("ebnf", lambda: eng.compile_ebnf(EBNF_GBNF)), ("any_json", eng.compile_any_json)):
        try:
            f()
            row[kind] = "yes"
        except NotImplementedError:
            row[kind] = "no"
    row["choice"] = "regex" if row["ebnf"] == "no" else "grammar"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for tok_name, tok, vocab_size, eos in tokenizers(args.skip_smollm2):
        print(f"\n== tokenizer {tok_name} (vocab {vocab_size}) ==")
        for cls in (XGrammar, LLGuidance, OutlinesCore):
            try:
                row = run_engine(cls, tok, vocab_size, eos, args.repeat)
            except Exception as e:  # an engine that cannot take a tokenizer or schema is a result, not a crash
                print(f"{cls.name:14s} failed: {type(e).__name__}: {e}"[:300])
                continue
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
