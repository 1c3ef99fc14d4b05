"""The scaling policy: target tracking, tolerance, stabilization windows, cooldowns, panic, bounds, scale to zero."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.autoscale.policy import Observation, PolicyConfig, PolicyState, ReplicaSample, decide, recommend

QUIET = dict(scale_up_window_s=0, scale_down_window_s=0, scale_down_cooldown_s=0, scale_down_max_ratio=1.0,
             scale_up_max_ratio=100.0,
             panic_threshold=100.0)


def busy(slots: float = 0.0, waiting: float = 0.0, backlog: float = 0.0, kv: float = 0.0,
         ttft: float | None = None) -> ReplicaSample:
    return ReplicaSample(waiting=waiting, prefill_backlog_tokens=backlog, slots_used_ratio=slots,
                         kv_cache_usage_ratio=kv, ttft_p95_s=ttft, running=slots * 16)


def obs(now: float, current: int, sample: ReplicaSample, ready: int | None = None, queued: float = 0.0):
    return Observation(now, current, (sample,) * (current if ready is None else ready), queued)


def run(cfg: PolicyConfig, steps: list[Observation], state: PolicyState | None = None):
    state = state or PolicyState()
    out = []
    for o in steps:
        d, state = decide(cfg, state, o)
        out.append(d)
    return out, state


def test_each_signal_tracks_its_target_and_the_largest_wins():
    cfg = PolicyConfig(max_replicas=50, **QUIET)
    cases = [(busy(slots=0.9), "slots_used_ratio", 6),  # 4 x 0.9 / 0.6
             (busy(waiting=5), "waiting", 10),  # 20 waiting / 2
             (busy(backlog=4096), "prefill_backlog_tokens", 8),  # 16384 / 2048
             (busy(kv=0.95), "kv_cache_usage_ratio", 5),  # 3.8 / 0.8
             (busy(ttft=1.5), "ttft_p95_s", 12)]  # 4 replicas x 1.5 s / 0.5 s
    for sample, signal, want in cases:
        d, _ = decide(cfg, PolicyState(), obs(0, 4, sample))
        assert (d.desired, d.signal) == (want, signal), (signal, d)
        assert signal in d.reason
    d, _ = decide(cfg, PolicyState(), obs(0, 4, busy(slots=0.9, waiting=5, kv=0.95)))
    assert d.signal == "waiting" and d.desired == 10


def test_gateway_queue_counts_as_waiting():
    cfg = PolicyConfig(max_replicas=50, **QUIET)
    d, _ = decide(cfg, PolicyState(), obs(0, 2, busy(slots=0.5), queued=12))
    assert d.desired == 6 and d.signal == "waiting"


def test_tolerance_band_keeps_the_current_count():
    cfg = PolicyConfig(tolerance=0.1, **QUIET)
    # 4 replicas at 0.64 slots: wants 4.27, within 10 % of 4 → stays; at 0.7 wants 4.67 → 5
    assert decide(cfg, PolicyState(), obs(0, 4, busy(slots=0.64)))[0].desired == 4
    assert decide(cfg, PolicyState(), obs(0, 4, busy(slots=0.70)))[0].desired == 5
    assert recommend(0.95 * 4 * 0.6, 0.6, "slots_used_ratio", obs(0, 4, busy()), 0.1) == 4


def test_scale_up_is_immediate_scale_down_waits_for_the_whole_window():
    cfg = PolicyConfig(scale_down_window_s=60, scale_down_cooldown_s=0, scale_down_max_ratio=1.0, panic_threshold=9)
    d, state = decide(cfg, PolicyState(), obs(0, 2, busy(slots=1.0)))
    assert d.desired == 4  # 2 x 1.0 / 0.6 → 4, at once
    # load falls to what 1 replica carries; the window still holds the high recommendation
    steps = [obs(t, 4, busy(slots=0.1)) for t in range(10, 61, 10)]
    ds, state = run(cfg, steps, state)
    assert all(x.desired == 4 for x in ds), [x.reason for x in ds]
    assert "window" in ds[0].reason
    d, _ = decide(cfg, state, obs(61, 4, busy(slots=0.1)))  # the high one left the window
    assert d.desired == 1


def test_a_brief_dip_never_scales_down():
    cfg = PolicyConfig(scale_down_window_s=60, scale_down_cooldown_s=0, panic_threshold=9)
    state = PolicyState()
    for t in range(0, 300, 5):
        slots = 0.05 if t % 50 == 0 else 0.55  # a one-sample dip every 50 s
        d, state = decide(cfg, state, obs(t, 4, busy(slots=slots)))
        assert d.desired == 4, (t, d.reason)


def test_scale_up_window_takes_the_smallest_recommendation():
    cfg = PolicyConfig(scale_up_window_s=30, panic_threshold=9, max_replicas=20)
    ds, _ = run(cfg, [obs(0, 2, busy(slots=0.6)), obs(10, 2, busy(slots=1.0)), obs(20, 2, busy(slots=1.0))])
    assert [d.desired for d in ds] == [2, 2, 2]  # the window still holds the 2 of t=0
    ds, _ = run(cfg, [obs(t, 2, busy(slots=1.0)) for t in (0, 10, 20, 31)])
    assert ds[-1].desired == 4


def test_cooldowns():
    cfg = PolicyConfig(scale_down_window_s=0, scale_down_cooldown_s=30, scale_up_cooldown_s=20, panic_threshold=9,
                       scale_down_max_ratio=1.0, max_replicas=20)
    ds, state = run(cfg, [obs(0, 2, busy(slots=1.0)), obs(5, 4, busy(slots=1.0))])
    assert ds[0].desired == 4 and ds[1].desired == 4 and "scale-up cooldown" in ds[1].reason
    d, state = decide(cfg, state, obs(25, 4, busy(slots=0.1)))
    assert d.desired == 4 and "scale-down cooldown" in d.reason
    d, state = decide(cfg, state, obs(31, 4, busy(slots=0.1)))
    assert d.desired == 1


def test_scale_down_is_taken_in_steps():
    cfg = PolicyConfig(scale_down_window_s=0, scale_down_cooldown_s=0, scale_down_max_ratio=0.5, max_replicas=20)
    ds, _ = run(cfg, [obs(0, 10, busy()), obs(1, 5, busy()), obs(2, 3, busy()), obs(3, 2, busy())])
    assert [d.desired for d in ds] == [5, 3, 2, 1]


def test_panic_scales_up_past_the_window_and_blocks_scale_down():
    cfg = PolicyConfig(scale_up_window_s=60, scale_down_window_s=0, scale_down_cooldown_s=0, panic_threshold=2,
                       panic_window_s=30, max_replicas=20)
    d, state = decide(cfg, PolicyState(), obs(0, 2, busy(slots=0.6)))
    d, state = decide(cfg, state, obs(2, 2, busy(slots=0.6, waiting=6)))  # 12 waiting / 2 = 6 ≥ 2 x 2 ready
    assert d.panic and d.desired == 6 and "panic" in d.reason  # the up window (60 s) did not hold it
    ds, state = run(cfg, [obs(t, 6, busy(slots=0.1)) for t in (10, 20, 31, 33)], state)
    assert [x.desired for x in ds[:3]] == [6, 6, 6] and all(x.panic for x in ds[:3])
    assert "no scale-down" in ds[0].reason
    assert not ds[3].panic and ds[3].desired == 3  # panic over (32 s): down, by at most half at a time


def test_one_scale_up_at_most_doubles_or_adds_four():
    cfg = PolicyConfig(max_replicas=100, **{**QUIET, "scale_up_max_ratio": 2.0})
    assert decide(cfg, PolicyState(), obs(0, 10, busy(waiting=10)))[0].desired == 20  # asks 50
    assert decide(cfg, PolicyState(), obs(0, 1, busy(waiting=40)))[0].desired == 5  # asks 20
    cfg = PolicyConfig(max_replicas=100, **QUIET)
    assert decide(cfg, PolicyState(), obs(0, 10, busy(waiting=10)))[0].desired == 50


def test_bounds():
    cfg = PolicyConfig(min_replicas=2, max_replicas=5, **QUIET)
    d, _ = decide(cfg, PolicyState(), obs(0, 3, busy(waiting=50)))
    assert d.desired == 5 and "max 5" in d.reason
    d, _ = decide(cfg, PolicyState(), obs(0, 3, busy()))
    assert d.desired == 2 and "min 2" in d.reason


def test_scale_to_zero_after_idle_and_back_on_queued_requests():
    cfg = PolicyConfig(min_replicas=0, scale_to_zero_after_s=60, **QUIET)
    ds, state = run(cfg, [obs(0, 1, busy(slots=0.1)), obs(30, 1, busy()), obs(59, 1, busy())])
    assert [d.desired for d in ds] == [1, 1, 1]
    d, state = decide(cfg, state, obs(61, 1, busy()))
    assert d.desired == 0 and "scale to zero" in d.reason
    d, state = decide(cfg, state, Observation(70, 0))
    assert d.desired == 0
    d, state = decide(cfg, state, Observation(80, 0, queued=3))  # the gateway holds 3 requests
    assert d.desired >= 1 and "activation" in d.reason


def test_min_zero_without_idle_timeout_keeps_one_replica():
    cfg = PolicyConfig(min_replicas=0, **QUIET)
    d, _ = decide(cfg, PolicyState(), obs(1000, 1, busy()))
    assert d.desired == 1


@pytest.mark.parametrize("bad", [dict(min_replicas=3, max_replicas=2), dict(max_replicas=0),
                                 dict(target_slots_used_ratio=1.5), dict(target_waiting=0), dict(tolerance=1.0),
                                 dict(panic_threshold=1.0), dict(scale_to_zero_after_s=10),
                                 dict(scale_down_max_ratio=0), dict(scale_down_window_s=-1),
                                 dict(target_waiting=None, target_prefill_backlog_tokens=None,
                                      target_slots_used_ratio=None, target_kv_cache_usage_ratio=None,
                                      target_ttft_p95_s=None)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        PolicyConfig(**bad)


@settings(max_examples=60, deadline=None)
@given(level=st.floats(0.1, 0.9), noise=st.floats(0.0, 0.25), seed=st.integers(0, 2**16))
def test_no_flapping_on_a_noisy_constant_load(level, noise, seed):
    """A constant load with ±noise: after settling, the count changes at most once (it may settle one step later),
    never up and down again."""
    import random

    rng = random.Random(seed)
    cfg = PolicyConfig(max_replicas=64)
    total = level * 8  # the fleet's slot use, spread over whatever replicas exist
    state, current, changes = PolicyState(), 8, []
    for t in range(0, 1200, 2):
        jitter = 1 + rng.uniform(-noise, noise)
        d, state = decide(cfg, state, obs(t, current, busy(slots=min(1.0, total * jitter / current))))
        if t > 300 and d.desired != current:
            changes.append(d.desired - current)
        current = d.desired
    assert len(changes) <= 2 and (all(c > 0 for c in changes) or all(c < 0 for c in changes)), changes


def test_victims_are_starting_replicas_first_then_the_least_busy():
    from conveyor.autoscale.actuator import Replica, pick_victims

    reps = [Replica("a", None, "http://a", "ready", started_at=1),
            Replica("b", None, "http://b", "ready", started_at=2),
            Replica("c", None, None, "starting", started_at=3),
            Replica("d", None, "http://d", "ready", started_at=4),
            Replica("e", None, None, "starting", started_at=5)]
    busy_ = {"http://a": 0, "http://b": 7, "http://d": 3}
    assert [r.id for r in pick_victims(reps, busy_, 3)] == ["e", "c", "a"]
    assert [r.id for r in pick_victims(reps, busy_, 4)] == ["e", "c", "a", "d"]
    assert pick_victims(reps, busy_, 0) == []
