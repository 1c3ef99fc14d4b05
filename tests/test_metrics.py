"""The engine server's Prometheus metrics under vLLM's names, types, labels and buckets, driven by a real demo engine
(no HTTP: conveyor/server/metrics.py is fed as the async engine feeds it, step by step)."""
from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import LLM, SamplingParams
from conveyor.engine.engine import Engine
from conveyor.server.metrics import ServerMetrics, one_two_five_buckets

VLLM_TYPES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:num_requests_swapped": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:request_success": "counter", "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram", "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram", "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:cache_config_info": "gauge", "vllm:lora_requests_info": "gauge",
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return LLM(model="demo", num_kv_blocks=256, max_num_seqs=4, device="cpu").engine


def families(m: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def value(m: ServerMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})


def run(engine: Engine, m: ServerMetrics, until=lambda: False) -> None:
    """Step as the async engine does, feeding the metrics, until idle or until() holds."""
    while engine.has_unfinished_requests() and not until():
        t0 = time.monotonic()
        outs = engine.step()
        m.on_step(engine, outs, time.monotonic() - t0)


def test_vllm_names_types_labels_and_buckets(engine):
    m = ServerMetrics.for_engine(engine, "m")
    fams = families(m)
    for name, kind in VLLM_TYPES.items():
        assert fams[name].type == kind, name
    for f in fams.values():
        for s in f.samples:
            if f.name.startswith("vllm:") and f.name not in ("vllm:cache_config_info", "vllm:lora_requests_info"):
                assert s.labels["model_name"] == "m" and s.labels["engine"] == "0", s
            elif f.name.startswith("conveyor_"):
                assert s.labels["model_name"] == "m", s

    def bounds(name: str) -> list[float]:
        return [float(s.labels["le"]) for s in fams[name].samples if s.name.endswith("_bucket")][:-1]  # no +Inf

    ttft, itl, e2e = (bounds(f"vllm:{n}") for n in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                                    "e2e_request_latency_seconds"))
    assert (len(ttft), ttft[0], ttft[-1]) == (22, 0.001, 2560.0)  # vLLM's bucket lists
    assert (len(itl), itl[0], itl[-1]) == (19, 0.01, 80.0)
    assert (len(e2e), e2e[0], e2e[-1]) == (21, 0.3, 7680.0)
    assert bounds("vllm:time_per_output_token_seconds") == itl
    assert bounds("vllm:request_prompt_tokens") == list(one_two_five_buckets(engine.max_model_len))
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    info = fams["vllm:cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "256"
    assert info.labels["enable_prefix_caching"] == "True" and info.labels["engine"] == "0"
    lora = fams["vllm:lora_requests_info"].samples[0]
    assert lora.labels == {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    success = {s.labels["finished_reason"]: s.value for s in fams["vllm:request_success"].samples}
    assert success == {"stop": 0, "length": 0, "abort": 0, "error": 0}  # every reason exists from the start


def test_running_and_waiting_count_requests_not_sequences(engine):
    m = ServerMetrics.for_engine(engine, "m")
    engine.add_request("n3", [1, 2, 3, 4], SamplingParams(n=3, max_tokens=8, ignore_eos=True, temperature=1, seed=1))
    engine.add_request("one", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True))
    for i in range(3):
        engine.add_request(f"wait{i}", [7, 8, 9], SamplingParams(max_tokens=8, ignore_eos=True))
    run(engine, m, until=lambda: len(engine.scheduler.running) == 4)  # n3's three samples + one: max_num_seqs
    assert value(m, "vllm:num_requests_running") == 2
    assert value(m, "vllm:num_requests_waiting") == 3
    assert m.registry.get_sample_value("conveyor_slots_used_ratio", {"model_name": "m"}) == 1.0  # slots: sequences
    run(engine, m)
    assert value(m, "vllm:num_requests_running") == value(m, "vllm:num_requests_waiting") == 0
    assert value(m, "vllm:request_success_total", finished_reason="length") == 5  # one per request


def test_token_counters_and_histograms_follow_vllm(engine):
    m = ServerMetrics.for_engine(engine, "m")
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    engine.add_request("a", prompts[0], SamplingParams(n=2, max_tokens=6, ignore_eos=True, temperature=1, seed=2))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=4, ignore_eos=True))
    run(engine, m)
    # prompt tokens once per request (vLLM counts them when the prefill is done), generated ones per sample
    assert value(m, "vllm:prompt_tokens_total") == 8
    assert value(m, "vllm:generation_tokens_total") == 2 * 6 + 4
    assert value(m, "vllm:iteration_tokens_total_sum") == 8 + 16  # the same tokens, step by step
    assert value(m, "vllm:request_prompt_tokens_sum") == 8 and value(m, "vllm:request_prompt_tokens_count") == 2
    assert value(m, "vllm:request_generation_tokens_sum") == 16
    assert value(m, "vllm:request_max_num_generation_tokens_sum") == 6 + 4  # the longest sample of each
    assert value(m, "vllm:time_to_first_token_seconds_count") == 2
    assert value(m, "vllm:inter_token_latency_seconds_count") == value(m, "vllm:time_per_output_token_seconds_count")
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_decode_time",
                 "request_inference_time", "request_time_per_output_token"):
        assert value(m, f"vllm:{name}_seconds_count") == 2, name
    e2e, parts = value(m, "vllm:e2e_request_latency_seconds_sum"), value(m, "vllm:request_queue_time_seconds_sum")
    parts += value(m, "vllm:request_prefill_time_seconds_sum") + value(m, "vllm:request_decode_time_seconds_sum")
    assert parts == pytest.approx(e2e)  # the phases add up to the whole
    assert value(m, "vllm:request_success_total", finished_reason="length") == 2


def test_abort_before_the_first_token(engine):
    m = ServerMetrics.for_engine(engine, "m")
    engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=4))
    m.on_step(engine, [engine.abort_request("gone")], None)
    assert value(m, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(m, "vllm:prompt_tokens_total") == 0  # never prefilled
    assert value(m, "vllm:kv_cache_usage_perc") == value(m, "vllm:gpu_cache_usage_perc") == 0
    assert value(m, "vllm:e2e_request_latency_seconds_count") == 1
    assert value(m, "vllm:request_queue_time_seconds_count") == 0  # it was never scheduled
