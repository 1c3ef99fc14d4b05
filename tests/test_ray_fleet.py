"""A fleet on a real two-node Ray cluster (a head and a worker, each its own `ray start`), one node lost under load:
`bench/ray_fleet.py`'s scenario, short. `conveyor autoscale --actuator ray` spreads two replicas over both nodes
and registers them with a gateway; streaming clients run through the gateway while the worker's raylet is
SIGKILLed. Nothing that had not started streaming may be lost, the lost node's servers must die with it, and the
autoscaler must restore the capacity on the surviving node. No timings are checked.

Slow: 40-70 s on this 2-core machine (two Ray nodes and three replica start-ups, most of it waiting for processes
to start), so it is excluded from the default run: `pytest -m slow tests/test_ray_fleet.py`.
"""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("ray")
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "ray_fleet.py"


@pytest.fixture(scope="module")
def fleet():
    spec = importlib.util.spec_from_file_location("bench_ray_fleet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow
def test_a_node_lost_under_load_loses_no_request_and_its_capacity_comes_back(fleet, tmp_path):
    cfg = fleet.Config(replicas=2, concurrency=4, max_tokens=24, warmup_s=2.0, after_s=1.0, head_cpus=2,
                       worker_cpus=1)
    r = fleet.run(cfg, tmp_path)
    # placed on both nodes: by Ray's node ids, and by the node whose session holds each server process
    before = r["before"]
    assert sorted(p["node"] for p in before.values()) == ["head", "worker"], r
    assert len({p["node_id"] for p in before.values()}) == 2 and all(p["node_id"] for p in before.values()), r
    head_id = next(p["node_id"] for p in before.values() if p["node"] == "head")
    # under load: every request answered whole, or cut with an error event after it had started streaming
    assert r["sent_before_kill"] > 0 and r["completed"] > r["sent_before_kill"], r
    assert r["lost"] == 0 and r["shed"] == 0, r
    assert r["sent"] == r["completed"] + r["cut"], r
    # the lost node's servers died with it (the run waited for that), the gateway dropped them, and the
    # autoscaler put the capacity back on the surviving node
    assert len(r["lost_replicas"]) == 1, r
    after = r["after"]
    assert len(after) == 2 and not set(after) & set(r["lost_replicas"]), r
    assert all(p["node"] == "head" and p["node_id"] == head_id for p in after.values()), r
    assert r["autoscaler_alive"], r
    # and nothing of either node is left running
    assert not [p for p in fleet.all_processes() if p.sid in r["sessions"] and p.state != "Z"]


def test_an_unknown_scheduling_strategy_is_refused_before_any_actor_starts():
    from conveyor.autoscale.ray_actuator import RayActuator

    with pytest.raises(ValueError, match="SPREAD, DEFAULT"):
        RayActuator(None, ["--model", "demo"], scheduling_strategy="PACK")


def test_a_replica_server_dies_with_the_thread_that_started_it():
    """The actor's child is armed with PR_SET_PDEATHSIG: started from a thread that then exits, it is SIGKILLed;
    started from one that lives on (the actor's main thread), it runs."""
    from conveyor.autoscale.ray_actuator import die_with_parent

    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    started: list[subprocess.Popen] = []
    t = threading.Thread(target=lambda: started.append(subprocess.Popen(["sleep", "60"],
                                                                        preexec_fn=die_with_parent())))
    t.start()
    t.join()
    orphan = started[0]
    kept = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
    try:
        assert orphan.wait(10) == -signal.SIGKILL
        assert kept.poll() is None
    finally:
        kept.kill()
        kept.wait()
