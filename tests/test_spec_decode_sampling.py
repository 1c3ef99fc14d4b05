"""Speculative decoding samples from the target's distribution: chi-squared goodness-of-fit tests of rejection_sample
against known p and q, and of the engine's sampled outputs (draft model and ngram) against probabilities computed
from the target checkpoint by transformers.

Every run is seeded, so each test gives the same verdict on every run. Each test rejects at significance ALPHA:
Pearson's statistic over the cells (cells expected to hold fewer than 5 observations pooled into one), df = cells - 1,
p-value = the chi-squared survival function Q(df / 2, stat / 2) (torch.special.gammaincc; scipy is not installed).
A negative control in each part shows the test rejects a distribution that is wrong."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conveyor import LLM, SamplingParams
from conveyor.engine.spec_decode import NgramIndex, rejection_sample

ALPHA = 1e-3
TOP_K = 4


def chi2_pvalue(counts: Counter, probs: dict[tuple[int, ...], float]) -> float:
    """p-value of Pearson's chi-squared test that counts (cell -> observations) follow probs (cell -> probability).
    An observation in a cell of probability 0 is a failure by itself."""
    outside = {c: n for c, n in counts.items() if probs.get(c, 0.0) <= 0.0}
    assert not outside, f"observed outcomes the target never produces: {outside}"
    n = sum(counts.values())
    cells = sorted((p * n, counts.get(c, 0)) for c, p in probs.items() if p > 0)
    pooled_e, pooled_o, stat, df = 0.0, 0, 0.0, -1
    for e, o in cells:
        if e < 5:
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if pooled_e > 0:
        stat, df = stat + (pooled_o - pooled_e) ** 2 / pooled_e, df + 1
    assert df >= 1, "too few cells for a test"
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ---- unit level: rejection_sample over a 5-token Markov chain --------------------------------------------------------
V = 5
START = V  # the row of the first token's distribution


def markov(rows: list[list[float]]) -> torch.Tensor:
    """[V + 1, V] next-token distributions: row t follows token t, row START is the first token's."""
    t = torch.tensor(rows, dtype=torch.float32)
    assert t.shape == (V + 1, V)
    return t / t.sum(dim=1, keepdim=True)


def random_chain(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return markov((torch.rand(V + 1, V, generator=g) + 0.05).tolist())


P_DENSE = random_chain(1)
Q_DENSE = random_chain(2)
# disjoint supports in both directions: q is 0 where p > 0 (token 0) and p is 0 where q > 0 (token 4)
P_GAPS = markov([[4, 3, 2, 1, 0]] * (V + 1))
Q_GAPS = markov([[0, 1, 2, 3, 4]] * (V + 1))
Q_ONE_HOT = markov([[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1],
                    [0, 1, 0, 0, 0]])  # a deterministic proposer (ngram-like)
CASES = {"dense": (P_DENSE, Q_DENSE), "gaps": (P_GAPS, Q_GAPS), "p_equals_q": (P_DENSE, P_DENSE.clone()),
         "one_hot_q": (P_DENSE, Q_ONE_HOT)}


def draw(row: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(row, 1, generator=g))


def speculative_step(p: torch.Tensor, q: torch.Tensor, last: int, k: int, g: torch.Generator,
                     accept_all: bool = False) -> tuple[list[int], int]:
    """One verify step after token `last`: k proposals from q's chain, verified against p's. Returns (emitted
    tokens, number accepted). accept_all: a broken verifier that keeps every proposal (the negative control)."""
    drafts, prev = [], last
    for _ in range(k):
        prev = draw(q[prev], g)
        drafts.append(prev)
    ctx = [last] + drafts
    bonus = draw(p[ctx[-1]], g)
    if accept_all:
        return drafts + [bonus], k
    accepted, token = rejection_sample(p[ctx], q[ctx[:-1]], drafts, bonus, g)
    return drafts[:accepted] + [token], accepted


def first_two(p: torch.Tensor, q: torch.Tensor, k: int, trials: int, seed: int,
              accept_all: bool = False) -> tuple[Counter, Counter, int]:
    """Counts of the first emitted token and of the first two (steps repeat until two are out), and the number of
    accepted proposals over all steps."""
    g = torch.Generator().manual_seed(seed)
    first, pairs, accepted = Counter(), Counter(), 0
    for _ in range(trials):
        out, acc = speculative_step(p, q, START, k, g, accept_all)
        first[(out[0],)] += 1
        accepted += acc
        while len(out) < 2:
            more, acc = speculative_step(p, q, out[-1], k, g, accept_all)
            out += more
            accepted += acc
        pairs[tuple(out[:2])] += 1
    return first, pairs, accepted


def chain_probs(p: torch.Tensor) -> tuple[dict, dict]:
    """The target's first-token and first-two-tokens probabilities."""
    first = {(a,): float(p[START, a]) for a in range(V)}
    pairs = {(a, b): float(p[START, a] * p[a, b]) for a in range(V) for b in range(V)}
    return first, pairs


@pytest.mark.parametrize("case", list(CASES))
def test_rejection_sample_follows_the_target(case):
    p, q = CASES[case]
    trials = 4000
    first, pairs, accepted = first_two(p, q, k=2, trials=trials, seed=11)
    want_first, want_pairs = chain_probs(p)
    assert chi2_pvalue(first, want_first) > ALPHA
    assert chi2_pvalue(pairs, want_pairs) > ALPHA
    assert accepted > trials // 10, "the proposals were meant to be accepted often"
    if case == "p_equals_q":
        assert accepted >= 2 * trials, "a draft equal to the target is always accepted"


def test_chi2_rejects_a_verifier_that_keeps_every_proposal():
    """The negative control: the same test with a verifier that keeps the draft's tokens fails."""
    _, pairs, _ = first_two(P_DENSE, Q_DENSE, k=2, trials=4000, seed=11, accept_all=True)
    _, want_pairs = chain_probs(P_DENSE)
    assert chi2_pvalue(pairs, want_pairs) < ALPHA


def test_rejection_sample_rejects_what_the_target_forbids():
    """A proposal of target probability 0 is never accepted; the token drawn instead is in the target's support."""
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(200):
        accepted, token = rejection_sample(p, q, [0], 1, g)
        assert accepted == 0 and token in (1, 2)


# ---- engine level: the parity llama checkpoint, a noisy copy of it as the draft --------------------------------------
N_REQUESTS = 2000
MAX_TOKENS = 4  # the first token comes from the prefill; the next step verifies up to 2 proposals
DEPTH = 3  # output tokens compared: the prefill's, then the first and second speculated positions


@pytest.fixture(scope="module")
def target(checkpoint) -> str:
    return checkpoint("llama")


@pytest.fixture(scope="module")
def hf_target(target):
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


def noisy_copy(target: str, path: Path, scale: float) -> tuple[str, torch.nn.Module]:
    """Write the target checkpoint with seeded noise (scale × each weight tensor's std) to path, with the target's
    tokenizer: a draft model that agrees with the target only partly. Returns (path, the noisy model)."""
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    model.save_pretrained(path)
    for f in Path(target).iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, path)
    return str(path), model


@pytest.fixture(scope="module")
def noisy_draft(target, tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """10 % noise: acceptance about 40 %."""
    return noisy_copy(target, tmp_path_factory.mktemp("noisy_draft"), 0.1)


@torch.no_grad()
def joint_probs(model: torch.nn.Module, prompt: list[int], depth: int) -> dict[tuple[int, ...], float]:
    """Probabilities of the first `depth` output tokens under temperature 1 and top-k TOP_K (the softmax over the
    TOP_K largest logits), by enumerating the top-k tree with the model's forward."""
    out = {(): 1.0}
    for _ in range(depth):
        prefixes = list(out)
        ids = torch.tensor([prompt + list(x) for x in prefixes])
        logits = model(ids).logits[:, -1].float()
        top = logits.topk(TOP_K, dim=-1)
        probs = top.values.softmax(dim=-1)
        out = {x + (int(t),): out[x] * float(pr) for x, ts, prs in zip(prefixes, top.indices, probs)
               for t, pr in zip(ts, prs)}
    return out


def sample_outputs(target: str, spec: dict, prompt: list[int], seeded: bool = False) -> tuple[Counter, dict]:
    """The first DEPTH output tokens of N_REQUESTS unseeded requests (the engine's seed fixes the run), or of
    requests seeded 0 .. N_REQUESTS - 1 (their draws are coupled with the draft's), and the engine's stats."""
    # a huge disable_by_batch_size makes the policy's threshold N / (N + 10**6 / 8) ~0: proposals at every step,
    # whatever the acceptance (a low engine-wide estimate would otherwise stop them)
    llm = LLM(target, device="cpu", seed=5, max_num_seqs=256,
              speculative_config={**spec, "disable_by_batch_size": 10**6})
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=MAX_TOKENS, ignore_eos=True,
                             seed=i if seeded else None) for i in range(N_REQUESTS)]
    outs = llm.generate([prompt] * N_REQUESTS, params)
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0
    return Counter(tuple(o.outputs[0].token_ids[:DEPTH]) for o in outs), stats


def assert_partial_acceptance(stats: dict, min_drafts: int) -> None:
    """Drafts really happened in the run, and the first speculated position was accepted in at least a tenth of
    the requests but not always."""
    assert stats["spec_decode_num_drafts"] >= min_drafts, stats
    assert stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"], stats
    assert stats["spec_decode_num_accepted_tokens_per_pos"][0] >= N_REQUESTS // 10, stats


PROMPT = [17, 250, 3, 99, 42, 181, 7, 64, 230, 12, 140, 77, 5, 199, 31, 260]


@pytest.mark.parametrize("seeded", [False, True], ids=["rejection_sampling", "seeded_coupling"])
def test_draft_model_samples_follow_the_target(target, hf_target, noisy_draft, seeded):
    draft_path, draft_model = noisy_draft
    counts, stats = sample_outputs(target, {"model": draft_path, "num_speculative_tokens": 2}, PROMPT, seeded)
    assert_partial_acceptance(stats, N_REQUESTS // 2)
    assert chi2_pvalue(counts, joint_probs(hf_target, PROMPT, DEPTH)) > ALPHA
    # negative control: the same counts are far from what the draft alone would produce
    q = joint_probs(draft_model, PROMPT, DEPTH)
    assert chi2_pvalue(Counter({c: n for c, n in counts.items() if q.get(c, 0) > 0}), q) < ALPHA


def ngram_acceptance(prompt: list[int], joint: dict[tuple[int, ...], float]) -> float:
    """The chance that the first proposal of a 1-2-gram lookup after the first output token is the target's draw."""
    return sum(p for (t, u), p in joint.items() if NgramIndex(1, 2).propose(prompt + [t], 1) == [u])


def ngram_prompt(model: torch.nn.Module) -> list[int]:
    """A prompt that holds, for the target's likely first tokens t, t followed by the target's likeliest token
    after t, so that a 1-gram lookup proposes what the target often draws. The pairs change the likely first
    tokens, so they accumulate over rounds; the round whose prompt gives the best acceptance wins."""
    prompt, follower, best = PROMPT, {}, (0.0, PROMPT)
    for _ in range(12):
        joint = joint_probs(model, prompt, 2)
        best = max(best, (ngram_acceptance(prompt, joint), prompt))
        for t in {x[0] for x in joint}:
            follower[t] = max((x for x in joint if x[0] == t), key=joint.get)[1]
        prompt = PROMPT[:8] + [tok for t in sorted(follower) for tok in (t, follower[t])] + PROMPT[-2:]
    assert best[0] > 0.2, "no prompt found on which ngram proposals are often right"
    return best[1]


def test_ngram_samples_follow_the_target(target, hf_target):
    prompt = ngram_prompt(hf_target)
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    counts, stats = sample_outputs(target, spec, prompt)
    assert_partial_acceptance(stats, N_REQUESTS // 4)
    assert chi2_pvalue(counts, joint_probs(hf_target, prompt, DEPTH)) > ALPHA
