"""`conveyor autoscale` (run the controller against a gateway) and `conveyor autoscale simulate`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import fields


def add_policy_args(p: argparse.ArgumentParser, **defaults) -> None:
    """One flag per PolicyConfig field: --min-replicas, --target-slots-used-ratio, ... ('none' disables a target)."""
    from conveyor.autoscale.policy import PolicyConfig

    for f in fields(PolicyConfig):
        default = defaults.get(f.name, f.default)
        kind = int if f.name in ("min_replicas", "max_replicas") else _optional_float
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f"default: {default}")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def policy_config(a: argparse.Namespace):
    from conveyor.autoscale.policy import PolicyConfig

    return PolicyConfig(**{f.name: getattr(a, f.name) for f in fields(PolicyConfig)})


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", help="the gateway's base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--admin-key", default=os.environ.get("CONVEYOR_ADMIN_KEY"),
                   help="the gateway's admin API key (default: $CONVEYOR_ADMIN_KEY, which keeps it out of `ps`)")
    p.add_argument("--model", help="the gateway model whose replica pool this scales")
    p.add_argument("--actuator", default="local", choices=["local", "ray"])
    p.add_argument("--serve-args", default="--model demo",
                   help="flags for each replica's `conveyor serve` (one string, shell-quoted)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between decisions")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds a draining replica may finish")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--metrics-port", type=int, default=None, help="serve the autoscaler's /metrics here")
    p.add_argument("--log-dir", default=None, help="local actuator: one log file per replica here")
    p.add_argument("--ray-address", default=None, help="ray actuator: cluster address (default: start local)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="ray actuator: CPUs each replica reserves")
    p.add_argument("--num-gpus", type=float, default=0.0, help="ray actuator: GPUs each replica reserves")
    p.add_argument("--ray-scheduling-strategy", default="SPREAD", choices=["SPREAD", "DEFAULT"],
                   help="ray actuator: SPREAD replicas over the nodes (one node's loss takes as few as it can), or "
                        "Ray's DEFAULT (fill the local node first)")
    add_policy_args(p)
    sub = p.add_subparsers(dest="autoscale_command")
    s = sub.add_parser("simulate", help="replay a trace against modeled replicas; compare with baselines")
    add_simulate_args(s)
    s.set_defaults(func=cmd_simulate)


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="JSONL(.gz) trace (default: the built-in generator)")
    p.add_argument("--profile", default=None, help="replica profile JSON (default: the measured demo profile)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write timeline plots here")
    p.add_argument("--save-trace", default=None, help="write the trace used (JSONL, .gz to compress)")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed")
    p.add_argument("--duration", type=float, default=3600.0, help="the generator's day, seconds")
    p.add_argument("--peak-rate", type=float, default=30.0, help="the generator's peak requests/s")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--sim-interval", type=float, default=2.0, help="seconds between policy decisions")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar (or progress lines off a terminal)")
    add_policy_args(p, max_replicas=20)  # room for the built-in trace's peak


def check_simulate_outputs(a: argparse.Namespace) -> None:
    """Every output the run will write can be written (and --plot's folder exists): ValueError (one line) if not,
    before minutes of simulation rather than after."""
    from conveyor.output_files import check_output_file, prepare_output_dir

    if a.output:
        check_output_file(a.output, "--output")
        check_output_file(timelines_path(a.output), "--output")
    if a.save_trace:
        check_output_file(a.save_trace, "--save-trace")
    if a.plot:
        prepare_output_dir(a.plot, "--plot")


def timelines_path(output: str) -> str:
    return output.removesuffix(".json") + ".timelines.json"


def cmd_simulate(a: argparse.Namespace) -> int:
    from conveyor.autoscale import simulate as sim
    from conveyor.autoscale import trace as tr
    from conveyor.autoscale.profile import DEFAULT_PROFILE, Profile
    from conveyor.progress import Progress

    try:
        check_simulate_outputs(a)
        cfg = policy_config(a)
        profile = Profile.load(a.profile or DEFAULT_PROFILE)
        trace = tr.load(a.trace) if a.trace else tr.generate(tr.TraceConfig(a.duration, peak_rate=a.peak_rate,
                                                                            seed=a.seed))
        simcfg = sim.SimConfig(interval_s=a.sim_interval, slo_ttft_s=a.slo_ttft_ms / 1e3,
                               slo_tpot_s=a.slo_tpot_ms / 1e3)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not trace:
        print("error: empty trace", file=sys.stderr)
        return 2
    if a.save_trace:
        tr.save(trace, a.save_trace)
    with Progress(sim.progress_total(trace), "simulate", "sim-s", every_s=10.0, disable=a.disable_tqdm) as bar:
        runs = sim.compare(trace, profile, simcfg, cfg, progress=bar)
    print(format_table(runs))
    result = {"policies": {k: {key: v for key, v in r.items() if key != "timeline"} for k, r in runs.items()},
              "config": {"policy": cfg.__dict__, "sim": simcfg.__dict__, "trace": a.trace or "built-in generator",
                         "requests": len(trace), "profile": str(a.profile or DEFAULT_PROFILE),
                         "command": "conveyor " + " ".join(shlex.quote(x) for x in sys.argv[1:])}}
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=1)
        # one row per decision interval, by column: compact, next to the result
        timelines = {k: {col: [row.get(col) for row in r["timeline"]] for col in r["timeline"][0]}
                     for k, r in runs.items() if r["timeline"]}
        with open(timelines_path(a.output), "w") as f:
            json.dump(timelines, f, separators=(",", ":"))
    if a.plot:
        from conveyor.autoscale.plots import plot_timelines

        plot_timelines(runs, simcfg, a.plot)
    return 0


def format_table(runs: dict) -> str:
    lines = [f"{'policy':<14} {'replica-h':>9} {'peak':>5} {'SLO viol.':>9} {'rejected':>8} "
             f"{'TTFT p95 ms':>11} {'TPOT p95 ms':>11}"]
    for name, r in runs.items():
        lines.append(f"{name:<14} {r['replica_hours']:>9.2f} {r['peak_replicas']:>5d} "
                     f"{r['slo_violation_ratio']:>9.2%} {r['rejected_ratio']:>8.2%} "
                     f"{r['ttft_ms']['p95'] or 0:>11.0f} {r['tpot_ms']['p95'] or 0:>11.1f}")
    return "\n".join(lines)


def make_actuator(a: argparse.Namespace, gateway):
    serve_args = shlex.split(a.serve_args)
    kw = dict(drain_timeout_s=a.drain_timeout, startup_timeout_s=a.startup_timeout)
    if a.actuator == "ray":
        import ray

        from conveyor.autoscale.ray_actuator import RayActuator

        ray.init(address=a.ray_address, ignore_reinit_error=True)
        return RayActuator(gateway, serve_args, num_cpus=a.num_cpus, num_gpus=a.num_gpus,
                           scheduling_strategy=a.ray_scheduling_strategy, **kw)
    from conveyor.autoscale.local import LocalActuator

    return LocalActuator(gateway, serve_args, log_dir=a.log_dir, **kw)


def cmd_run(a: argparse.Namespace) -> int:
    import signal
    import threading

    from prometheus_client import start_http_server

    from conveyor.autoscale.actuator import GatewayAdmin
    from conveyor.autoscale.controller import Controller
    from conveyor.autoscale.signals import SignalScraper
    from conveyor.server.logs import setup_json_logging

    if not (a.gateway and a.admin_key and a.model):
        print("error: --gateway, --admin-key (or CONVEYOR_ADMIN_KEY) and --model are required "
              "(or use `autoscale simulate`)",
              file=sys.stderr)
        return 2
    try:
        cfg = policy_config(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_json_logging(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    gateway = GatewayAdmin(a.gateway, a.admin_key, a.model)
    actuator = make_actuator(a, gateway)
    controller = Controller(cfg, actuator, SignalScraper(a.model), a.gateway, a.model, a.interval)
    if a.metrics_port:
        start_http_server(a.metrics_port, registry=controller.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        controller.run(stop)
    finally:
        actuator.shutdown()
    return 0
