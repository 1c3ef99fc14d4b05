"""Sampling behaviour end to end with the demo model, plus unit tests of the sampler's masking."""
from __future__ import annotations

import math

import pytest
import torch

from conveyor.engine.sampler import Sampler, _top_k_top_p
from conveyor.engine.sequence import Sequence
from conveyor.llm import LLM
from conveyor.sampling_params import SamplingParams as SP

EOS_IDS = (257, 261)  # the demo model's end-of-text and end-of-turn tokens
PROMPTS = ["Hello world", "abc", "xyz", "The quick brown fox", "A", "zz top", "Paged attention"]


@pytest.fixture(scope="module")
def llm():
    return LLM(model="demo", max_model_len=256, device="cpu")


def gen(llm: LLM, prompt, **kw):
    return llm.generate([prompt], SP(**kw))[0].outputs


def tokens(llm: LLM, prompt, **kw) -> list[int]:
    return gen(llm, prompt, **kw)[0].token_ids


def assert_clean(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not llm.engine.requests


@pytest.fixture(scope="module")
def greedy(llm):
    """Greedy outputs of PROMPTS (24 tokens), run once as a batch."""
    outs = llm.generate(PROMPTS, SP(temperature=0.0, max_tokens=24))
    return {p: o.outputs[0] for p, o in zip(PROMPTS, outs)}


def _transition(greedy) -> tuple[str, str, int]:
    """A prompt whose greedy text is printable ASCII (one char per token) and changes character at index j."""
    for p, c in greedy.items():
        t = c.text
        if len(t) == len(c.token_ids) and t.isascii() and t.isprintable():
            j = next((i for i, ch in enumerate(t) if ch != t[0]), None)
            if j is not None and j >= 2 and j + 2 < len(t):
                return p, t, j
    pytest.fail("no greedy demo output with a printable character change")


@pytest.fixture(scope="module")
def transition(greedy):
    return _transition(greedy)


@pytest.fixture(scope="module")
def repetitive(greedy):
    """The prompt whose greedy output repeats itself most."""
    p = min(greedy, key=lambda q: len(set(greedy[q].token_ids)))
    assert len(set(greedy[p].token_ids)) <= 3, "the demo's greedy output was expected to repeat itself"
    return p


@pytest.fixture()
def eos_happy(llm):
    """The demo engine with every byte token counted as end-of-text, so a sequence wants to end at once.
    (The demo model's own end tokens are rarely sampled.) Restored afterwards."""
    eng = llm.engine
    saved = (eng.eos_token_ids, eng.sampler.eos_token_ids)
    ids = list(range(256)) + list(EOS_IDS)
    eng.eos_token_ids = eng.sampler.eos_token_ids = ids
    yield llm
    eng.eos_token_ids, eng.sampler.eos_token_ids = saved


# ---- determinism and seeds ------------------------------------------------------------------------------------------
def test_greedy_is_deterministic_alone_and_batched(llm, greedy):
    for p in ("Hello world", "abc"):
        alone = tokens(llm, p, temperature=0.0, max_tokens=24)
        assert alone == greedy[p].token_ids
        assert tokens(llm, p, temperature=0.0, max_tokens=24) == alone
    assert_clean(llm)


def test_same_seed_same_tokens_alone_or_in_a_batch(llm):
    alone = gen(llm, "Hello world", temperature=1.0, seed=7, max_tokens=20, n=2)
    batch = llm.generate(
        ["abc", "Hello world", "xyz", "Paged attention"],
        [SP(temperature=0.8, max_tokens=10), SP(temperature=1.0, seed=7, max_tokens=20, n=2),
         SP(temperature=1.0, seed=3, max_tokens=30), SP(temperature=0.0, max_tokens=5)])
    assert [c.token_ids for c in batch[1].outputs] == [c.token_ids for c in alone]
    again = gen(llm, "Hello world", temperature=1.0, seed=7, max_tokens=20, n=2)
    assert [c.token_ids for c in again] == [c.token_ids for c in alone]
    # a shorter run with the same seed is a prefix of the longer one
    assert tokens(llm, "Hello world", temperature=1.0, seed=7, max_tokens=6) == alone[0].token_ids[:6]


def test_different_seeds_differ(llm):
    outs = llm.generate(["Hello world"] * 3, [SP(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True)
                                             for s in (1, 2, 3)])
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(seqs)) == 3


def test_n_gives_n_outputs(llm):
    outs = gen(llm, "Hello world", temperature=1.0, seed=11, max_tokens=8, n=4, ignore_eos=True)
    assert [c.index for c in outs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in outs)
    assert len({tuple(c.token_ids) for c in outs}) == 4  # independent samples
    greedy_n = gen(llm, "abc", temperature=0.0, max_tokens=8, n=3)
    assert len(greedy_n) == 3 and len({tuple(c.token_ids) for c in greedy_n}) == 1
    assert_clean(llm)


# ---- truncation settings that reduce to greedy -----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, top_p=0.5),
                                dict(temperature=1e-6)])
def test_truncation_to_the_top_token_equals_greedy(llm, greedy, kw):
    params = dict(temperature=1.0, seed=5, max_tokens=24)
    params.update(kw)
    for p in ("Hello world", "abc"):
        assert tokens(llm, p, **params) == greedy[p].token_ids, kw


def test_plain_sampling_differs_from_greedy(llm, greedy):
    # sanity check of the test above: without truncation, temperature 1 does not follow the greedy path
    assert tokens(llm, "Hello world", temperature=1.0, seed=5, max_tokens=24) != greedy["Hello world"].token_ids


# ---- lengths and stops ----------------------------------------------------------------------------------------------
def test_max_tokens_and_finish_reason_length(llm):
    for mt in (1, 5, 17):
        [c] = gen(llm, "abc", temperature=0.0, max_tokens=mt)
        assert len(c.token_ids) == mt and c.finish_reason == "length"
    assert_clean(llm)


def test_stop_token_ids(llm, greedy, transition):
    p, _, j = transition
    g = greedy[p]  # token j is the first unlike the first one
    stop_tok = g.token_ids[j]
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok])
    assert c.finish_reason == "stop"
    assert c.token_ids == g.token_ids[:j + 1]  # the stop token is the last token
    stop_text = llm.get_tokenizer().decode([stop_tok])
    assert c.text == g.text[:j] and stop_text not in c.text
    # the very first token can stop it too: empty text
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop_token_ids=[g.token_ids[0]])
    assert c.finish_reason == "stop" and c.token_ids == [g.token_ids[0]] and c.text == ""


def test_min_tokens_holds_back_stop_tokens(llm):
    every_byte = list(range(256))  # eos-happy: every byte token stops it
    [c] = gen(llm, "Hello world", temperature=0.0, max_tokens=10, stop_token_ids=every_byte)
    assert c.finish_reason == "stop" and len(c.token_ids) == 1
    [c] = gen(llm, "Hello world", temperature=0.0, max_tokens=10, stop_token_ids=every_byte, min_tokens=4)
    assert c.finish_reason == "stop" and len(c.token_ids) == 5
    assert all(t >= 256 and t not in EOS_IDS for t in c.token_ids[:4])  # only non-stopping specials were allowed
    assert c.token_ids[4] < 256
    # min_tokens == max_tokens: no stop at all
    [c] = gen(llm, "Hello world", temperature=0.0, max_tokens=6, stop_token_ids=every_byte, min_tokens=6)
    assert c.finish_reason == "length" and len(c.token_ids) == 6
    assert all(t >= 256 and t not in EOS_IDS for t in c.token_ids)


def test_min_tokens_holds_back_stop_strings(llm, greedy, transition):
    p = transition[0]
    g = greedy[p]  # one printable character per token
    stop = g.text[5]
    first = g.text.find(stop)
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop=[stop])
    assert c.finish_reason == "stop" and c.text == g.text[:first] and len(c.token_ids) == first + 1
    # with min_tokens=5 the stop string can only end it from the 6th token on
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop=[stop], min_tokens=5)
    assert c.finish_reason == "stop"
    assert c.token_ids == g.token_ids[:6]
    assert c.text == g.text[:5]


def test_min_tokens_holds_back_eos(eos_happy):
    [c] = gen(eos_happy, "Hello world", temperature=0.0, max_tokens=10)
    assert c.finish_reason == "stop" and len(c.token_ids) == 1 and c.text == ""
    [c] = gen(eos_happy, "Hello world", temperature=0.0, max_tokens=10, min_tokens=3)
    assert c.finish_reason == "stop" and len(c.token_ids) == 4
    assert all(t >= 256 and t not in EOS_IDS for t in c.token_ids[:3])
    assert c.token_ids[3] < 256
    [c] = gen(eos_happy, "Hello world", temperature=1.0, seed=1, max_tokens=10, min_tokens=5)
    assert c.finish_reason == "stop" and len(c.token_ids) >= 6
    assert all(t >= 256 and t not in EOS_IDS for t in c.token_ids[:5])
    assert_clean(eos_happy)


def test_eos_stops_and_ignore_eos_goes_on(eos_happy, greedy):
    g = greedy["Hello world"]
    [c] = gen(eos_happy, "Hello world", temperature=0.0, max_tokens=24)
    assert c.finish_reason == "stop" and c.token_ids == g.token_ids[:1] and c.text == ""
    [c] = gen(eos_happy, "Hello world", temperature=0.0, max_tokens=24, ignore_eos=True)
    assert c.finish_reason == "length" and c.token_ids == g.token_ids and c.text == g.text


def test_stop_string_spanning_tokens(llm, transition):
    p, text, j = transition
    for stop in (text[j - 1:j + 1], text[j - 2:j + 2], text[j:j + 2]):
        [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop=[stop])
        assert c.finish_reason == "stop", stop
        assert c.text == text[:text.find(stop)], stop
        assert stop not in c.text
    # of several stop strings the earliest match wins
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop=[text[j:j + 2], text[j - 1:j + 1]])
    assert c.text == text[:j - 1]
    # a stop string that never appears changes nothing
    [c] = gen(llm, p, temperature=0.0, max_tokens=24, stop=["\x01never\x02"])
    assert c.finish_reason == "length" and c.text == text


def test_stop_string_never_streamed(llm, transition):
    p, text, j = transition
    stop = text[j - 2:j + 1]
    eng = llm.engine
    eng.add_request("stream-stop", p, SP(temperature=0.0, max_tokens=24, stop=stop))
    streamed, final = "", None
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed += out.outputs[0].new_text
            assert stop not in streamed
            if out.finished:
                final = out
    assert final is not None and final.outputs[0].finish_reason == "stop"
    assert streamed == final.outputs[0].text == text[:text.find(stop)]
    assert_clean(llm)


# ---- logprobs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_lp", [0, 1, 5, 20])
def test_logprobs(llm, n_lp):
    [c] = gen(llm, "Hello world", temperature=1.0, seed=3, max_tokens=6, logprobs=n_lp, ignore_eos=True)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 6
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp
        assert max(n_lp, 1) <= len(lp) <= n_lp + 1
        assert all(v <= 0.0 and math.isfinite(v) for v in lp.values())
        assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-4
        if len(lp) == n_lp + 1 and n_lp:  # the sampled token is outside the top N: it ranks below all of them
            assert lp[tok] <= min(v for t, v in lp.items() if t != tok)


def test_greedy_logprobs_top_is_the_chosen_token(llm):
    [c] = gen(llm, "abc", temperature=0.0, max_tokens=6, logprobs=3)
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert len(lp) == 3
        assert lp[tok] == max(lp.values())


def test_no_logprobs_by_default(llm):
    [c] = gen(llm, "abc", temperature=0.0, max_tokens=3)
    assert c.logprobs is None


# ---- penalties ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(presence_penalty=1.0), dict(frequency_penalty=0.5),
                                dict(repetition_penalty=2.0), dict(presence_penalty=2.0, frequency_penalty=2.0)])
def test_penalties_change_a_repetitive_greedy_output(llm, greedy, repetitive, kw):
    base = greedy[repetitive].token_ids
    out = tokens(llm, repetitive, temperature=0.0, max_tokens=24, **kw)
    assert out != base
    if "repetition_penalty" not in kw:
        assert out[0] == base[0]  # presence/frequency penalties see only output tokens: none yet
    if kw.get("frequency_penalty", 0) >= 2.0:
        assert len(set(out)) > len(set(base))


def test_negative_presence_penalty_keeps_repeating(llm, greedy, repetitive):
    base = greedy[repetitive].token_ids
    out = tokens(llm, repetitive, temperature=0.0, max_tokens=24, presence_penalty=-2.0)
    assert len(set(out)) <= len(set(base))


# ---- sampler unit tests on hand-made logits -------------------------------------------------------------------------
def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def _kept(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != float("-inf")}


def test_top_k_top_p_masking():
    probs = [0.05, 0.5, 0.15, 0.3]  # ranks: 1, 3, 2, 0
    rows = [
        (0, 1.0, {0, 1, 2, 3}),  # disabled
        (1, 1.0, {1}),
        (2, 1.0, {1, 3}),
        (3, 1.0, {1, 2, 3}),
        (4, 1.0, {0, 1, 2, 3}),
        (10, 1.0, {0, 1, 2, 3}),  # k beyond the vocabulary
        (10 ** 20, 1.0, {0, 1, 2, 3}),  # far beyond: not even an int64
        (0, 0.4, {1}),  # the top token always stays, even when it alone exceeds top_p
        (0, 1e-9, {1}),
        (0, 0.7, {1, 3}),  # 0.5 < 0.7 keeps the 2nd; 0.8 >= 0.7 drops the 3rd
        (0, 0.85, {1, 2, 3}),
        (0, 0.99, {0, 1, 2, 3}),
        (2, 0.4, {1}),
        (3, 0.82, {1, 3}),  # top-p over the top-k renormalized: 0.5/0.95 + 0.3/0.95 = 0.84 >= 0.82
        (3, 0.9, {1, 2, 3}),
    ]
    logits = _logits([probs] * len(rows))
    out = _top_k_top_p(logits.clone(), [k for k, _, _ in rows], [p for _, p, _ in rows])
    assert out.shape == logits.shape
    for i, (k, p, want) in enumerate(rows):
        assert _kept(out[i]) == want, (k, p)
        for j in want:  # kept logits are untouched
            assert out[i, j].item() == logits[i, j].item()


def test_top_k_top_p_rows_are_independent_and_order_free():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    ks, ps = [0, 3, 7, 0, 1], [1.0, 1.0, 0.5, 0.3, 0.9]
    batched = _top_k_top_p(logits.clone(), ks, ps)
    for i in range(5):
        single = _top_k_top_p(logits[i:i + 1].clone(), [ks[i]], [ps[i]])
        assert torch.equal(batched[i], single[0])
        perm = torch.randperm(50)
        shuffled = _top_k_top_p(logits[i:i + 1, perm].clone(), [ks[i]], [ps[i]])
        assert torch.equal(shuffled[0], batched[i, perm])
    assert len(_kept(batched[1])) == 3 and len(_kept(batched[4])) == 1
    top3 = set(logits[1].topk(3).indices.tolist())
    assert _kept(batched[1]) == top3


def _seq(params: SP, token_ids=(1, 2, 3), num_prompt=3, generator=None) -> Sequence:
    return Sequence("u", 0, list(token_ids), num_prompt, params, params.max_tokens or 16, generator=generator,
                    seed=params.seed if generator is not None else None)


def test_sampler_greedy_min_tokens_and_logprobs():
    sampler = Sampler(vocab_size=6, eos_token_ids=[5], seed=0, device="cpu")
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, 0.1, 9.0]])
    toks, lps = sampler(logits, [_seq(SP(temperature=0.0))])
    assert toks == [5] and lps == [{5: pytest.approx(logits.log_softmax(-1)[0, 5].item())}]  # cumulative_logprob
    # min_tokens bans eos and the stop tokens until enough tokens are out
    toks, _ = sampler(logits, [_seq(SP(temperature=0.0, min_tokens=2, stop_token_ids=[2]))])
    assert toks == [1]
    toks, _ = sampler(logits, [_seq(SP(temperature=0.0, min_tokens=2), token_ids=(1, 2, 3, 0, 0))])
    assert toks == [5]  # 2 outputs already: eos allowed again
    toks, lps = sampler(logits, [_seq(SP(temperature=0.0, min_tokens=1, logprobs=2))])
    assert toks == [2]
    raw = logits.log_softmax(-1)[0]
    # logprobs are the model's raw distribution, not the constrained one
    assert lps[0] == pytest.approx({2: raw[2].item(), 5: raw[5].item()})


def test_sampler_penalties_on_hand_made_logits():
    sampler = Sampler(vocab_size=4, eos_token_ids=[], seed=0, device="cpu")
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    # output so far: token 0 twice
    seq = lambda **kw: _seq(SP(temperature=0.0, **kw), token_ids=(2, 0, 0), num_prompt=1)  # noqa: E731
    assert sampler(logits, [seq()])[0] == [0]
    assert sampler(logits, [seq(presence_penalty=0.6)])[0] == [1]  # 3 - 0.6 < 2.5
    assert sampler(logits, [seq(presence_penalty=0.4)])[0] == [0]
    assert sampler(logits, [seq(frequency_penalty=0.3)])[0] == [1]  # 3 - 2*0.3 < 2.5
    assert sampler(logits, [seq(frequency_penalty=0.2)])[0] == [0]
    assert sampler(logits, [seq(repetition_penalty=1.3)])[0] == [1]  # 3 / 1.3 < 2.5
    # repetition penalty multiplies negative logits of seen tokens (token 2 is in the prompt)
    neg = torch.tensor([[-1.0, -1.5, -0.8, -2.0]])
    assert sampler(neg, [_seq(SP(temperature=0.0, repetition_penalty=2.0), token_ids=(2,), num_prompt=1)])[0] == [0]


def test_sampler_seeded_rows_do_not_depend_on_the_batch():
    sampler = Sampler(vocab_size=100, eos_token_ids=[], seed=0, device="cpu")
    torch.manual_seed(1)
    logits = torch.randn(3, 100) * 0.1

    def seeded():
        return _seq(SP(temperature=1.0, seed=42), generator=torch.Generator().manual_seed(42))

    alone = [sampler(logits[1:2], [seeded()])[0][0] for _ in range(1)]
    seqs = [_seq(SP(temperature=0.7)), seeded(), _seq(SP(temperature=1.0, top_k=5))]
    batched = sampler(logits, seqs)[0]
    assert batched[1] == alone[0]
    # a seeded sequence's draw depends on its seed and the token's position: the same seed gives the same tokens
    a, b = seeded(), seeded()
    run_a, run_b = [], []
    for _ in range(10):
        run_a.append(sampler(logits[1:2], [a])[0][0])
        a.token_ids.append(run_a[-1])
        run_b.append(sampler(logits, [_seq(SP(temperature=1.0)), b, _seq(SP(temperature=1.0))])[0][1])
        b.token_ids.append(run_b[-1])
    assert run_a == run_b
    assert len(set(run_a)) > 1
    assert sampler(logits[1:2], [a])[0] == sampler(logits[1:2], [a])[0]  # the same position: the same draw
