"""Conveyor: an LLM serving stack."""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_EXPORTS = {"LLM": "conveyor.llm", "SamplingParams": "conveyor.sampling_params",
            "RequestOutput": "conveyor.outputs", "CompletionOutput": "conveyor.outputs"}


def __getattr__(name: str):
    """Imported on first use, so that the gateway and autoscaler (which never run a model) start without torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
