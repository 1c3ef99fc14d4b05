"""Log-probabilities of chosen tokens under the model's raw distribution, with the top-k alternatives.

Used for sampled tokens (the sampler: every row, since cumulative_logprob needs the sampled token's logprob even
when no logprobs were asked for) and for prompt tokens (prompt_logprobs). One log_softmax over the rows, a gather
and a top-k: on CPU log_softmax measured faster than logit - logsumexp (2.6 vs 4.6 ms for 32 x 49152 float32 rows
on one thread; torch's logsumexp is not one fused kernel there) and it is exact for a token of probability near 1,
where logit - logsumexp loses digits to cancellation.
"""
from __future__ import annotations

import torch


class Logprobs(dict[int, float]):
    """{token: logprob} of one position (the chosen token first, then its top-k alternatives) with `rank`, the
    chosen token's rank in the whole vocabulary: 1 + the number of tokens with a strictly greater logprob (vLLM's
    rank), so ties share the best rank."""
    __slots__ = ("rank",)

    def __init__(self, items: dict[int, float], rank: int) -> None:
        super().__init__(items)
        self.rank = rank


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, tokens: list[int], top_k: list[int]) -> list[Logprobs]:
    """logits [rows, vocab] (any float dtype; computed in float32), tokens one id per row, top_k one count per row.
    Returns per row {token: logprob, then up to top_k[i] most likely tokens: logprob} (the chosen token first; it
    appears once even when it is among the top-k), in nats, with the chosen token's vocabulary rank (one
    comparison per vocabulary entry)."""
    assert logits.dim() == 2 and logits.shape[0] == len(tokens) == len(top_k)
    if not tokens:
        return []
    lp = logits.float().log_softmax(dim=-1)
    ids = torch.tensor(tokens, dtype=torch.long, device=lp.device)
    chosen_t = lp.gather(1, ids[:, None])
    ranks = ((lp > chosen_t).sum(dim=1) + 1).tolist()
    result = [Logprobs({t: v}, r) for t, v, r in zip(tokens, chosen_t.squeeze(1).tolist(), ranks)]
    k = max(top_k)
    if k:
        top_v, top_i = lp.topk(min(k, lp.shape[1]), dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for d, n, vs, ts in zip(result, top_k, top_v, top_i):
            for t, v in zip(ts[:n], vs[:n]):
                d.setdefault(t, v)
    return result
