"""Perplexity of a loaded model on a token sequence, through the engine's own forward (paged KV cache included)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conveyor.engine.kv_cache_manager import cdiv
from conveyor.model.attention import kv_cache_shape, prompt_metadata, resolve_backend
from conveyor.model.loader import LoadedModel

BLOCK_SIZE = 16
LOGIT_ROWS = 128  # positions per logits slice: 128 x 49k vocab x 4 bytes = 25 MB at a time


@dataclass
class PerplexityResult:
    num_tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood of the scored tokens, nats per token
    ppl: float  # exp(nll)
    windows: int
    predictions: list[int]  # the greedy (argmax) next token at each scored position, in text order


def windows(num_tokens: int, context: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(start, first_scored) per window: a window is token_ids[start:start + context] and scores its tokens at
    positions first_scored .. start + context - 1, each predicted from all the window's tokens before it.

    Windows start every `stride` tokens (default `context`: non-overlapping) and only whole windows are used. Each
    scores its last min(stride, context // 2) tokens, so every scored token has at least context / 2 tokens of
    history and no token is scored twice; with stride <= context // 2 every token from the first window's first
    scored one to the last window's end is scored exactly once. The default is what llama.cpp's llama-perplexity
    does with `-c context` (tools/perplexity/perplexity.cpp: chunks of n_ctx tokens, logits kept from
    first = n_ctx / 2), except that llama.cpp starts scoring one token later in each chunk (it scores n_ctx/2 - 1
    tokens per chunk, we score n_ctx/2). Raises ValueError if context < 2, stride < 1, or the text is shorter
    than one window."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    stride = context if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be at least 1 token, got {stride}")
    if num_tokens < context:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of {context}")
    scored = min(stride, context // 2)
    return [(s, s + context - scored) for s in range(0, num_tokens - context + 1, stride)]


def _model_device(loaded: LoadedModel) -> torch.device:
    return next(t.device for t in (*loaded.model.parameters(), *loaded.model.buffers()))


@torch.inference_mode()
def perplexity(loaded: LoadedModel, token_ids: list[int], context: int = 512, stride: int | None = None,
               device: str | torch.device | None = None, bos_token_id: int | None = None) -> PerplexityResult:
    """Perplexity of `token_ids` under the model, in windows of `context` tokens (see `windows`).

    Each window is one prefill through LlamaForCausalLM.forward with a paged KV cache of its own; logits of the
    scored positions are computed LOGIT_ROWS at a time, log-softmaxed in float32, and their next-token NLLs summed in
    float64; the argmax at each scored position is kept (`predictions`: greedy choices to compare across weights).
    With `bos_token_id` set, each window's first token is replaced by it, as llama.cpp does for models whose
    tokenizer adds a BOS (that token is never scored). `device` defaults to the model's.
    Raises ValueError for a context over the model's max_model_len, a token id outside the vocabulary, or what
    `windows` rejects."""
    spans = windows(len(token_ids), context, stride)
    if context > loaded.max_model_len:
        raise ValueError(f"context {context} exceeds the model's max_model_len {loaded.max_model_len}")
    vocab = loaded.arch.vocab_size
    if min(token_ids) < 0 or max(token_ids) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab})")
    dev = torch.device(device) if device is not None else _model_device(loaded)
    a, model = loaded.arch, loaded.model
    nb = cdiv(context, BLOCK_SIZE)
    kv = [torch.zeros(kv_cache_shape(nb, BLOCK_SIZE, a.num_kv_heads, a.head_dim), dtype=loaded.dtype, device=dev)
          for _ in range(a.num_layers)]
    positions = torch.arange(context, device=dev)
    meta = prompt_metadata(context, BLOCK_SIZE, a.sliding_window, resolve_backend("auto", dev), dev)
    ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
    total, count, argmax = torch.zeros((), dtype=torch.float64, device=dev), 0, []
    for start, first in spans:
        window = ids[start:start + context].clone()
        if bos_token_id is not None:
            window[0] = bos_token_id
        hidden = model(window, positions, kv, meta)
        # the logits at window position p predict the token at p + 1
        for row in range(first - start - 1, context - 1, LOGIT_ROWS):
            end = min(row + LOGIT_ROWS, context - 1)
            logp = F.log_softmax(model.compute_logits(hidden[row:end]).float(), dim=-1)
            total -= logp.gather(1, window[row + 1:end + 1, None]).sum(dtype=torch.float64)
            argmax.append(logp.argmax(-1))
        count += start + context - first
    nll = total.item() / count
    predictions = torch.cat(argmax).tolist()
    assert len(predictions) == count
    return PerplexityResult(num_tokens=count, nll=nll, ppl=math.exp(nll), windows=len(spans), predictions=predictions)
