"""Builds and loads Conveyor's CPU kernels, a PyTorch C++ extension (conveyor/kernels/cpu/*.cpp).

The extension is compiled once per machine with the host's own vector instructions (-march=native) into
cache_dir()/kernels/<key>, the key hashing the sources, the compiler flags, the torch version and the CPU's feature
flags, so a shared home directory on another CPU builds its own copy. `scripts/setup` builds it; later processes
load it in well under a second. Concurrent first builds are serialized by torch's file lock in the build directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger("conveyor.kernels")

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
# -ffp-contract=off: a * b + c rounds twice, as torch's separate ops do (the fused ops match them bit for bit in
# float32); the kernels' AVX-512 paths ask for fused multiply-adds explicitly
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-unknown-pragmas"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """Hash of everything the built library depends on."""
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + [torch.__version__, sys.version, _cpu_flags()]).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from conveyor.model.builtin import cache_dir
    return cache_dir() / "kernels" / build_key()


def load(verbose: bool = False) -> bool:
    """Compile (first time) and load the extension, registering torch.ops.conveyor.*. Returns False, after logging
    why, when it cannot be built (no C++ compiler, unsupported platform); error() then holds the reason."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _build(verbose)
        return bool(_state["ok"])


def error() -> str | None:
    """Why the last load() failed, one line; None if it succeeded or was not tried."""
    return _state.get("error")  # type: ignore[return-value]


def _build(verbose: bool) -> tuple[bool, str | None]:
    if platform.system() != "Linux":
        return False, f"the CPU kernels are built on Linux only (this is {platform.system()})"
    path = build_dir()
    lib = path / "conveyor_cpu_kernels.so"
    try:
        if not lib.exists():
            _compile(path, verbose)
        torch.ops.load_library(str(lib))  # no compiler, ninja or write access needed once built
    except Exception as e:  # a compiler error is many lines: keep the first that says something
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [repr(e)]
        return False, f"could not build the CPU kernels in {path}: {lines[0].strip()[:300]}"
    return True, None


def _compile(path: Path, verbose: bool) -> None:
    """Compile into path under an flock (released by the OS if this process dies, unlike torch's own lock file,
    which a killed build leaves behind for every later build to wait on forever)."""
    import fcntl
    import shutil

    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"error: no C++ compiler ({compiler}) on PATH")
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "conveyor.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "conveyor_cpu_kernels.so").exists():  # another process built it while we waited
            return
        (path / "lock").unlink(missing_ok=True)  # torch's lock, stale: only a holder of our flock builds here
        log.info("building the CPU kernels into %s (once per machine, about a minute)", path)
        cpp_extension.load(name="conveyor_cpu_kernels", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                           build_directory=str(path), is_python_module=False, verbose=verbose)


def main() -> int:
    """`python -m conveyor.kernels.cpu_ops`: build now (scripts/setup calls it), print where, exit 1 on failure."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = load(verbose=bool(os.environ.get("CONVEYOR_KERNELS_VERBOSE")))
    print(f"conveyor CPU kernels: {'built' if ok else 'NOT built'} ({build_dir()})" + ("" if ok else f": {error()}"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
