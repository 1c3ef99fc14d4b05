"""Starts a real `conveyor serve` process on a free loopback port for end-to-end tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from conveyor.prometheus_text import samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, logs, ok=lambda status: status == 200) -> None:
    """Poll url/health until ok(status); raises (with the process's logs) if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{logs()}")
        try:
            if ok(httpx.get(f"{url}/health", timeout=1).status_code):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy:\n{logs()}")


class ServerProcess:
    """`conveyor serve ARGS` on a free loopback port, its output in a log file; `env` is added to the environment
    (secrets go there, not into ARGS, so they stay out of `ps`). `--model default_model` is added when ARGS have
    no --model; default_model=None starts ARGS as they are (a positional model, or none: the built-in real one)."""

    command = "serve"
    entry: tuple[str, ...] = ("-m", "conveyor.cli")  # what python runs: a test may wrap the CLI (fault injection)

    def __init__(self, *args: str, startup_timeout: float = 120.0, env: dict[str, str] | None = None,
                 default_model: str | None = "demo") -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        if self.command == "serve" and default_model and "--model" not in args:
            args = ("--model", default_model, *args)  # serve's own default is the built-in real model
        cmd = [sys.executable, *self.entry, self.command, "--port", str(self.port), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))  # tiny models: 1 thread
        self.log_path = f"/tmp/conveyor-test-{self.command}-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(self.proc, self.base_url, startup_timeout, self.logs)
        except BaseException:  # also Ctrl-C while waiting: never leave the process behind
            self.stop()
            raise

    def openai_client(self):
        """An openai SDK client of this server (no retries: a test sees each answer as it is)."""
        import openai
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def logs(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str, **labels: str) -> float:
        """The first sample called name whose labels include `labels` (KeyError: none)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        for s in samples(text):
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
        raise KeyError(name)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class GatewayProcess(ServerProcess):
    """`conveyor gateway --config CONFIG_PATH ARGS` on a free loopback port (healthy once it answers /health)."""

    command = "gateway"

    def __init__(self, config_path: str, *args: str, startup_timeout: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        super().__init__("--config", config_path, *args, startup_timeout=startup_timeout, env=env)


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll cond() every 50 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def dribble(port: int, head: bytes, trickle: bytes, every_s: float = 0.2, bound_s: float = 20.0) -> tuple[bytes, float]:
    """Send head, then trickle one byte every every_s; returns what came back and when the server closed."""
    t0 = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=bound_s) as s:
        s.sendall(head)
        for b in trickle:
            try:
                s.sendall(bytes([b]))
                s.settimeout(every_s)
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            got += data
            if not data or time.monotonic() - t0 > bound_s:
                break
        s.settimeout(bound_s)
        try:
            while data := s.recv(65536):
                got += data
        except OSError:
            pass
    return got, time.monotonic() - t0
