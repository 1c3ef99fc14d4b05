"""Speculative decoding attacked as a user would: a server with speculation answers exactly as one without (text,
finish_reason, usage) for stop strings that straddle accepted runs, seeded n > 1 and streaming, survives clients that
leave mid-stream, and its counters stay consistent. The last tests are faults found this way (issue 14), fixed."""
from __future__ import annotations

import asyncio
import json
import shutil
import tracemalloc
from collections import Counter

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conveyor import LLM, SamplingParams
from conveyor.engine.spec_decode import NgramIndex
from conveyor.model.demo import DEMO_CONFIG, demo_tokenizer
from conveyor.prometheus_text import samples
from conveyor.sampling_params import StructuredOutputsParams as SO
from server_process import ServerProcess, wait_until

ALPHA = 1e-3
PROMPT = "hello hello hello "
SELF_DRAFT = {"model": "demo", "num_speculative_tokens": 4, "disable_by_batch_size": 1000}  # every proposal right


@pytest.fixture(scope="module")
def servers():
    """(without speculation, with the target as its own draft): same flags otherwise."""
    args = ("--max-model-len", "128", "--num-gpu-blocks-override", "64", "--block-size", "4")
    base = ServerProcess(*args)
    try:
        spec = ServerProcess(*args, "--speculative-config", json.dumps(SELF_DRAFT))
    except BaseException:
        base.stop()
        raise
    yield base, spec
    spec.stop()
    base.stop()


def complete(server: ServerProcess, body: dict) -> tuple:
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": "demo", "prompt": PROMPT, **body}, timeout=60)
    assert r.status_code == 200, r.text
    j = r.json()
    return [(c["text"], c["finish_reason"]) for c in j["choices"]], j["usage"]


def stream(server: ServerProcess, body: dict) -> tuple:
    text, finish, usage = "", None, None
    with httpx.stream("POST", f"{server.base_url}/v1/completions", timeout=60,
                      json={"model": "demo", "prompt": PROMPT, "stream": True,
                            "stream_options": {"include_usage": True}, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                j = json.loads(line[6:])
                for c in j["choices"]:
                    text, finish = text + c["text"], c["finish_reason"] or finish
                usage = j.get("usage") or usage
    return text, finish, usage


def test_stops_straddling_accepted_runs_seeded_n_and_streams_match(servers):
    base, spec = servers
    greedy = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
    text = complete(base, greedy)[0][0][0]
    for i in range(1, 30, 4):  # stop strings that begin inside one accepted run and end in the next
        for body in ({**greedy, "stop": [text[i:i + 5]]},
                     {**greedy, "stop": [text[i:i + 3], "zz"], "include_stop_str_in_output": True}):
            assert complete(spec, body) == complete(base, body), body
    for body in ({"temperature": 0.9, "seed": 7, "n": 3, "max_tokens": 24, "stop": ["gG"]},
                 {"temperature": 1.0, "seed": 0, "max_tokens": 30, "top_k": 5, "min_tokens": 20}):
        assert complete(spec, body) == complete(base, body), body
    body = {**greedy, "stop": [text[9:13]]}
    assert stream(spec, body) == stream(base, body)


def spec_counters(server: ServerProcess) -> tuple[dict[str, float], list[float]]:
    values, per_pos = {}, {}
    for s in samples(httpx.get(f"{server.base_url}/metrics", timeout=5).text):
        if s.name.startswith("vllm:spec_decode_") and "position" in s.labels:
            per_pos[int(s.labels["position"])] = s.value
        elif s.name.startswith(("vllm:spec_decode_", "vllm:kv_cache_usage_perc", "vllm:num_requests_")):
            values[s.name] = s.value
    return values, [per_pos[i] for i in sorted(per_pos)]


def test_clients_leaving_mid_stream_leave_nothing_behind(servers):
    _, spec = servers

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "demo", "prompt": PROMPT * (1 + i % 3), "max_tokens": 60, "stream": True,
                "temperature": 0.8, "seed": i, "n": 1 + i % 2, "ignore_eos": True}
        async with client.stream("POST", f"{spec.base_url}/v1/completions", json=body) as r:
            lines = 0
            async for _ in r.aiter_lines():
                lines += 1
                if lines > i % 5:
                    return

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*[leave_early(client, i) for i in range(16)])

    asyncio.run(storm())

    def idle() -> bool:
        v, _ = spec_counters(spec)
        return (v["vllm:kv_cache_usage_perc"], v["vllm:num_requests_running"], v["vllm:num_requests_waiting"]) \
            == (0.0, 0.0, 0.0)

    wait_until(idle, what="no request running and no KV block in use")
    v, per_pos = spec_counters(spec)
    drafted, accepted = v["vllm:spec_decode_num_draft_tokens_total"], v["vllm:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted == drafted  # the target is its own draft: every verified proposal is accepted
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    assert httpx.get(f"{spec.base_url}/health", timeout=5).status_code == 200


# ---- faults found (fixed; each test failed before its fix) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_draft(tmp_path_factory):
    """A smaller draft with the demo's vocabulary and other weights: its distributions differ from the target's."""
    path = tmp_path_factory.mktemp("demo_draft")
    torch.manual_seed(99)
    cfg = {k: v for k, v in DEMO_CONFIG.items() if k not in ("model_type", "torch_dtype")}
    config = LlamaConfig(**{**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.15})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    demo_tokenizer().save_pretrained(path)
    return str(path)


def two_sample_pvalue(a: Counter, b: Counter) -> float:
    """p-value of Pearson's chi-squared test that two samples of outcomes come from one distribution (a 2 x cells
    contingency table; df = cells - 1; the survival function via torch.special.gammaincc)."""
    cells = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for c in cells:
        total = a[c] + b[c]
        for n, obs in ((na, a[c]), (nb, b[c])):
            expected = total * n / (na + nb)
            stat += (obs - expected) ** 2 / expected
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_draft_sampling_under_a_grammar_that_may_end_early_follows_the_target(demo_draft):
    # "a" may end or go on to "ab" / "abc": the draft often proposes the end, which is cut instead of verified
    params = SamplingParams(temperature=2.0, n=50, max_tokens=8, structured_outputs=SO(choice=["a", "ab", "abc"]))
    spec = {"model": demo_draft, "num_speculative_tokens": 3, "disable_by_batch_size": 1000}
    counts = []
    for config in (None, spec):
        llm = LLM(model="demo", speculative_config=config)
        torch.manual_seed(0)  # unseeded draws use the global generator: the same verdict on every run
        counts.append(Counter(c.text for o in llm.generate([PROMPT] * 16, params) for c in o.outputs))
    assert two_sample_pvalue(*counts) > ALPHA, counts


def broken_draft(kind: str, demo_draft: str, tmp_path) -> str:
    """A draft that cannot load: a hub name not in the cache (no network here), a checkpoint directory without
    weights, one whose safetensors file is cut short."""
    if kind == "hub name":
        return "no-such-org/no-such-draft"
    shutil.copytree(demo_draft, tmp_path / kind)
    weights = tmp_path / kind / "model.safetensors"
    if kind == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    return str(tmp_path / kind)


@pytest.mark.parametrize("kind", ["hub name", "no weights", "truncated weights"])
def test_a_draft_model_that_cannot_load_is_a_value_error(kind, demo_draft, tmp_path):
    model = broken_draft(kind, demo_draft, tmp_path)
    with pytest.raises(ValueError, match="draft model"):
        LLM(model="demo", speculative_config={"model": model, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="could not be loaded|no such file"):  # the target model alike
        LLM(model=model)


def test_ngram_index_memory_grows_linearly_in_prompt_lookup_max():
    tokens = torch.randint(0, 49152, (2000,), generator=torch.Generator().manual_seed(0)).tolist()

    def bytes_per_ngram(n_max: int) -> float:
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            index = NgramIndex(1, n_max)
            index.propose(tokens, 5)
            return (tracemalloc.get_traced_memory()[0] - before) / (len(tokens) * n_max)
        finally:
            if started:
                tracemalloc.stop()

    # each (position, length) entry should cost about the same whatever its length (now: 115 B at 8, 326 B at 64)
    small, large = bytes_per_ngram(8), bytes_per_ngram(64)
    assert large < 1.5 * small, (small, large)
