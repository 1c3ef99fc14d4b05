"""Speculative decoding's plumbing: --speculative-config on the command line, LLM(speculative_config=...), and the
vllm:spec_decode_* counters of `conveyor serve` (the engine's own behaviour is tested with the engine)."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from server_process import ServerProcess, wait_until

from conveyor import LLM, SamplingParams
from conveyor.cli import build_parser, engine_kwargs, main
from conveyor.config import SpeculativeConfig
from conveyor.prometheus_text import samples
from conveyor.server.metrics import SPEC_PER_POS, ServerMetrics

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
SPEC_KEYS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
REPEATING = [5, 6, 7, 8, 9] * 6  # every suffix occurred earlier: the n-gram method has proposals from the start


@pytest.mark.parametrize("value, words", [
    ("{method: ngram}", "--speculative-config is not valid JSON"),
    ('"ngram"', "--speculative-config: speculative_config must be a JSON object, got str"),
    ('{"method": "ngram"}', "--speculative-config: speculative_config needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "bogus\\nkey": 1}', "unknown speculative_config keys: bogus"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer in [1, 16]"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be ngram or draft_model, got 'eagle'"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "4"}',
     "prompt_lookup_max must be an integer in [1, 64], got '4'"),
])
def test_bad_speculative_config_is_one_line_and_exit_2(capsys, value, words):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "demo", "--speculative-config", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_the_flag_reaches_the_engine_config():
    a = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--speculative-config",
                                   json.dumps({**NGRAM, "prompt_lookup_max": 5})])
    spec = engine_kwargs(a)["speculative_config"]
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 3, 5, 2)
    assert engine_kwargs(build_parser().parse_args(["serve", "demo"]))["speculative_config"] is None


def test_llm_takes_a_dict_or_a_config_and_refuses_bad_ones():
    assert LLM("demo", device="cpu", speculative_config=NGRAM).engine.config.speculative == SpeculativeConfig(**NGRAM)
    cfg = SpeculativeConfig(num_speculative_tokens=2, method="ngram", prompt_lookup_min=3)
    assert LLM("demo", device="cpu", speculative_config=cfg).engine.config.speculative is cfg
    for bad in ("ngram", {"num_speculative_tokens": 2}, {**NGRAM, "draft": "x"}):
        with pytest.raises(ValueError, match="speculative_config"):
            LLM("demo", device="cpu", speculative_config=bad)


def registry_counts(m: ServerMetrics) -> dict[str, float | list[float]]:
    def value(name: str, **labels: str) -> float:
        return m.registry.get_sample_value(f"vllm:{name}_total", {"model_name": "m", "engine": "0", **labels})

    counts: dict[str, float | list[float]] = {key: value(key) for key in SPEC_KEYS}
    counts[SPEC_PER_POS] = [value(SPEC_PER_POS, position=str(i)) for i in range(NGRAM["num_speculative_tokens"])]
    return counts


def test_counters_follow_the_engine_step_by_step():
    """Fed after every step as the server feeds them, the counters end equal to the engine's cumulative counts;
    without speculation there are no such series."""
    engine = LLM("demo", device="cpu", num_kv_blocks=64, speculative_config=NGRAM).engine
    m = ServerMetrics.for_engine(engine, "m")
    assert registry_counts(m) == {**dict.fromkeys(SPEC_KEYS, 0.0), SPEC_PER_POS: [0.0, 0.0, 0.0]}
    for i in range(2):
        engine.add_request(f"r{i}", REPEATING, SamplingParams(max_tokens=24, ignore_eos=True))
    while engine.has_unfinished_requests():
        t0 = time.monotonic()
        m.on_step(engine, engine.step(), time.monotonic() - t0)
    stats = engine.stats()
    assert stats["spec_decode_num_drafts"] > 0
    assert registry_counts(m) == {key: stats[key] for key in (*SPEC_KEYS, SPEC_PER_POS)}
    plain = ServerMetrics.for_engine(LLM("demo", device="cpu", num_kv_blocks=16).engine, "m")
    assert not [s for s in plain.registry.collect() if s.name.startswith("vllm:spec_decode")]


@pytest.fixture(scope="module")
def spec_server():
    server = ServerProcess("--speculative-config", json.dumps(NGRAM), "--num-gpu-blocks-override", "128")
    yield server
    server.stop()


def spec_metrics(server: ServerProcess) -> dict[str, float]:
    """vllm:spec_decode_* samples by name (per position: name[position])."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    out = {}
    for s in samples(text):
        if s.name.startswith("vllm:spec_decode"):
            assert s.labels["model_name"] == "demo" and s.labels["engine"] == "0", s
            out[s.name + (f"[{s.labels['position']}]" if "position" in s.labels else "")] = s.value
    return out


def test_server_exposes_the_counters_and_they_grow(spec_server):
    before = spec_metrics(spec_server)
    done = spec_server.metric("vllm:request_success_total", finished_reason="length")
    per_pos = [f"vllm:{SPEC_PER_POS}_total[{i}]" for i in range(3)]
    assert set(before) == {*(f"vllm:{k}_total" for k in SPEC_KEYS), *per_pos}
    r = httpx.post(f"{spec_server.base_url}/v1/completions", timeout=60,
                   json={"model": "demo", "prompt": REPEATING, "max_tokens": 24, "ignore_eos": True})
    assert r.status_code == 200, r.text
    # the metrics of the last step are fed after its output is handed over: wait for the request's end to be counted
    wait_until(lambda: spec_server.metric("vllm:request_success_total", finished_reason="length") == done + 1)
    after = spec_metrics(spec_server)
    grew = {k: after[k] - before[k] for k in after}
    assert grew["vllm:spec_decode_num_drafts_total"] > 0
    assert grew["vllm:spec_decode_num_draft_tokens_total"] >= grew["vllm:spec_decode_num_drafts_total"]
    assert grew["vllm:spec_decode_num_accepted_tokens_total"] <= grew["vllm:spec_decode_num_draft_tokens_total"]
    assert sum(grew[k] for k in per_pos) == grew["vllm:spec_decode_num_accepted_tokens_total"]
