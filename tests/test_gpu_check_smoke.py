"""bench/gpu_check.py --smoke: the GPU check's whole path at tiny sizes on CPU (Triton's interpreter for the kernel,
Conveyor with the Triton attention backend and transformers on a 2-layer model), so the script is known to run before
a GPU machine is lent."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert len(re.findall(r"^ok   parity ", out, re.M)) == 3 and "FAIL" not in out
    # batch, roofline, then tok/s and % of the roofline for conveyor, conveyor eager, conveyor with async
    # scheduling, conveyor with torch attention, transformers (tok/s is nan where a busy machine made the longer run
    # the faster one)
    rows = re.findall(r"^\s+(\d+)\s+(\d+)" + r"\s+([\d.]+|nan)\s+(?:[\d.]+|nan)%" * 5, out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 4], out
    assert len(re.findall(r"^ok   CUDA graph greedy tokens = eager at batch \d+ $", out, re.M)) == 3, out
    assert len(re.findall(r"^ok   async scheduling greedy tokens = synchronous at batch \d+ $", out, re.M)) == 3, out
    launches = re.search(r"^Triton attention launches from Python during Conveyor's runs: (\d+) ", out, re.M)
    assert launches and int(launches.group(1)) > 0, out  # the engine ran its attention through the kernel
    assert "all checks passed" in out
