"""`conveyor gateway --workers N` (Linux): a supervisor process and N worker processes on one listening socket.

The supervisor checks what it can before any worker starts (the config, `redis_url`, the batch store, the tracing
URL) and binds the socket, so a bad config or a busy port is one line and exit 2. Then it starts the workers
(`python -m conveyor.gateway.workers`), each a whole gateway (uvicorn and the app, conveyor.cli.cmd_gateway)
accepting on the inherited socket, and watches them:
- a worker that exits is started again after a backoff (RESTART_BASE_S doubling up to RESTART_MAX_S, back to the
  base once a worker ran RESTART_RESET_S), each exit logged; a worker's first process that fails to start (exit 2:
  it refused the config, something only a worker checks; exit 3: uvicorn's startup failure, e.g. a tokenizer that
  cannot be loaded) ends the gateway with that status instead: every restart would fail the same way;
- a worker tells the supervisor it serves by writing one byte to a pipe once uvicorn's startup completed (it then
  accepts on the socket). A worker whose processes exit before that START_ATTEMPTS times in a row, whatever their
  status (a traceback is exit 1), ends the gateway with one line on stderr and exit 1: restarted for ever, it would
  leave the socket accepting connections nobody serves. One that served and then exits is restarted as above;
- SIGTERM / SIGINT: SIGTERM to every worker (uvicorn's graceful stop: open requests get 5 s), SIGKILL to one still
  running after STOP_TIMEOUT_S; exit 0. A second SIGINT is passed on (a worker then stops waiting for its requests);
- SIGHUP: the supervisor reads the config file first; if it loads and still has `redis_url`, SIGHUP is passed on
  and each worker re-reads it (else the workers keep theirs, and the refusal is logged);
- workers die with the supervisor: each asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG) and
  exits at once if the supervisor is gone already.

One shared socket rather than SO_REUSEPORT per worker: the connections wait in one accept queue, so the ones queued
when a worker dies are accepted by the others (SO_REUSEPORT hashes each connection to one worker's queue, and a dead
worker's queue is reset), and the worker whose event loop is free first accepts the next one.

Metrics: prometheus_client's multiprocess mode in a fresh PROMETHEUS_MULTIPROC_DIR per run, removed when the
supervisor exits; /metrics on any worker renders every worker's series merged (metrics.py). A dead worker's live
gauges are dropped (mark_process_dead); its counters stay in the sums.

The batch worker runs in worker 0 only (and in each of its restarts): the batch tier's exactly-once rules assume one
dispatcher. Every worker serves the Batch API from the shared SQLite store.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from prometheus_client.multiprocess import mark_process_dead

from conveyor.gateway.batch_store import BatchStore, default_path
from conveyor.gateway.config import ConfigError, load_config
from conveyor.server.logs import JsonFormatter
from conveyor.tracing import traces_endpoint

log = logging.getLogger("conveyor.gateway.workers")

RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
RESTART_RESET_S = 30.0  # a worker that ran this long crashed on its own: the next restart waits RESTART_BASE_S
STOP_TIMEOUT_S = 20.0  # uvicorn's graceful stop (5 s), the batch worker's and the pools' shutdown, then SIGKILL
TICK_S = 0.1  # how often the supervisor looks at its workers
BACKLOG = 2048  # uvicorn's default
SPEC_ENV = "CONVEYOR_GATEWAY_WORKER"  # the worker's flags as JSON (not in argv: `ps` shows argv)
PR_SET_PDEATHSIG = 1
START_FAILURES = (2, 3)  # a worker's exit status when cmd_gateway refused the config / uvicorn's app startup failed
START_ATTEMPTS = 5  # a worker's processes that exit before serving, in a row, before the gateway gives up


class StartError(Exception):
    """A reason the gateway cannot start, as the one line printed after `error: `."""


def supervise(a: argparse.Namespace) -> int:
    """Run `conveyor gateway` flags `a` as a supervisor of a.workers processes until SIGTERM/SIGINT (0); 2 when it
    cannot start (one line on stderr), or a worker's status when its first start failed (START_FAILURES)."""
    assert a.workers > 1, a.workers
    try:
        sock = check_and_listen(a)
    except (StartError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="conveyor-gateway-metrics-")
    try:
        sup = Supervisor(a, sock, metrics_dir)
        code = sup.run()
        if sup.error is not None:
            print(f"error: {sup.error}", file=sys.stderr)
        return code
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def check_and_listen(a: argparse.Namespace) -> socket.socket:
    """The listening socket for `a`, after checking the platform, the config file and the tracing URL. Raises
    StartError, ConfigError or OSError (the batch store), each saying what is wrong."""
    if not sys.platform.startswith("linux"):
        raise StartError(f"--workers {a.workers} needs Linux (this is {sys.platform}); run one process per port "
                         f"behind a load balancer instead")
    cfg = load_config(a.config)
    if not cfg.redis_url:
        raise StartError(f"--workers {a.workers} needs redis_url in {a.config}: the worker processes share rate "
                         f"limits, concurrency caps and the fair queue through Redis (or use --workers 1)")
    BatchStore(cfg.batch.db_path or default_path()).close()
    if a.otlp_traces_endpoint is not None:
        try:
            traces_endpoint(a.otlp_traces_endpoint)
        except ValueError as e:
            raise StartError(f"--otlp-traces-endpoint: {e}") from None
    return listen(a.host, a.port)


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (SO_REUSEADDR), inheritable by the workers. StartError when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as e:
        raise StartError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class Slot:
    """One worker's place: its current process and its restart state."""
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0  # monotonic
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None  # monotonic; set while it waits to be started again
    ready_fd: int | None = None  # the read end of the current process's readiness pipe, until it said it serves
    served: bool = False  # the current process said it serves
    failed_starts: int = 0  # processes in a row that exited before serving


class Supervisor:
    def __init__(self, a: argparse.Namespace, sock: socket.socket, metrics_dir: str) -> None:
        self.a, self.sock, self.metrics_dir = a, sock, metrics_dir
        self.slots = [Slot(i) for i in range(a.workers)]
        self.stopping = False
        self.reload_pending = False
        self.interrupts = 0
        self.exit_code = 0
        self.error: str | None = None  # why the gateway gave up, for supervise() to print

    def run(self) -> int:
        """Start the workers and keep them running until a stop signal; the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        host, port = self.sock.getsockname()[:2]
        log.info(json.dumps({"event": "gateway_listening", "host": host, "port": port, "workers": len(self.slots),
                             "supervisor_pid": os.getpid()}))
        for slot in self.slots:
            if self.stopping:  # a stop signal came while they started: no more (the started ones have SIGTERM)
                break
            self._start(slot)
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if self.stopping:  # as at start: no restart once a stop signal came
                    break
                self._watch(slot, now)
            if self.reload_pending:
                self.reload_pending = False
                self._reload()
            time.sleep(TICK_S)
        self._stop_all()
        return self.exit_code

    def _on_signal(self, sig: int, frame) -> None:
        if sig == signal.SIGHUP:
            self.reload_pending = True  # the main loop checks the file (not in a signal handler)
            return
        self.interrupts += sig == signal.SIGINT
        if not self.stopping:
            self.stopping = True
            log.info(json.dumps({"event": "gateway_stopping", "signal": signal.Signals(sig).name}))
            self._send(signal.SIGTERM)
        elif sig == signal.SIGINT and self.interrupts > 1:
            self._send(signal.SIGINT)  # the second Ctrl-C: workers stop waiting for open connections

    def _reload(self) -> None:
        """SIGHUP: pass it on to the workers if the config file loads and keeps redis_url."""
        try:
            cfg = load_config(self.a.config)
            why = None if cfg.redis_url else f"--workers {len(self.slots)} needs redis_url"
        except (OSError, ConfigError) as e:
            why = str(e)
        if why is not None:
            log.error(json.dumps({"event": "config_reload_refused", "error": why}))
            return
        log.info(json.dumps({"event": "config_reload_forwarded", "workers": len(self._live())}))
        self._send(signal.SIGHUP)

    def _live(self) -> list[subprocess.Popen]:
        return [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def _send(self, sig: int) -> None:
        for proc in self._live():
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _command(self, slot: Slot) -> list[str]:
        return [sys.executable, "-m", "conveyor.gateway.workers", "--index", str(slot.index)]

    def _start(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        spec = {"fd": self.sock.fileno(), "ready_fd": write_fd, "parent_pid": os.getpid(), "index": slot.index,
                "args": {k: v for k, v in vars(self.a).items() if k != "func"}}
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir, **{SPEC_ENV: json.dumps(spec)})
        try:
            slot.proc = subprocess.Popen(self._command(slot), env=env, pass_fds=(self.sock.fileno(), write_fd))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the worker holds the only write end: EOF once it exits
        slot.ready_fd, slot.served = read_fd, False
        slot.started, slot.restart_at = time.monotonic(), None
        log.info(json.dumps({"event": "worker_started", "worker": slot.index, "pid": slot.proc.pid,
                             "restarts": slot.restarts}))

    def _check_ready(self, slot: Slot) -> None:
        """Read the worker's readiness byte if it came; the pipe is closed once it came or the worker exited."""
        if slot.ready_fd is None:
            return
        try:
            got = os.read(slot.ready_fd, 1)
        except BlockingIOError:
            return  # still starting
        os.close(slot.ready_fd)
        slot.ready_fd = None
        if got:
            slot.served, slot.failed_starts = True, 0
            log.info(json.dumps({"event": "worker_serving", "worker": slot.index, "pid": slot.proc.pid}))

    def _give_up(self, code: int, error: str | None) -> None:
        self.exit_code, self.error, self.stopping = code, error, True
        self._send(signal.SIGTERM)

    def _watch(self, slot: Slot, now: float) -> None:
        """Notice a worker's readiness and exit (schedule its restart, or stop the gateway) and start it again when
        due."""
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            return
        rc = slot.proc.poll()
        self._check_ready(slot)  # after poll(): a byte written before the exit is read now
        if rc is None:
            return
        self._check_ready(slot)  # EOF now if it never wrote (unless a child of it holds the write end)
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None
        mark_process_dead(slot.proc.pid, self.metrics_dir)
        if rc in START_FAILURES and slot.restarts == 0:  # its first start failed: so would every restart
            log.error(json.dumps({"event": "worker_start_failed", "worker": slot.index, "pid": slot.proc.pid,
                                  "returncode": rc}))
            self._give_up(rc, None)  # the worker printed why
            return
        slot.failed_starts += not slot.served
        if slot.failed_starts >= START_ATTEMPTS:
            log.error(json.dumps({"event": "worker_start_failed", "worker": slot.index, "pid": slot.proc.pid,
                                  "returncode": rc, "attempts": slot.failed_starts}))
            self._give_up(1, f"worker {slot.index} exited before serving {slot.failed_starts} times in a row (last "
                             f"exit status {rc}); its output above says why")
            return
        ran_s = now - slot.started
        slot.backoff_s = RESTART_BASE_S if ran_s >= RESTART_RESET_S else min(RESTART_MAX_S, max(
            RESTART_BASE_S, 2 * slot.backoff_s))
        slot.restart_at = now + slot.backoff_s
        log.error(json.dumps({"event": "worker_exited", "worker": slot.index, "pid": slot.proc.pid,
                              "returncode": rc, "ran_s": round(ran_s, 2), "restart_in_s": slot.backoff_s}))

    def _stop_all(self) -> None:
        """Wait for the workers (SIGTERM was sent) up to STOP_TIMEOUT_S, then SIGKILL the rest."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._live() and time.monotonic() < deadline:
            time.sleep(TICK_S)
        for proc in self._live():
            log.error(json.dumps({"event": "worker_killed", "pid": proc.pid, "after_s": STOP_TIMEOUT_S}))
            proc.kill()
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.wait()
                mark_process_dead(slot.proc.pid, self.metrics_dir)
            if slot.ready_fd is not None:
                os.close(slot.ready_fd)
                slot.ready_fd = None
        log.info(json.dumps({"event": "gateway_stopped", "exit_code": self.exit_code}))


# ---- the worker process --------------------------------------------------------------------------------------------
class WorkerFormatter(JsonFormatter):
    """The gateway's JSON log lines, each naming the worker (index and pid) that wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f'{{"worker": {index}, "pid": {os.getpid()}, '

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + super().format(record)[1:]


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when its parent dies; exits now if the parent (parent_pid) is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        sys.exit(1)


def worker_main() -> int:
    """A worker process: the gateway on the supervisor's socket (its spec in $CONVEYOR_GATEWAY_WORKER)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app handles it: a reload before then is no exit
    raw = os.environ.pop(SPEC_ENV, None)
    if raw is None:
        print("error: this is started by `conveyor gateway --workers N`, not by hand", file=sys.stderr)
        return 2
    spec = json.loads(raw)
    die_with_parent(spec["parent_pid"])
    a = argparse.Namespace(**spec["args"])
    from conveyor.server.logs import setup_json_logging

    setup_json_logging(getattr(logging, a.log_level.upper()))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(WorkerFormatter(spec["index"]))
    from conveyor.cli import cmd_gateway

    sock = socket.socket(fileno=spec["fd"])
    return cmd_gateway(a, sock=sock, runs_batches=spec["index"] == 0, ready=lambda: say_ready(spec["ready_fd"]))


def say_ready(fd: int) -> None:
    """Tell the supervisor this worker serves: one byte on its readiness pipe `fd`, then closed."""
    try:
        os.write(fd, b"1")
    except OSError:
        pass  # the supervisor is gone: PR_SET_PDEATHSIG stops this process
    finally:
        os.close(fd)


if __name__ == "__main__":  # argv (--index I) is only there to tell the workers apart in `ps`
    sys.exit(worker_main())
