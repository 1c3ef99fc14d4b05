"""Attacks on the batch tier's latest rules (issue 16): the queued-tokens bound that replaces the per-minute rate
limits for batch lines, and the worker's bookkeeping of a line's replica failures."""
from __future__ import annotations

from conveyor.gateway.batch_store import estimate_tokens


def test_every_prompt_of_a_completion_line_counts_its_generation():
    """Batch lines skip the per-minute limits, so batch_queued_tokens is their only bound: a completion line of
    1000 prompts generates max_tokens for each (as the gateway reserves), not once."""
    assert estimate_tokens("/v1/completions", {"prompt": ["a"] * 1000, "max_tokens": 1000}, None) == 1000 + 1000 * 1000
    assert estimate_tokens("/v1/completions", {"prompt": [[1, 2], [3]], "n": 2}, None) == 3 + 16 * 2 * 2
    assert estimate_tokens("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4}, None) == 3 + 4  # one prompt
