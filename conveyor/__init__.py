"""Conveyor: an LLM serving stack."""
from conveyor.llm import LLM
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
