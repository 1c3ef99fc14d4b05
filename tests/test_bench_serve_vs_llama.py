"""bench/serve_vs_llama.py and bench/step_profile.py without servers: argument parsing, the CPU-use, median and
ratio arithmetic on fixed inputs, the profiler-event classifier, and step_profile's --smoke run on the demo model.
No timings are checked."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def svl():
    yield load("serve_vs_llama")
    sys.modules.pop("serve_vs_llama", None)


@pytest.fixture(scope="module")
def prof(svl):
    yield load("step_profile")
    sys.modules.pop("step_profile", None)


# ---- serve_vs_llama --------------------------------------------------------------------------------------------------
def test_parse_args(svl, capsys):
    a = svl.parse_args(["--rounds", "1", "--models", "small-bf16, smollm2-q4_1", "--conveyor-args", "--seed 1"])
    assert (a.rounds, a.models, a.conveyor_args, a.concurrency) == (1, ["small-bf16", "smollm2-q4_1"],
                                                                    ["--seed", "1"], 32)
    assert (svl.parse_args([]).rounds, svl.parse_args([]).limit) == (3, 0)
    for bad in (["--models", "small-bf16,gpt5"], ["--rounds", "0"], ["--models", ","], ["--limit", "-1"]):
        with pytest.raises(SystemExit):
            svl.parse_args(bad)
        assert "error:" in capsys.readouterr().err


def test_proc_stat_line(svl):
    # user nice system idle iowait irq softirq steal
    assert svl.parse_proc_stat_line("cpu  100 5 20 800 30 1 2 3 0 0") == (131.0, 961.0)


def test_cpu_usage(svl):
    a = svl.CpuSnapshot(wall_s=10.0, busy_s=100.0, total_s=200.0, procs_s={"server": 5.0, "client": 1.0})
    b = svl.CpuSnapshot(wall_s=20.0, busy_s=118.0, total_s=220.0, procs_s={"server": 20.0, "client": 2.0})
    use = svl.cpu_usage(a, b, ncpu=2)
    assert use == pytest.approx({"machine": 90.0, "server": 75.0, "client": 5.0, "others": 10.0})
    # the watched processes' counters may run ahead of /proc/stat's: others never goes below zero
    c = svl.CpuSnapshot(wall_s=20.0, busy_s=110.0, total_s=220.0, procs_s={"server": 20.0, "client": 2.0})
    assert svl.cpu_usage(a, c, ncpu=2)["others"] == 0.0
    with pytest.raises(ValueError):
        svl.cpu_usage(b, a, ncpu=2)
    with pytest.raises(ValueError):
        svl.cpu_usage(a, svl.CpuSnapshot(20.0, 118.0, 220.0, {"server": 20.0}), ncpu=2)


def test_pick_window(svl):
    samples = [svl.CpuSnapshot(t, t, 2 * t, {}) for t in (0.0, 0.2, 0.4, 0.6, 0.8)]
    a, b = svl.pick_window(samples, 0.1, 0.7)
    assert (a.wall_s, b.wall_s) == (0.2, 0.6)
    assert svl.pick_window(samples, 0.3, 0.5) is None  # one sample: no window


def run(svl, system: str, tok_s: float, ttft_p99: float, errors: int = 0) -> dict:
    return {"system": system, "output_tok_s": tok_s, "ttft_p50_s": ttft_p99 / 2, "ttft_p99_s": ttft_p99,
            "tpot_p50_s": 0.1, "errors": errors, "len_mismatch": 0,
            "cpu_pct": {"machine": 99.0, "server": 90.0, "client": 5.0, "others": 4.0}}


def test_aggregate_medians_and_ratio(svl):
    runs = [run(svl, "llama-server", 300.0, 10.0), run(svl, "conveyor", 420.0, 8.0),
            run(svl, "llama-server", 330.0, 9.0), run(svl, "conveyor", 400.0, 9.0, errors=1),
            run(svl, "llama-server", 200.0, 12.0), run(svl, "conveyor", 390.0, 7.0)]
    agg = svl.aggregate(runs)
    assert agg["medians"]["llama-server"]["output_tok_s"] == 300.0
    assert agg["medians"]["conveyor"]["output_tok_s"] == 400.0
    assert agg["medians"]["conveyor"]["errors"] == 1 and agg["medians"]["conveyor"]["runs"] == 3
    assert agg["ratio_output_tok_s"] == pytest.approx(400 / 300)
    assert agg["ratio_ttft_p99"] == pytest.approx(8 / 10)
    table = svl.format_table({"small-bf16": agg})
    assert "**1.33x**" in table and "TTFT p99 0.80x" in table
    assert svl.aggregate([run(svl, "conveyor", 1.0, 1.0)])["ratio_output_tok_s"] is None


def test_missing_peers_is_one_clear_error(svl, tmp_path):
    with pytest.raises(FileNotFoundError, match="setup_llama_server.sh"):
        svl.check_inputs(svl.MODELS["small-bf16"], tmp_path)


# ---- step_profile ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain, category", [
    (["aten::mm", "profile.gemm", "profile.forward", "profile.runner", "profile.step"], "decoder GEMMs"),
    (["aten::bmm", "attention", "profile.forward", "profile.runner", "profile.step"], "attention"),
    (["conveyor::paged_attention", "profile.forward", "profile.runner", "profile.step"], "attention"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
      "profile.forward"], "attention"),
    (["aten::silu", "profile.forward", "profile.runner", "profile.step"], "other elementwise ops"),
    (["aten::mm", "profile.lm_head", "profile.runner", "profile.step"], "lm_head"),
    (["aten::index", "profile.runner", "profile.step"], "Python: input preparation"),
    (["profile.scheduler", "profile.step"], "Python: scheduler"),
    (["aten::argmax", "profile.sampler", "profile.step"], "Python: sampler"),
    (["profile.step"], "Python: outputs"),
    (["aten::add"], "between steps"),
])
def test_classify(prof, chain, category):
    assert prof.classify(chain) == category


def test_after_forward(prof):
    assert prof.after_forward(120.0, [50.0, 110.0])
    assert not prof.after_forward(30.0, [50.0])  # input preparation, before the forward
    assert not prof.after_forward(30.0, [])  # no forward in this runner call


def test_steps_cpu_sums_the_steps_alone(prof, svl):
    snap = svl.CpuSnapshot
    pairs = [(snap(0.0, 0.0, 0.0, {"engine": 0.0}), snap(1.0, 1.8, 2.0, {"engine": 1.6})),
             (snap(5.0, 3.0, 10.0, {"engine": 2.0}), snap(6.0, 4.0, 12.0, {"engine": 3.0}))]  # idle gap between
    assert prof.steps_cpu(pairs, ncpu=2) == pytest.approx({"machine": 70.0, "engine": 65.0, "others": 5.0})


def test_step_profile_smoke(prof, tmp_path):
    import inspect

    import conveyor.model.llama as llama

    def attention_fns() -> dict:
        return {n: f for n, f in inspect.getmembers(llama, inspect.isfunction) if prof.is_attention(n)}

    before = attention_fns()
    out = tmp_path / "profile.json"
    (res,) = prof.main(["--smoke", "--output", str(out)])
    assert json.loads(out.read_text())["results"][0]["steps"] == res["steps"] > 0
    assert res["output_tokens"] == sum(r["max_new_tokens"] for r in prof.smoke_workload(6, 256))
    cats = res["categories"]
    assert set(cats) == set(prof.CATEGORIES)
    assert sum(c["share_pct"] for c in cats.values()) == pytest.approx(100.0)
    for c in ("attention", "decoder GEMMs", "lm_head", "other elementwise ops", "Python: sampler"):
        assert cats[c]["ms_per_step"] > 0, c
    assert any(name == "aten::mm" for name, _ in cats["decoder GEMMs"]["top_ops"])
    assert attention_fns() == before  # the instrumentation is undone


def test_step_profile_bad_arguments(prof, capsys):
    with pytest.raises(SystemExit):
        prof.parse_args(["--window", "0"])
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^step_profile: "):
        prof.main(["--smoke", "--attention-backend", "no-such-backend"])
    with pytest.raises(SystemExit, match="^step_profile: .*missing"):
        prof.main(["--workload", "/nonexistent/workload.json"])
