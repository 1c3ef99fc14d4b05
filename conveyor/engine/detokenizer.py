"""Incremental detokenization and stop checks.

Text for new tokens is the decoding of a short window of recent tokens minus the decoding of the window without
them; the window's leading tokens give tokenizers that drop a word's leading space at the start of a string the
context they need. Text ending in U+FFFD (an incomplete UTF-8 character) is held back until the next token
completes it.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from conveyor.engine.sequence import FinishReason, Sequence


def detokenize_incrementally(tokenizer: PreTrainedTokenizerBase, seq: Sequence, final: bool = False) -> str:
    """Advance seq's detokenization state over its newest tokens; returns the newly completed text.
    `final` flushes held-back bytes that will never complete (invalid UTF-8 becomes U+FFFD)."""
    ids = seq.token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
        return ""
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return full[len(prefix):]


def check_stop(seq: Sequence, new_token: int, eos_token_ids: list[int], max_model_len: int) -> FinishReason | None:
    """Called after new_token is appended. A stop token (eos or stop_token_ids) ends the sequence; its text is
    added only with include_stop_str_in_output (vLLM's rule; eos usually decodes to nothing)."""
    p = seq.params
    if seq.num_output_tokens > p.min_tokens and (
            (not p.ignore_eos and new_token in eos_token_ids) or new_token in p.stop_token_ids):
        return FinishReason.STOP
    if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def find_stop_string(seq: Sequence, new_text_len: int) -> bool:
    """If a stop string now appears in the output, cut the text before it (after it with
    include_stop_str_in_output) and return True. The first occurrence of any stop string decides.
    Only the tail that the new text could have completed is searched. Like stop tokens (check_stop), stop strings
    only end a sequence once it has more than min_tokens output tokens."""
    stops = seq.params.stop_list
    if not stops or not new_text_len or seq.num_output_tokens <= seq.params.min_tokens:
        return False
    text = seq.output_text
    start = max(0, len(text) - new_text_len - max(len(s) for s in stops) + 1)
    hits = [(i, len(s)) for i, s in ((text.find(s, start), s) for s in stops) if i != -1]
    if not hits:
        return False
    i, n = min(hits)
    seq.output_text = text[:i + n] if seq.params.include_stop_str_in_output else text[:i]
    return True
