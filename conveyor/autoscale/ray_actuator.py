"""The Ray actuator: each replica is a Ray actor that runs `conveyor serve` on the node Ray placed it on.

The actor reserves what one replica needs (`num_cpus`, `num_gpus`), so Ray places replicas across the cluster's
nodes (SPREAD by default: one node's loss takes as few replicas as it can), and an actor that cannot be placed
stays pending — the demand Ray's own autoscaler adds nodes for. The server runs as a child process of the actor
(not in the actor's own process) so that stopping it is a SIGTERM that drains like any `conveyor serve`, and a
crashed server is seen as a dead replica. The child is killed by the kernel when the actor's process dies
(PR_SET_PDEATHSIG; Ray 2.60 also kills a dead worker's children, the signal keeps that true where Ray does not),
so a lost node (its raylet and workers gone) takes its servers with it, as a machine would.

Liveness is checked without blocking the control loop: one ping per replica is in flight at a time, and a replica
whose ping has not come back within `ping_timeout_s` is dead — its node is gone, or too far gone to serve.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from conveyor.autoscale.actuator import Actuator, GatewayAdmin, Replica
from conveyor.autoscale.local import free_port, serve_command

log = logging.getLogger("conveyor.autoscale")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node
SCHEDULING_STRATEGIES = ("SPREAD", "DEFAULT")


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child when the thread that forked it exits (None off Linux).
    libc is loaded here, in the parent: the child of a threaded process should do as little as it can before exec."""
    if sys.platform != "linux":
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed: it would never come
            os.kill(os.getpid(), signal.SIGKILL)
    return arm


class ReplicaServer:
    """The actor body (wrapped with ray.remote at runtime, so importing this module needs no Ray).

    The death signal fires when the forking *thread* exits: a default (non-threaded, non-async) actor runs its
    constructor and methods on the worker's main thread, which lives as long as the actor."""

    def __init__(self, serve_args: list[str], env: dict[str, str]) -> None:
        import ray

        ctx = ray.get_runtime_context()
        port = free_port("0.0.0.0")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
        self.proc = subprocess.Popen(serve_command(port, serve_args, host="0.0.0.0"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent())
        self.placement = {"url": f"http://{ray.util.get_node_ip_address()}:{port}", "node_id": ctx.get_node_id(),
                          "pid": self.proc.pid, "actor_pid": os.getpid()}

    def info(self) -> dict:
        """{url, node_id (Ray's hex id of the node it runs on), pid (the server's), actor_pid}."""
        return self.placement

    def url(self) -> str:
        return self.placement["url"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RayActuator(Actuator):
    """Replicas as Ray actors on the cluster `ray.init` connected to. `scheduling_strategy`: "SPREAD" (replicas on
    as many nodes as have room) or "DEFAULT" (Ray's: fill the local node first). `ping_timeout_s`: how long a
    placed replica may leave its liveness ping unanswered before it counts as dead."""

    def __init__(self, gateway: GatewayAdmin | None, serve_args: list[str], num_cpus: float = 1.0,
                 num_gpus: float = 0.0, scheduling_strategy: str = "SPREAD", ping_timeout_s: float = 5.0,
                 suspect_node_s: float = 60.0, **kw) -> None:
        import ray

        if scheduling_strategy not in SCHEDULING_STRATEGIES:
            raise ValueError(f"scheduling_strategy must be one of {', '.join(SCHEDULING_STRATEGIES)}, "
                             f"not {scheduling_strategy!r}")
        assert ping_timeout_s > 0
        super().__init__(gateway, **kw)
        self.ray = ray
        self.serve_args = list(serve_args)
        self.ping_timeout_s, self.suspect_node_s = ping_timeout_s, suspect_node_s
        self.suspect: dict[str, float] = {}  # node id → when a replica's actor was lost there
        # the server's environment, not the actor's runtime_env: an actor with the job's own runtime_env can start
        # in one of the workers Ray keeps warm, a second or two sooner when a lost replica is replaced
        self.serve_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, int(num_cpus))))}
        self.actor_cls = ray.remote(ReplicaServer)
        self.actor_options = dict(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=scheduling_strategy,
                                  max_restarts=0)

    def _launch(self, replica_id: str) -> dict:
        options = dict(self.actor_options)
        avoid = self._nodes_to_avoid()
        if avoid:
            options["label_selector"] = {NODE_ID_LABEL: f"!in({', '.join(avoid)})"}
            log.info("replica %s avoids node(s) %s (a replica there was lost)", replica_id, ", ".join(avoid))
        actor = self.actor_cls.options(**options).remote(self.serve_args, self.serve_env)
        return {"actor": actor, "info_ref": actor.info.remote(), "info": None, "ping": None, "ping_at": 0.0,
                "dead": False}

    def _url(self, replica: Replica) -> str | None:
        h = replica.handle
        ready, _ = self.ray.wait([h["info_ref"]], timeout=0)  # pending while Ray has no node with room for it
        if not ready:
            return None
        try:
            h["info"] = self.ray.get(h["info_ref"])
        except self.ray.exceptions.RayError:  # it died starting: the next _alive says so
            return None
        log.info("replica %s placed on node %s at %s", replica.id, h["info"]["node_id"], h["info"]["url"])
        return h["info"]["url"]

    def _nodes_to_avoid(self) -> list[str]:
        """Nodes where a replica's actor was lost in the last `suspect_node_s`: Ray counts such a node alive, with
        the lost replica's room free, until its health checks fail (seconds to tens of seconds), and would place
        the replacement there. Avoided only while another live node exists, so a one-node cluster still refills."""
        now = time.monotonic()
        self.suspect = {n: t for n, t in self.suspect.items() if now - t < self.suspect_node_s}
        if not self.suspect:
            return []
        others = [n for n in self.ray.nodes() if n["Alive"] and n["NodeID"] not in self.suspect]
        return sorted(self.suspect) if others else []

    def node_id(self, replica: Replica) -> str | None:
        """The Ray node the replica runs on; None until it is placed."""
        info = replica.handle["info"]
        return info["node_id"] if info else None

    def _alive(self, replica: Replica) -> bool:
        h = replica.handle
        if replica.url is None:
            return not self._failed(h["info_ref"])  # not placed yet, unless the actor died starting
        if h["ping"] is None:
            h["ping"], h["ping_at"] = h["actor"].alive.remote(), time.monotonic()
        ready, _ = self.ray.wait([h["ping"]], timeout=0)
        lost = False  # the actor itself is gone (not only its server): its node is suspect
        if not ready:
            lost = time.monotonic() - h["ping_at"] >= self.ping_timeout_s
            alive = not lost
        else:
            try:
                alive = self.ray.get(h["ping"])
            except self.ray.exceptions.RayError:  # the actor (or its node) died
                alive, lost = False, True
            h["ping"] = None
        if lost:
            self.suspect[h["info"]["node_id"]] = time.monotonic()
        h["dead"] = not alive
        return alive

    def _failed(self, ref) -> bool:
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return False
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError:
            return True
        return False

    def _terminate(self, replica: Replica, grace_s: float) -> None:
        actor = replica.handle["actor"]
        try:
            if replica.url is not None and not replica.handle["dead"]:  # a dead one's stop would only time out
                self.ray.get(actor.stop.remote(grace_s), timeout=grace_s + 30)
        except Exception:  # already dead (its node lost): ray.kill below is all that is left to do
            pass
        self.ray.kill(actor)
