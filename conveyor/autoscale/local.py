"""The local actuator: each replica is a `conveyor serve` process on this machine, on a free port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from conveyor.autoscale.actuator import Actuator, GatewayAdmin, Replica


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(port: int, serve_args: list[str], host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "conveyor.cli", "serve", "--host", host, "--port", str(port), *serve_args]


class LocalActuator(Actuator):
    def __init__(self, gateway: GatewayAdmin | None, serve_args: list[str], log_dir: str | None = None,
                 host: str = "127.0.0.1", env: dict[str, str] | None = None, **kw) -> None:
        super().__init__(gateway, **kw)
        self.serve_args, self.host, self.log_dir = list(serve_args), host, log_dir
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))

    def _launch(self, replica_id: str) -> subprocess.Popen:
        port = free_port(self.host)
        out = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{replica_id}-{port}.log"), "w")
        proc = subprocess.Popen(serve_command(port, self.serve_args, self.host), stdout=out,
                                stderr=subprocess.STDOUT, env=self.env)
        proc.conveyor_url = f"http://{self.host}:{port}"  # known at once: we chose the port
        return proc

    def _url(self, replica: Replica) -> str | None:
        return replica.handle.conveyor_url

    def _alive(self, replica: Replica) -> bool:
        return replica.handle.poll() is None

    def _terminate(self, replica: Replica, grace_s: float) -> None:
        proc: subprocess.Popen = replica.handle
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
