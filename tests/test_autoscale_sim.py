"""The simulator, its trace generator and profile, and the signal scraper's arithmetic."""
from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from conveyor.autoscale import simulate as sim
from conveyor.autoscale import trace as tr
from conveyor.autoscale.cli import format_table
from conveyor.autoscale.policy import PolicyConfig
from conveyor.autoscale.profile import Profile, interpolate
from conveyor.autoscale.signals import parse, quantile_between
from conveyor.cli import main
from conveyor.server.metrics import ServerMetrics


def flat_profile(tpot: float = 0.01, prefill: float = 0.05, startup: float = 5.0, slots: int = 4) -> Profile:
    return Profile(slots, startup, [1, slots], [prefill, prefill], [tpot, tpot], 100.0, 100_000)


def constant(rate: float, seconds: float, prompt: int = 100, output: int = 50) -> list[tr.TraceRequest]:
    return [tr.TraceRequest(i / rate, prompt, output) for i in range(int(rate * seconds))]


def test_interpolation_and_the_measured_profile():
    assert interpolate([1, 3], [10, 30], 2) == 20 and interpolate([1, 3], [10, 30], 0) == 10
    assert interpolate([1, 3], [10, 30], 9) == 30
    p = Profile.load()
    assert p.startup_s > 0 and p.max_num_seqs >= 8
    assert p.tpot(p.max_num_seqs) > p.tpot(1)  # a fuller batch makes each token slower
    assert p.prefill(1, 2 * p.prompt_tokens) == pytest.approx(2 * p.prefill(1, p.prompt_tokens))
    with pytest.raises(ValueError):
        Profile(4, 1.0, [2, 1], [0.1, 0.1], [0.01, 0.01], 100.0, 1000)


def test_generator_shape_and_round_trip(tmp_path):
    cfg = tr.TraceConfig(duration_s=1200, night_rate=1, peak_rate=20, bursts=2, burst_s=60, seed=3)
    reqs = tr.generate(cfg)
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times)
    night = sum(t < 120 or t > 1080 for t in times)
    noon = sum(540 < t < 660 for t in times)
    assert noon > 5 * night / 2  # the same span of time at noon vs at night
    assert max(r.output_len for r in reqs) > cfg.output_len * 7 // 4  # burst jobs are longer
    path = str(tmp_path / "trace.jsonl.gz")
    tr.save(reqs, path)
    assert tr.load(path) == reqs
    assert tr.generate(cfg) == reqs  # seeded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        tr.load(str(bad))


def test_one_replica_under_light_load_meets_the_slo():
    p = flat_profile()
    run = sim.simulate(constant(2, 60), p, sim.SimConfig(), None, fixed=1)
    assert run["completed"] == 120 and run["slo_violations"] == 0 and run["rejected"] == 0
    assert run["ttft_ms"]["p50"] == pytest.approx(50, abs=15)  # the prefill, nothing queued
    assert run["tpot_ms"]["p50"] == pytest.approx(10, abs=1)
    assert run["replica_hours"] == pytest.approx(run["timeline"][-1]["t"] / 3600, rel=0.05)


def test_overload_queues_then_rejects():
    p = flat_profile(slots=2)  # 2 slots x (50 tokens x 10 ms) ≈ 4 req/s
    run = sim.simulate(constant(20, 30), p, sim.SimConfig(max_waiting=50), None, fixed=1)
    assert run["rejected"] > 0 and run["slo_violation_ratio"] > 0.5
    assert run["completed"] + run["rejected"] == run["requests"]


def test_policy_follows_a_step_and_comes_back():
    p = flat_profile()
    trace = constant(2, 120) + [tr.TraceRequest(120 + i / 30, 100, 50) for i in range(30 * 120)] + \
        [tr.TraceRequest(240 + i / 2, 100, 50) for i in range(2 * 300)]
    policy = PolicyConfig(max_replicas=20, scale_down_window_s=30)
    run = sim.simulate(trace, p, sim.SimConfig(), policy)
    reps = {row["t"]: row["replicas"] for row in run["timeline"]}
    assert reps[100.0] <= 2 and max(reps[t] for t in reps if 150 < t < 240) >= 5 and reps[500.0] <= 2
    assert run["slo_violation_ratio"] < 0.05
    fixed = sim.simulate(trace, p, sim.SimConfig(), None, fixed=run["peak_replicas"])
    assert run["replica_hours"] < fixed["replica_hours"]


def test_scale_from_zero_holds_requests_in_the_gateway():
    p = flat_profile(startup=3.0)
    policy = PolicyConfig(min_replicas=0, scale_to_zero_after_s=20, scale_down_window_s=5)
    trace = constant(1, 10) + [tr.TraceRequest(100 + i, 100, 50) for i in range(5)]
    run = sim.simulate(trace, p, sim.SimConfig(), policy)
    assert run["completed"] == 15 and run["rejected"] == 0
    assert run["ttft_ms"]["p99"] > 3000  # the first request waited for a cold start
    assert any(row["replicas"] == 0 for row in run["timeline"] if 40 < row["t"] < 100)


def test_fixed_peak_is_the_smallest_fleet_within_budget():
    p = flat_profile()
    trace = constant(20, 60)
    n, run = sim.fixed_peak(trace, p, sim.SimConfig())
    assert run["slo_violation_ratio"] <= 0.01
    assert sim.simulate(trace, p, sim.SimConfig(), None, fixed=n - 1)["slo_violation_ratio"] > 0.01 or n == 1


def test_default_simulation_meets_the_issue_targets():
    """The committed result (bench/results/autoscale), reproduced: the built-in trace and measured profile."""
    runs = sim.compare(tr.generate(tr.TraceConfig()), Profile.load(), sim.SimConfig(), PolicyConfig(max_replicas=20))
    ours, fixed, count = runs["conveyor"], runs["fixed-peak"], runs["request-count"]
    assert ours["replica_hours"] <= 0.6 * fixed["replica_hours"], format_table(runs)
    assert ours["slo_violation_ratio"] <= 0.01 and fixed["slo_violation_ratio"] <= 0.01
    assert ours["slo_violation_ratio"] < count["slo_violation_ratio"], format_table(runs)


def test_cli_simulate_writes_policies_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "r.json", tmp_path / "plots" / "day1"  # --plot's folders are created
    assert main(["autoscale", "simulate", "--duration", "300", "--peak-rate", "8", "--output", str(out),
                 "--plot", str(plots), "--save-trace", str(tmp_path / "t.jsonl")]) == 0
    err = capsys.readouterr().err  # off a terminal: a line as each simulation starts
    assert "# simulating fixed-peak, " in err and "# simulating the conveyor policy ..." in err
    assert "# simulating the request-count policy ..." in err
    res = json.loads(out.read_text())
    assert set(res["policies"]) == {"conveyor", "fixed-peak", "request-count"}
    for p in res["policies"].values():
        assert {"replica_hours", "slo_violation_ratio", "rejected_ratio"} <= set(p)
    assert (plots / "timeline.png").stat().st_size > 10_000
    out2 = tmp_path / "r2.json"
    assert main(["autoscale", "simulate", "--trace", str(tmp_path / "t.jsonl"), "--output", str(out2)]) == 0
    assert json.loads(out2.read_text())["policies"] == res["policies"]  # the saved trace replays the same
    assert main(["autoscale", "simulate", "--min-replicas", "5", "--max-replicas", "2"]) == 2


@pytest.mark.parametrize("flag, where, says", [
    ("--output", "missing/r.json", "the folder {tmp}/missing does not exist"),
    ("--save-trace", "missing/t.jsonl", "the folder {tmp}/missing does not exist"),
    ("--output", "file/r.json", "is not a folder"),
    ("--plot", "file", "is a file, not a folder"),
])
def test_cli_simulate_refuses_an_unwritable_output_before_computing(tmp_path, monkeypatch, capsys, flag, where,
                                                                     says):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sim, "compare", lambda *a, **k: pytest.fail("the simulation started"))
    assert main(["autoscale", "simulate", flag, str(tmp_path / where)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} ") and says.format(tmp=tmp_path) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing left behind


def test_ttft_p95_from_histogram_deltas_between_scrapes():
    m = ServerMetrics("demo", 8)
    for _ in range(100):
        m.ttft.observe(0.02)
    before = parse(generate_latest(m.registry).decode(), "demo")
    assert quantile_between({}, before.ttft_buckets, 0.95) == pytest.approx(0.02, abs=0.005)
    for _ in range(100):
        m.ttft.observe(3.0)
    after = parse(generate_latest(m.registry).decode(), "demo")
    p95 = quantile_between(before.ttft_buckets, after.ttft_buckets, 0.95)
    assert 2.5 < p95 <= 5.0  # only the new observations count
    assert quantile_between(after.ttft_buckets, after.ttft_buckets, 0.95) is None
    m.ttft.observe(5000.0)  # beyond the last finite bucket
    last = parse(generate_latest(m.registry).decode(), "demo")
    assert quantile_between(after.ttft_buckets, last.ttft_buckets, 0.95) == 2560.0
    assert parse(generate_latest(m.registry).decode(), "other").ttft_buckets == {}
