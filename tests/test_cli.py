from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from server_process import ServerProcess

from conveyor.autoscale.signals import GAUGES as SIGNAL_GAUGES
from conveyor.autoscale.signals import parse as parse_signals
from conveyor.bench.scrape import GAUGES as BENCH_GAUGES
from conveyor.bench.scrape import parse_gauges
from conveyor import SamplingParams
from conveyor.cli import build_llm, build_parser, engine_kwargs, main
from conveyor.gateway.picker import _SCRAPED
from conveyor.prometheus_text import sum_by_name
from conveyor.vllm_flags import load_chat_template


def test_generate_prints_json_outputs(capsys):
    rc = main(["generate", "--model", "demo", "--prompt", "Hello", "--prompt", "Hi there", "--max-tokens", "5",
               "--ignore-eos", "--json", "--block-size", "8", "--max-num-seqs", "4"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["prompt"] for d in lines] == ["Hello", "Hi there"]
    assert all(len(d["token_ids"]) == 5 and d["finish_reason"] == "length" for d in lines)


def test_generate_rejects_bad_input_with_a_message(capsys):
    rc = main(["generate", "--model", "demo", "--prompt", "x", "--max-tokens", "100000"])
    assert rc == 2
    assert "maximum length" in capsys.readouterr().err


def test_console_script_chat_mode_runs():
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "generate", "--model", "demo", "--chat", "--prompt", "Hi",
                          "--max-tokens", "4", "--temperature", "0.7", "--sampling-seed", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--- prompt: 'Hi' [0]" in out.stdout


# ---- vLLM's command line ------------------------------------------------------------------------------------------
def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_vllm_flag_names_map_onto_the_engine():
    a = parse("demo", "--num-gpu-blocks-override", "96", "--kv-cache-memory-bytes", "12345", "-tp", "1",
              "--pipeline-parallel-size", "1", "--enable-chunked-prefill", "--trust-remote-code", "--enforce-eager",
              "--revision", "r1", "--served-model-name", "alpha", "beta", "--disable-log-requests",
              "--disable-log-stats", "--kv-cache-dtype", "auto", "--cpu-offload-gb=0", "-dp", "1")
    kw = engine_kwargs(a)
    assert (kw["model"], kw["num_kv_blocks"], kw["kv_cache_memory"], kw["revision"]) == ("demo", 96, 12345, "r1")
    assert a.served_model_name == ["alpha", "beta"] and a.log_requests is False
    assert parse("--kv-cache-memory", "7", "--num-kv-blocks", "3").kv_cache_memory == 7  # Conveyor's names stay
    assert parse("--enable-log-requests").log_requests and parse().log_requests
    assert not parse("--no-enable-log-requests").log_requests
    sizes = parse("--max-model-len", "32k", "--kv-cache-memory-bytes", "8G")
    assert (sizes.max_model_len, sizes.kv_cache_memory) == (32000, 8 << 30)  # vLLM's human-readable integers
    assert parse("--max-model-len", "25.6k").max_model_len == 25600
    assert parse("--max-model-len", "2K").max_model_len == 2048
    assert engine_kwargs(parse("x.gguf", "--quantization", "gguf"))["quantization"] is None  # a GGUF's own formats
    assert engine_kwargs(parse("demo", "-q", "int8"))["quantization"] == "int8"


@pytest.mark.parametrize("argv, words", [
    (["--enable-lora"], "--enable-lora is not supported by Conveyor: LoRA"),
    (["--kv-transfer-config={}"], "--kv-transfer-config is not supported"),
    (["-dp", "2"], "-dp 2 is not supported"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype is not supported by Conveyor: the KV cache is kept in"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 is not supported: Conveyor runs a model on one"),
    (["-pp", "4"], "-pp 4 is not supported"),
])
def test_unsupported_vllm_flags_are_refused_by_name_in_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "demo", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, words", [
    (["--no-enable-chunked-prefill"], "--no-enable-chunked-prefill is not supported"),
    (["--quantization", "awq"], "--quantization awq is not supported"),
    (["--quantization", "gguf"], "--quantization gguf needs a GGUF model"),
    (["--chat-template", "/no/such/template.jinja"], "no such file"),
    (["--chat-template", "{% for m in messages %}"], "--chat-template does not parse"),
])
def test_flag_values_conveyor_cannot_honour_are_one_error_line(capsys, argv, words):
    assert main(["generate", "--model", "demo", "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, words", [
    (["--port", "99999"], "--port 99999: must be in [0, 65535]"),
    (["--port", "-1"], "--port -1: must be in [0, 65535]"),
    (["--block-size", "-1"], "--block-size -1: must be in [1, 256]"),
    (["--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override 0: must be >= 1"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization 0.0: must be in (0, 1]"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization nan"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0: must be >= 1"),
    (["--max-model-len", "0"], "--max-model-len 0: must be >= 1"),
    (["--swap-space", "-1"], "--swap-space -1.0: must be >= 0"),
    (["--max-waiting-requests", "-1"], "--max-waiting-requests -1: must be >= 1"),
    (["--max-body-bytes", "0"], "--max-body-bytes 0: must be >= 1"),
    (["--request-read-timeout", "0"], "--request-read-timeout 0.0: must be > 0"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1.0: must be >= 0"),
    (["--seed", str(1 << 64)], "--seed 18446744073709551616: must be in"),
    # vLLM's flags for what Conveyor always does: other values are refused by name
    (["--tool-call-parser", "mistral"], "--tool-call-parser mistral is not supported: Conveyor parses Hermes-style"),
    (["--guided-decoding-backend", "outlines"], "--guided-decoding-backend outlines is not supported"),
    (["--structured-outputs-config", '{"backend": "guidance"}'], "backend guidance is not supported"),
    (["--structured-outputs-config", '{"disable_fallback": true}'], "disable_fallback is not supported"),
    (["--structured-outputs-config", "xgrammar"], "--structured-outputs-config must be a JSON object"),
    (["--max-logprobs", "21"], "--max-logprobs 21: must be in [0, 20]"),
    (["--generation-config", "auto"], "--generation-config auto is not supported"),
])
def test_out_of_range_and_unhonourable_values_are_refused_while_parsing(capsys, argv, words):
    """One line, exit 2, before any model loads (--port 99999 used to load the model and die in bind())."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--model", "demo", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_gateway_port_is_checked_too(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--config", "g.yaml", "--port", "70000"])
    assert "--port 70000: must be in [0, 65535]" in capsys.readouterr().err


def test_vllm_flags_for_what_conveyor_does_are_accepted():
    a = parse("demo", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--guided-decoding-backend",
              "xgrammar", "--structured-outputs-config", '{"backend": "auto"}', "--max-logprobs", "5",
              "--generation-config", "vllm", "--port", "65535", "--gpu-memory-utilization", "1")
    assert (a.enable_auto_tool_choice, a.tool_call_parser, a.port) == (True, "hermes", 65535)
    assert engine_kwargs(a)["max_logprobs"] == 5
    assert parse().max_logprobs == 20


def test_max_logprobs_is_enforced():
    llm = build_llm(parse("demo", "--max-logprobs", "2", "--num-kv-blocks", "32", "--device", "cpu"))
    assert len(llm.generate("hi", SamplingParams(max_tokens=2, logprobs=2))[0].outputs[0].logprobs) == 2
    for kw in ({"logprobs": 3}, {"prompt_logprobs": 3}):
        with pytest.raises(ValueError, match=r"must be in \[0, 2\] \(max_logprobs"):
            llm.generate("hi", SamplingParams(max_tokens=2, **kw))


def test_tokenizer_flag_is_honoured_or_refused(capsys):
    """The demo model has its own tokenizer (--tokenizer was silently ignored); a path that is not there is refused
    before the model loads."""
    assert main(["generate", "--model", "demo", "--prompt", "x", "--tokenizer", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer cannot be used with --model demo" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="no such directory"):
        engine_kwargs(parse("some.gguf", "--tokenizer", "/nonexistent"))
    assert engine_kwargs(parse("some.gguf", "--tokenizer", "org/name"))["tokenizer"] == "org/name"  # a hub id


def test_unknown_flags_and_bad_sizes_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--model", "demo", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    for size in ("1.5G", "12x", "-3"):
        with pytest.raises(SystemExit):
            parse("--max-model-len", size)
        assert "not an integer" in capsys.readouterr().err


def test_chat_template_inline_or_file_and_kv_cache_bytes(tmp_path):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert load_chat_template(template) == template
    (tmp_path / "t.jinja").write_text(template)
    assert load_chat_template(str(tmp_path / "t.jinja")) == template
    llm = build_llm(parse("demo", "--chat-template", str(tmp_path / "t.jinja"), "--kv-cache-memory-bytes",
                          str(40 * 65536), "--device", "cpu"))
    assert llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    assert llm.engine.runner.bytes_per_block == 65536 and llm.engine.kv.pool.num_blocks == 40


@pytest.fixture(scope="module")
def vllm_style_server(tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text("{% for m in messages %}X{{ m['content'] }}{% endfor %}")
    s = ServerProcess("demo", "--served-model-name", "alpha", "beta", "--chat-template", str(template),
                      "--disable-log-requests", "-tp", "1", "--num-gpu-blocks-override", "96",
                      "--enable-chunked-prefill", "--trust-remote-code", default_model=None)
    yield s
    s.stop()


def test_a_vllm_command_line_serves_and_its_metrics_read_as_vllm(vllm_style_server):
    s = vllm_style_server
    client = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.usage.prompt_tokens == 3  # "Xhi" through --chat-template: one token per byte
    client.completions.create(model="alpha", prompt="hello", max_tokens=4, stream=True).response.read()
    text = httpx.get(f"{s.base_url}/metrics").text
    assert s.metric("vllm:num_requests_running", model_name="alpha", engine="0") == 0  # the first served name
    assert s.metric("vllm:request_success_total", model_name="alpha", finished_reason="length") == 2
    assert s.metric("vllm:cache_config_info", num_gpu_blocks="96", block_size="16") == 1
    assert set(sum_by_name(text, _SCRAPED)) == set(_SCRAPED)  # what the gateway's picker reads
    assert set(parse_gauges(text)) == set(BENCH_GAUGES)  # what `bench serve` plots
    scrape = parse_signals(text, "alpha")  # what the autoscaler reads
    assert set(scrape.gauges) == set(SIGNAL_GAUGES.values()) and scrape.finished == 2 and scrape.ttft_buckets
    assert '"event": "request"' not in s.logs()  # --disable-log-requests


def test_the_gateway_and_the_autoscaler_never_import_torch():
    """Building the command line (every subcommand's flags) and the gateway's and autoscaler's modules stay free
    of torch: it would cost each gateway process ~200 MB and long garbage-collection pauses under load."""
    code = ("import sys; from conveyor.cli import build_parser; build_parser(); import conveyor.gateway.app, "
            "conveyor.gateway.workers, conveyor.autoscale.cli; print(sorted(m for m in ('torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_eval_quantization_choices_are_the_engines():
    from conveyor.config import QUANTIZATIONS
    from conveyor.eval.cli import QUANTIZATION_CHOICES

    assert set(QUANTIZATION_CHOICES) == {q for q in QUANTIZATIONS if q}


def test_the_served_gateway_tunes_its_garbage_collector():
    code = ("import gc; from conveyor.gateway.app import GC_THRESHOLDS, tune_gc; tune_gc(); "
            "assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 1000, gc.get_freeze_count()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
