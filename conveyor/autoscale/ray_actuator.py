"""The Ray actuator: each replica is a Ray actor that runs `conveyor serve` on the node Ray placed it on.

The actor reserves what one replica needs (`num_cpus`, `num_gpus`), so Ray places replicas across the cluster's
nodes, and an actor that cannot be placed stays pending — the demand Ray's own autoscaler adds nodes for. The
server runs as a child process of the actor (not in the actor's own process) so that stopping it is a SIGTERM
that drains like any `conveyor serve`, and a crashed server is seen as a dead replica.
"""
from __future__ import annotations

import os
import subprocess

from conveyor.autoscale.actuator import Actuator, GatewayAdmin, Replica
from conveyor.autoscale.local import free_port, serve_command


class ReplicaServer:
    """The actor body (wrapped with ray.remote at runtime, so importing this module needs no Ray)."""

    def __init__(self, serve_args: list[str]) -> None:
        import ray

        ip = ray.util.get_node_ip_address()
        port = free_port("0.0.0.0")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(serve_command(port, serve_args, host="0.0.0.0"), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.endpoint = f"http://{ip}:{port}"

    def url(self) -> str:
        return self.endpoint

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pid(self) -> int:
        return self.proc.pid

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
    def __init__(self, gateway: GatewayAdmin | None, serve_args: list[str], num_cpus: float = 1.0,
                 num_gpus: float = 0.0, **kw) -> None:
        import ray

        super().__init__(gateway, **kw)
        self.ray = ray
        self.serve_args = list(serve_args)
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, int(num_cpus))))}
        self.actor_cls = ray.remote(ReplicaServer).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                           runtime_env={"env_vars": env})

    def _launch(self, replica_id: str):
        actor = self.actor_cls.remote(self.serve_args)
        return {"actor": actor, "url_ref": actor.url.remote()}

    def _url(self, replica: Replica) -> str | None:
        ref = replica.handle["url_ref"]
        ready, _ = self.ray.wait([ref], timeout=0)  # pending while Ray has no node with room for the actor
        return self.ray.get(ref) if ready else None

    def _alive(self, replica: Replica) -> bool:
        if replica.url is None:
            return True  # not placed yet
        try:
            return self.ray.get(replica.handle["actor"].alive.remote(), timeout=10)
        except Exception:  # the actor (or its node) died
            return False

    def _terminate(self, replica: Replica, grace_s: float) -> None:
        actor = replica.handle["actor"]
        try:
            if replica.url is not None:
                self.ray.get(actor.stop.remote(grace_s), timeout=grace_s + 30)
        except Exception:
            pass
        self.ray.kill(actor)
