"""`python tests/fault_server.py serve ...`: the real `conveyor serve`, with a fault injected into the model runner,
chosen by the environment variable CONVEYOR_TEST_FAULT:

- "poison": a forward whose batch holds a sequence whose prompt starts with POISON, once it has generated two tokens
  (so a stream has begun), raises as a device error triggered by one request would; everything else runs for real.
- "device": like "poison", but from the first poisoned forward on, every forward raises (a broken device).
"""
from __future__ import annotations

import os
import sys

from conveyor import cli
from conveyor.model.runner import ModelRunner

POISON = [7, 7, 7, 7]  # prompt token ids no test sends otherwise


def install(mode: str) -> None:
    execute = ModelRunner.execute
    broken = False

    def faulty(self, scheduled, *args, **kwargs):
        nonlocal broken
        if any(s.seq.token_ids[:len(POISON)] == POISON and s.seq.num_output_tokens >= 2 for s in scheduled):
            broken = mode == "device"
            raise RuntimeError("injected fault")
        if broken:
            raise RuntimeError("injected fault: the device is gone")
        return execute(self, scheduled, *args, **kwargs)

    ModelRunner.execute = faulty


if __name__ == "__main__":
    install(os.environ["CONVEYOR_TEST_FAULT"])
    sys.exit(cli.main(sys.argv[1:]))
