"""How `conveyor gateway --workers N` should share its port: one listening socket inherited by every worker (what
workers.py does) or a socket per worker with SO_REUSEPORT. Per mode: requests/s, how the connections spread over the
workers, and, with one worker SIGKILLed mid-window and started again 0.5 s later (as the supervisor does), how many
requests fail.

The workers are minimal uvloop HTTP servers (a fixed 200 naming the worker), not the gateway: only the accept path
differs between the modes, and the gateway's own per-request cost would hide it. The load: --conns client loops in
--procs processes, each request on a new connection (accept-bound: short requests from many clients). Windows of the
two modes alternate (--rounds), so both see the same machine; CPU utilization of the whole machine is reported with
each.

    .venv/bin/python bench/gateway_accept.py [--workers 2 --seconds 4 --rounds 2 --conns 64 --procs 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import uvloop

RESPONSE = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\nx-worker: {}\r\n\r\nok"


# ---- a worker --------------------------------------------------------------------------------------------------------
def serve(index: int, fd: int | None, port: int) -> None:
    """Answer every request with RESPONSE and close; on the inherited fd, or a SO_REUSEPORT socket of its own."""
    if fd is not None:
        sock = socket.socket(fileno=fd)
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(2048)
    reply = RESPONSE.format(index).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=sock, backlog=2048)
        await server.serve_forever()
    uvloop.run(main())


def start_worker(index: int, mode: str, sock: socket.socket) -> subprocess.Popen:
    fd = sock.fileno() if mode == "shared" else None
    cmd = [sys.executable, __file__, "--serve", str(index), "--port", str(sock.getsockname()[1])]
    if fd is not None:
        cmd += ["--fd", str(fd)]
    return subprocess.Popen(cmd, pass_fds=(fd,) if fd is not None else ())


# ---- the load ------------------------------------------------------------------------------------------------------
def load(port: int, conns: int, seconds: float) -> None:
    """--conns loops of one request per connection for `seconds`; prints {"workers": {i: n}, "errors": n}."""
    served: Counter = Counter()
    errors = 0
    request = f"GET / HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def loop(deadline: float) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                data = await reader.read()
                writer.close()
                head = data.split(b"\r\n\r\n", 1)[0]
                served[head.rsplit(b"x-worker: ", 1)[1].decode()] += 1
            except (OSError, IndexError):
                errors += 1
                await asyncio.sleep(0.01)

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(loop(deadline) for _ in range(conns)))
    uvloop.run(main())
    print(json.dumps({"workers": dict(served), "errors": errors}))


def cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return v[3] + v[4], sum(v)  # idle + iowait, all


def window(mode: str, a: argparse.Namespace, kill: bool) -> dict:
    """One window of one mode: fresh workers, the load, optionally a worker killed and restarted halfway."""
    listen = socket.create_server(("127.0.0.1", 0), backlog=2048)
    listen.set_inheritable(True)
    if mode == "reuseport":  # the port stays reserved by a socket that is not listening
        port = listen.getsockname()[1]
        listen.close()
        listen = socket.socket()
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listen.bind(("127.0.0.1", port))
    workers = [start_worker(i, mode, listen) for i in range(a.workers)]
    time.sleep(1.0)
    idle0, all0 = cpu_busy()
    t0 = time.monotonic()
    share = a.conns // a.procs
    clients = [subprocess.Popen([sys.executable, __file__, "--load", str(listen.getsockname()[1]), "--conns",
                                 str(share), "--seconds", str(a.seconds)], stdout=subprocess.PIPE, text=True)
               for _ in range(a.procs)]
    if kill:
        time.sleep(a.seconds / 2)
        workers[-1].send_signal(signal.SIGKILL)
        workers[-1].wait()
        time.sleep(0.5)
        workers[-1] = start_worker(a.workers - 1, mode, listen)
    outs = [json.loads(c.communicate()[0]) for c in clients]
    elapsed = time.monotonic() - t0
    idle1, all1 = cpu_busy()
    for w in workers:
        w.kill()
        w.wait()
    listen.close()
    served: Counter = Counter()
    for o in outs:
        served.update(o["workers"])
    total = sum(served.values())
    return {"mode": mode, "kill": kill, "rps": total / elapsed, "errors": sum(o["errors"] for o in outs),
            "split": [served.get(str(i), 0) / max(total, 1) for i in range(a.workers)],
            "cpu": 1 - (idle1 - idle0) / max(all1 - all0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    p.add_argument("--rounds", type=int, default=2, help="windows per mode and case, interleaved")
    p.add_argument("--conns", type=int, default=64, help="concurrent client loops, in all")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        return serve(a.serve, a.fd, a.port)
    if a.load is not None:
        return load(a.load, a.conns, a.seconds)
    rows = [window(mode, a, kill) for _ in range(a.rounds) for kill in (False, True)
            for mode in ("shared", "reuseport")]
    print(f"{'mode':<10} {'worker killed':>13} {'req/s':>8} {'failed':>7} {'split over workers':>22} {'cpu':>5}")
    for r in rows:
        split = "/".join(f"{s:.0%}" for s in r["split"])
        print(f"{r['mode']:<10} {'yes' if r['kill'] else 'no':>13} {r['rps']:>8.0f} {r['errors']:>7} {split:>22} "
              f"{r['cpu']:>5.0%}")


if __name__ == "__main__":
    main()
