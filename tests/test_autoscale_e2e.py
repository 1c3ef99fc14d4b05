"""End to end: a real gateway, real `conveyor serve` replicas started by the actuators, load from `conveyor bench
serve` through the gateway, and the controller scaling 1 → N → 1 (local processes, then Ray actors)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.autoscale.actuator import GatewayAdmin
from conveyor.autoscale.controller import Controller
from conveyor.autoscale.local import LocalActuator
from conveyor.autoscale.policy import PolicyConfig
from conveyor.autoscale.signals import FINISHED, SignalScraper
from conveyor.prometheus_text import sum_by_name
from server_process import free_port, wait_healthy

ADMIN_KEY, TENANT_KEY = "admin-secret", "tenant-secret"
REPLICA = ["--model", "demo", "--max-num-seqs", "2", "--kv-cache-memory", str(64 << 20)]
# short windows so a test sees a whole cycle in seconds; the real defaults are minutes
# (a full slot target: the trickle that runs through scale-down must not ask for a second replica again)
POLICY = dict(min_replicas=1, target_waiting=2.0, target_slots_used_ratio=1.0, target_ttft_p95_s=None,
              scale_down_window_s=6.0, scale_down_cooldown_s=3.0, scale_down_max_ratio=1.0, panic_window_s=3.0)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    cfg = {"models": [{"name": "big", "upstream_model": "demo", "replicas": []},
                      {"name": "rayed", "upstream_model": "demo", "replicas": []},
                      {"name": "zero", "upstream_model": "demo", "replicas": []},
                      {"name": "drain", "upstream_model": "demo", "replicas": []}],
           "tenants": [{"name": "t", "api_key_sha256": sha(TENANT_KEY), "class": "interactive",
                        "requests_per_minute": 100000, "max_concurrent": 1000}],
           "admin_api_key_sha256": sha(ADMIN_KEY), "cold_start_timeout_s": 60, "health_interval_s": 0.3}
    path = tmp_path_factory.mktemp("gw") / "gateway.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    log = open(path.parent / "gateway.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "gateway", "--config", str(path), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 30, (path.parent / "gateway.log").read_text, ok=lambda status: status < 500)
    yield url
    proc.terminate()
    proc.wait(20)
    log.close()


class Run:
    """The controller on a thread, plus a monitor of what each replica served (its vllm:request_success_total)."""

    def __init__(self, controller: Controller) -> None:
        self.controller, self.stop = controller, threading.Event()
        self.served: dict[str, float] = {}
        self.threads = [threading.Thread(target=controller.run, args=(self.stop,), daemon=True),
                        threading.Thread(target=self._monitor, daemon=True)]
        for t in self.threads:
            t.start()

    def _monitor(self) -> None:
        while not self.stop.wait(0.5):
            for r in self.controller.actuator.list():
                if r.state == "ready":
                    try:
                        text = httpx.get(r.url + "/metrics", timeout=2).text
                    except httpx.HTTPError:
                        continue
                    n = sum_by_name(text, [FINISHED]).get(FINISHED, 0.0)
                    self.served[r.url] = max(n, self.served.get(r.url, 0.0))

    def ready(self) -> int:
        return sum(r.state == "ready" for r in self.controller.actuator.list())

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.controller.decisions[-3:]}"
            time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.controller.actuator.shutdown()


def bench(gateway: str, model: str, out, n: int, rate: str, output_len: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conveyor.cli", "bench", "serve", "--base-url", gateway, "--model", model,
           "--api-key", TENANT_KEY, "--workload", "chat", "--num-requests", str(n), "--request-rate", rate,
           "--prompt-len", "64", "--output-len", str(output_len), "--disable-tqdm", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, out, timeout: float = 240) -> dict:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result = json.loads(out.read_text())
    cut = [r for r in result["requests"] if r["error"] or r["output_tokens"] != r["output_len"]]
    assert result["failed"] == 0 and not cut, (result["errors"], cut[:3])
    return result


def scale_cycle(run: Run, gateway: str, model: str, tmp_path, burst: int, max_replicas: int) -> None:
    """1 replica → a burst scales up → the burst ends while a trickle keeps streaming → back to 1, nothing cut."""
    run.wait_for(lambda: run.ready() == 1, 120, "the first replica")
    load = bench(gateway, model, tmp_path / "burst.json", burst, "inf", 96)
    run.wait_for(lambda: run.ready() >= 2, 120, "scale-up")
    result = finished(load, tmp_path / "burst.json")
    assert result["completed"] == burst
    peak = max(d["replicas"].get("ready", 0) for d in run.controller.decisions)
    assert 2 <= peak <= max_replicas
    assert sum(n > 0 for n in run.served.values()) >= 2, run.served  # new replicas served through the gateway
    # requests keep arriving while replicas drain and stop: none may fail or be cut short
    trickle = bench(gateway, model, tmp_path / "trickle.json", 24, "1", 32)
    run.wait_for(lambda: run.ready() == 1 and len(run.controller.actuator.list()) == 1, 120, "scale-down")
    pool = GatewayAdmin(gateway, ADMIN_KEY, model).replicas()
    assert len(pool) == 1 and pool[0]["state"] == "healthy", pool
    assert trickle.poll() is None  # the trickle was still running through the scale-down
    finished(trickle, tmp_path / "trickle.json")
    downs = [d for d in run.controller.decisions if d["action"].startswith("scale_down")]
    assert downs and all(d["reason"] for d in downs)


def check_decision_records(run: Run, caplog) -> None:
    """Every decision is a JSON log line and a metric: signals, desired count, reason, action."""
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "conveyor.autoscale.decision"]
    assert len(logged) == len(run.controller.decisions) > 0
    for entry in logged:
        assert {"signals", "desired", "reason", "action", "signal", "current"} <= set(entry)
    assert max(e["signals"]["slots_used_ratio"] for e in logged) >= 1  # the burst filled the replicas' slots
    actions = {s.labels["action"]: s.value for f in text_string_to_metric_families(
        generate_latest(run.controller.metrics.registry).decode()) for s in f.samples
        if s.name == "conveyor_autoscaler_actions_total"}
    assert actions["scale_up"] >= 1 and actions["scale_down"] >= 1
    assert actions["none"] + actions["scale_up"] + actions["scale_down"] == len(logged)


def test_local_actuator_scales_up_on_a_burst_and_drains_back_down(gateway, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="conveyor.autoscale.decision")
    admin = GatewayAdmin(gateway, ADMIN_KEY, "big")
    actuator = LocalActuator(admin, REPLICA, log_dir=str(tmp_path / "replicas"), env={"OMP_NUM_THREADS": "1"},
                             drain_timeout_s=60)
    run = Run(Controller(PolicyConfig(max_replicas=3, **POLICY), actuator, SignalScraper("big"), gateway, "big",
                         interval_s=0.5))
    try:
        scale_cycle(run, gateway, "big", tmp_path, burst=120, max_replicas=3)
        run.stop.set()
        run.threads[0].join(30)
        check_decision_records(run, caplog)
        gone = [r for r in actuator.replicas.values() if r.state == "stopped"]
        assert gone and all(r.handle.poll() is not None for r in gone)  # the processes exited
    finally:
        run.close()
    assert all(r.handle.poll() is not None for r in actuator.replicas.values())


def test_ray_actuator_replicas_are_actors(gateway, tmp_path):
    ray = pytest.importorskip("ray")
    from conveyor.autoscale.ray_actuator import RayActuator

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        admin = GatewayAdmin(gateway, ADMIN_KEY, "rayed")
        actuator = RayActuator(admin, REPLICA, num_cpus=1, drain_timeout_s=60)
        run = Run(Controller(PolicyConfig(max_replicas=2, **POLICY), actuator, SignalScraper("rayed"), gateway,
                             "rayed", interval_s=0.5))
        try:
            run.wait_for(lambda: run.ready() == 1, 180, "the first actor")
            assert ray.available_resources().get("CPU", 0) == 3  # one replica reserves one CPU
            scale_cycle(run, gateway, "rayed", tmp_path, burst=120, max_replicas=2)
            # the second actor is gone (Ray frees its CPU asynchronously)
            run.wait_for(lambda: ray.available_resources().get("CPU", 0) == 3, 20, "the actor's CPU back")
            stopped = [r for r in actuator.replicas.values() if r.state == "stopped"]
            assert stopped
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(stopped[0].handle["actor"].url.remote(), timeout=30)
        finally:
            run.close()
    finally:
        ray.shutdown()


def test_cli_scales_from_zero_on_a_held_request_and_back_to_zero(gateway, tmp_path):
    """`conveyor autoscale` as users run it: no replica until a request waits in the gateway, then one, then none
    after the idle timeout; decisions on stdout as JSON lines and on its /metrics; SIGTERM stops it cleanly."""
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "conveyor.cli", "autoscale", "--gateway", gateway,
           "--model", "zero", "--actuator", "local", "--serve-args", " ".join(REPLICA), "--interval", "0.5",
           "--min-replicas", "0", "--scale-to-zero-after-s", "4", "--scale-down-window-s", "2",
           "--scale-down-cooldown-s", "1", "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", CONVEYOR_ADMIN_KEY=ADMIN_KEY))
    admin = GatewayAdmin(gateway, ADMIN_KEY, "zero")
    try:
        time.sleep(3)
        assert admin.replicas() == [] and proc.poll() is None  # idle: nothing started
        t0 = time.monotonic()
        r = httpx.post(gateway + "/v1/completions", headers={"Authorization": f"Bearer {TENANT_KEY}"}, timeout=90,
                       json={"model": "zero", "prompt": "hello", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert time.monotonic() - t0 > 1.0  # it waited in the gateway for a cold start
        r = httpx.post(gateway + "/v1/completions", headers={"Authorization": f"Bearer {TENANT_KEY}"}, timeout=90,
                       json={"model": "zero", "prompt": "again", "max_tokens": 32, "ignore_eos": True})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while admin.replicas():
            assert time.monotonic() < deadline, admin.replicas()
            time.sleep(0.3)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'conveyor_autoscaler_actions_total{action="scale_up",model="zero"} 1.0' in text
        assert 'conveyor_autoscaler_actions_total{action="scale_down",model="zero"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    decisions = [json.loads(line) for line in out.splitlines()
                 if line.startswith("{") and "autoscale_decision" in line]
    reasons = [d["reason"] for d in decisions if d["action"] != "none"]
    assert any("activation" in x for x in reasons) and any("scale to zero" in x for x in reasons), reasons
    assert any(d["signals"]["request_rate"] > 0 for d in decisions)  # the replica's own metrics were read


def test_drain_timeout_bounds_how_long_a_busy_replica_is_kept(gateway, tmp_path):
    """A replica chosen for removal gets no new requests; one still busy when drain_timeout_s passes is stopped
    anyway (the timeout is what bounds a scale-down), while the drain lasts at least that long."""
    admin = GatewayAdmin(gateway, ADMIN_KEY, "drain")
    actuator = LocalActuator(admin, REPLICA, env={"OMP_NUM_THREADS": "1"}, drain_timeout_s=2.0)
    replica = actuator.start()
    try:
        deadline = time.monotonic() + 120
        while replica.state != "ready":
            assert time.monotonic() < deadline and replica.handle.poll() is None
            actuator.poll()
            time.sleep(0.2)
        got: dict = {}

        def long_stream() -> None:
            body = {"model": "drain", "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            chunks = 0
            try:
                with httpx.stream("POST", gateway + "/v1/completions", json=body, timeout=120,
                                  headers={"Authorization": f"Bearer {TENANT_KEY}"}) as r:
                    for line in r.iter_lines():
                        chunks += line.startswith("data: {")
                        got["done"] = line == "data: [DONE]"
            except httpx.HTTPError as e:
                got["error"] = e
            got["chunks"] = chunks

        client = threading.Thread(target=long_stream)
        client.start()
        while not any(r["in_flight"] for r in admin.replicas()):
            time.sleep(0.05)
        t0 = time.monotonic()
        actuator.drain_and_stop(replica)
        assert admin.replicas()[0]["state"] == "draining"
        while replica.state != "stopped":
            actuator.poll()
            time.sleep(0.1)
        took = time.monotonic() - t0
        client.join(60)
        assert 2.0 <= took < 2.0 + 5.0 + 5.0, took  # the timeout, then at most the 5 s grace (plus slack)
        assert replica.handle.poll() is not None and admin.replicas() == []
        assert not got.get("done") and got["chunks"] < 4000  # it really was cut: the timeout won
    finally:
        actuator.shutdown()
