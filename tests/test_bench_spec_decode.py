"""bench/spec_decode.py's code path on the demo model with a tiny workload: the result's shape, both configurations
run back to back in alternating order, the speculative engine's statistics, and a bad --speculative-config as one
error line. No timings are checked."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "spec_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_spec_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_on_demo(bench, tmp_path, capsys):
    out = tmp_path / "spec.json"
    result = bench.main(["--model", "demo", "--concurrency", "1,2", "--num-requests", "1,3", "--max-tokens", "6",
                         "--repetitions", "2", "--num-kv-blocks", "256", "--out", str(out)])
    assert json.loads(out.read_text())["cells"] == json.loads(json.dumps(result["cells"]))
    assert result["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4,
                                            "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # repetitions × workloads × concurrencies × configurations
    firsts = [r["config"] for r in rows[::2]]
    assert firsts == ["no-spec"] * 4 + ["spec"] * 4  # the order alternates per repetition
    for r in rows:
        s = r["summary"]
        assert (s["completed"], s["failed"]) == (r["requests"], 0)
        assert 1 <= s["total_output_tokens"] <= 6 * r["requests"]
        assert r["tokens_per_chunk"] >= 1.0 and r["tokens_per_cpu_s"] > 0
        assert 0 <= r["cpu_own_pct"] <= 100 and r["cpu_others_pct"] >= 0
        assert isinstance(r["greedy_mismatches"], int)
        if r["config"] == "no-spec":
            assert r["spec_decode"] is None
        else:  # the engine's counters, as deltas over this run
            d = r["spec_decode"]
            assert 0 <= d["spec_decode_num_accepted_tokens"] <= d["spec_decode_num_draft_tokens"]
            assert len(d["spec_decode_num_accepted_tokens_per_pos"]) == 4
            assert sum(d["spec_decode_num_accepted_tokens_per_pos"]) == d["spec_decode_num_accepted_tokens"]
    cells = result["cells"]
    assert [(x["workload"], x["concurrency"], x["config"]) for x in cells] == [
        (w, c, n) for w in ("grounded", "chat") for c in (1, 2) for n in ("no-spec", "spec")]
    assert all((x["speedup"] is None) == (x["config"] == "no-spec") for x in cells)
    assert result["targets"] and result["targets"][0].startswith("grounded c=1:")
    printed = capsys.readouterr().out
    assert "| grounded | 1 | spec |" in printed and "| chat | 2 | no-spec |" in printed


@pytest.mark.parametrize("flag, message", [
    ('{"method": "ngram"}', "needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 4', "not valid JSON"),
])
def test_bad_speculative_config_is_one_line(bench, capsys, flag, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--speculative-config", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--speculative-config" in err and message in err
