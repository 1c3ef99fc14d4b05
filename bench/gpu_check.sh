#!/usr/bin/env bash
# One command for a lent CUDA machine (torch, triton, transformers; no network, no FastAPI), under 8 minutes:
# bench/gpu_check.py (Triton attention parity and timing, decode throughput against the HBM roofline and against
# transformers), then, while time is left, the older gpu_check_*.py scripts, each cut off at the time remaining.
#     bash bench/gpu_check.sh              # PYTHON=... to pick the interpreter; arguments go to gpu_check.py
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
BUDGET=470  # seconds for everything
start=$SECONDS
timeout "$BUDGET" "$PY" bench/gpu_check.py "$@"
status=$?
[ $status -eq 124 ] && echo "FAIL bench/gpu_check.py did not finish within ${BUDGET} s"
for extra in gpu_check_quant gpu_check_spec gpu_check_structured; do
    left=$((BUDGET - (SECONDS - start)))
    if [ $left -lt 60 ]; then
        echo "skipped bench/$extra.py: ${left} s left (run it on its own)"
        continue
    fi
    echo "== bench/$extra.py (at most ${left} s)"
    timeout "$left" "$PY" "bench/$extra.py"
    rc=$?
    [ $rc -ne 0 ] && echo "bench/$extra.py exited $rc"
done
echo "gpu_check.py exit status $status; $((SECONDS - start)) s in all"
exit $status
