"""Attacks on issue 15's attention backends from a user's side: the C++ kernel's build when the machine is not
as expected (no compiler, a build killed midway), and cpp/torch greedy parity through the engine's hard paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor import LLM, SamplingParams
from conveyor.kernels import cpu_ops

RESOLVE = "import torch; from conveyor.model.attention import resolve_backend; " \
          "print(resolve_backend('auto', torch.device('cpu')))"


def no_compiler_env(cache: Path) -> dict[str, str]:
    """PATH with python and ninja but no C++ compiler, and an empty kernel cache."""
    bin_dir = cache / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ninja").symlink_to("/usr/bin/ninja")
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{bin_dir}", CONVEYOR_CACHE_DIR=str(cache / "c"))


def test_auto_without_a_compiler_falls_back_to_torch_with_a_warning(tmp_path):
    r = subprocess.run([sys.executable, "-c", RESOLVE], env=no_compiler_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "torch"
    assert "could not build the CPU kernels" in r.stderr


def test_cpp_without_a_compiler_fails_with_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "conveyor.cli", "generate", "--model", "demo", "--prompt", "hi",
                        "--max-tokens", "1", "--attention-backend", "cpp"], env=no_compiler_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "compiler" in last and len(last) < 300, last
    assert "falls back" not in r.stderr and "!! WARNING !!" not in r.stderr


def test_a_build_killed_midway_does_not_wedge_later_starts(tmp_path):
    env = no_compiler_env(tmp_path)
    build = Path(env["CONVEYOR_CACHE_DIR"]) / "kernels" / cpu_ops.build_key()
    build.mkdir(parents=True)
    (build / "lock").touch()  # what a process killed during its build leaves behind
    try:
        r = subprocess.run([sys.executable, "-c", RESOLVE], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("resolve_backend('auto') still waits on the dead build's lock after 20 s")
    assert r.stdout.strip() == "torch"


@pytest.fixture(scope="module")
def windowed(checkpoint, tmp_path_factory) -> str:
    """Mistral with a sliding window of 8 tokens: most prompts and outputs here run past it."""
    src = Path(checkpoint("mistral"))
    dst = tmp_path_factory.mktemp("mistral-w8")
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg | {"sliding_window": 8}))
    return str(dst)


@pytest.mark.parametrize("model,options", [
    ("windowed", dict(block_size=1, num_kv_blocks=200, max_num_batched_tokens=16)),
    ("windowed", dict(block_size=8, num_kv_blocks=24, max_num_batched_tokens=32, preemption_mode="swap",
                      swap_space=0.01)),
    ("demo", dict(block_size=256, num_kv_blocks=4, max_num_batched_tokens=32,  # demo accepts most ngram drafts
                  speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})),
], ids=["block1-chunked", "swap-preemption", "block256-ngram"])
def test_cpp_and_torch_greedy_tokens_are_identical_in_float32(request, model, options):
    path = request.getfixturevalue(model) if model == "windowed" else model
    prompts = [{"prompt_token_ids": [(7 * i + j) % 250 + 3 for i in range(n)]} for j, n in enumerate([3, 30, 60, 90])]
    prompts.append({"prompt_token_ids": [11, 12, 13, 14, 15, 16, 17] * 7})
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    got = {}
    for backend in ("cpp", "torch"):
        llm = LLM(path, dtype="float32", attention_backend=backend, **options)
        got[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        stats = llm.stats()
        assert stats["kv_blocks_in_use"] == 0
        assert stats["num_preemptions_swap"] > 0 or "swap_space" not in options
        assert stats.get("spec_decode_num_accepted_tokens", 0) > 0 or "speculative_config" not in options
    assert got["cpp"] == got["torch"]


def test_a_kernel_built_into_a_read_only_cache_is_loaded(tmp_path):
    if not cpu_ops.load():
        pytest.skip("the CPU kernels do not build here")
    cache = tmp_path / "cache"
    shutil.copytree(cpu_ops.build_dir(), cache / "kernels" / cpu_ops.build_key())
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs a mount namespace (unshare -m) to make the cache read-only")
    script = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && exec \"$0\" -c \"$1\""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, RESOLVE],
                       env=dict(os.environ, CONVEYOR_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "cpp", r.stderr[-500:]


def test_a_built_kernel_loads_without_ninja_on_path(tmp_path):
    if not cpu_ops.load():
        pytest.skip("the CPU kernels do not build here")
    cache = tmp_path / "cache"
    shutil.copytree(cpu_ops.build_dir(), cache / "kernels" / cpu_ops.build_key())
    bin_dir = tmp_path / "bin"  # the compiler stays; only ninja is missing
    bin_dir.mkdir()
    for tool in ("g++", "c++", "gcc", "cc"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{bin_dir}", CONVEYOR_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", RESOLVE], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "cpp", r.stderr[-500:]
