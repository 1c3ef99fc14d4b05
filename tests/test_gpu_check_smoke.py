"""bench/gpu_check.py --smoke: the GPU check's whole path at tiny sizes on CPU (Triton's interpreter for the kernel,
Conveyor and transformers on a 2-layer model), so the script is known to run before a GPU machine is lent."""
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
    # batch, roofline, then tok/s and % of the roofline for conveyor, conveyor with torch attention, transformers
    rows = re.findall(r"^\s+(\d+)\s+(\d+)" + r"\s+([\d.]+)\s+[\d.]+%" * 3, out, re.M)
    assert [int(r[0]) for r in rows] == [1, 4, 8], out
    assert all(float(x) > 0 for r in rows for x in r[1:]), out
    assert "all checks passed" in out
