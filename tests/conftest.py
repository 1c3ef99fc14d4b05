from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from checkpoints import write_checkpoint  # noqa: E402

KINDS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = str(write_checkpoint(kind, tmp_path_factory.mktemp(kind)))
        return cache[kind]

    return get


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test models are tiny: one intra-op thread beats two threads busy-waiting on a shared 2-core machine
    (where a test server process may be computing at the same time)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
