"""Incremental detokenization never hands out a broken UTF-8 character, and stop strings are found across tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conveyor.engine.detokenizer import check_stop, detokenize_incrementally, find_stop_string
from conveyor.engine.sequence import FinishReason, Sequence
from conveyor.llm import LLM
from conveyor.model.demo import demo_tokenizer
from conveyor.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import train_tokenizer  # noqa: E402

TEXTS = [
    "aé数🙂b",
    "🙂🙂🙂",
    "数字和符号 123 456 789 !?",
    "Une phrase en français, avec des accents: été, où, garçon.",
    "é",
    "x 🙂 y, ééé 数数 z. Hello , world . it 's",
    "ç\nñ\tü ß ∑ ≠ → 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
PROMPTS = ["Hi: ", "数🙂", "é", "🙂🙂", "aé数数", "x"]


@pytest.fixture(scope="module")
def demo_tok():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer()


def make_seq(prompt_ids: list[int], **params) -> Sequence:
    p = SamplingParams(**params)
    return Sequence("d", 0, list(prompt_ids), len(prompt_ids), p, 1000)


def stream(tok, prompt: str, output_ids: list[int], **params) -> tuple[Sequence, list[str]]:
    """Append output_ids one at a time, as the engine does, collecting each step's new text."""
    seq = make_seq(tok.encode(prompt, add_special_tokens=False), **params)
    deltas = []
    for t in output_ids:
        seq.token_ids.append(t)
        d = detokenize_incrementally(tok, seq)
        seq.output_text += d
        deltas.append(d)
    return seq, deltas


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_never_split_a_character(demo_tok, prompt, text):
    ids = list(text.encode("utf-8"))
    assert demo_tok.encode(text, add_special_tokens=False) == ids  # the demo tokenizer: one token per byte
    seq, deltas = stream(demo_tok, prompt, ids)
    for d in deltas:
        assert "\ufffd" not in d
    assert "".join(deltas) == text
    assert seq.output_text == text
    # a character's text comes out with the token that completes it, not later
    done = 0
    for i, d in enumerate(deltas):
        done += len(d)
        complete = bytes(ids[:i + 1]).decode("utf-8", errors="ignore")
        assert done == len(complete)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_bpe_tokens_never_split_a_character(bpe_tok, prompt, text):
    ids = bpe_tok.encode(text, add_special_tokens=False)
    assert bpe_tok.decode(ids) == text
    seq, deltas = stream(bpe_tok, prompt, ids)
    for d in deltas:
        assert "\ufffd" not in d
    assert "".join(deltas) == text


def test_bpe_tokenizer_splits_characters_across_tokens(bpe_tok):
    # the test above is only meaningful if some tokens hold part of a character
    ids = bpe_tok.encode("数字和符号 🙂 où", add_special_tokens=False)
    assert any("\ufffd" in bpe_tok.decode([t]) for t in ids)


def test_special_tokens_are_skipped_or_kept(demo_tok):
    eot = demo_tok.convert_tokens_to_ids("<|eot|>")
    ids = list("ab".encode()) + [eot] + list("é".encode())
    _, deltas = stream(demo_tok, "x", ids)
    assert "".join(deltas) == "abé"
    _, deltas = stream(demo_tok, "x", ids, skip_special_tokens=False)
    assert "".join(deltas) == "ab<|eot|>é"


def test_incomplete_character_is_held_back(demo_tok):
    # the first bytes of a character are held while more may come
    seq, deltas = stream(demo_tok, "x", [0x41, 0xE6, 0x95])
    assert deltas == ["A", "", ""] and seq.output_text == "A"
    # a lead byte followed by a non-continuation byte is invalid: it may only come out as U+FFFD, with the next text
    seq, deltas = stream(demo_tok, "x", [0xE6, 0x41])
    assert deltas[0] == "" and deltas[1] in ("\ufffdA", "A")


# ---- stop strings ---------------------------------------------------------------------------------------------------
def run_stop(tok, text: str, stop, prompt: str = "> ") -> tuple[Sequence, int | None]:
    """Feed text token by token; return the sequence and the index of the token at which a stop string hit."""
    seq = make_seq(tok.encode(prompt, add_special_tokens=False), stop=stop)
    for i, t in enumerate(tok.encode(text, add_special_tokens=False)):
        seq.token_ids.append(t)
        new = detokenize_incrementally(tok, seq)
        seq.output_text += new
        if find_stop_string(seq, len(new)):
            return seq, i
    return seq, None


def test_stop_string_across_byte_tokens(demo_tok):
    seq, at = run_stop(demo_tok, "hello world, bye", "o w")
    assert at == len("hello w") - 1  # found with the token that completes it
    assert seq.output_text == "hell"


def test_stop_string_longer_than_the_new_text(demo_tok):
    seq, at = run_stop(demo_tok, "abcdefghij", ["cdefg", "zz"])
    assert at == 6 and seq.output_text == "ab"


def test_earliest_stop_string_wins(demo_tok):
    seq, at = run_stop(demo_tok, "xxabcdyy", ["cd", "abc", "bcd"])
    assert at == 4 and seq.output_text == "xx"  # "abc" completes first
    seq, at = run_stop(demo_tok, "xxabcdyy", ["bcd", "cd"])
    assert at == 5 and seq.output_text == "xxa"  # both complete at 'd': the earlier start wins


def test_stop_string_with_multibyte_characters(demo_tok):
    seq, at = run_stop(demo_tok, "été 数字 🙂 fin", "字 🙂")
    assert seq.output_text == "été 数" and at is not None
    assert "\ufffd" not in seq.output_text


def test_stop_string_across_bpe_tokens(bpe_tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = bpe_tok.encode(text, add_special_tokens=False)
    pieces = [bpe_tok.decode([t]) for t in ids]
    assert len(pieces) < len(text)  # multi-character tokens
    # a stop string made of the end of one token and the start of the next
    k = next(i for i, p in enumerate(pieces) if len(p) >= 2 and i + 1 < len(pieces) and len(pieces[i + 1]) >= 2)
    start = len("".join(pieces[:k]))
    stop = text[start + len(pieces[k]) - 1:start + len(pieces[k]) + 1]
    seq, at = run_stop(bpe_tok, text, stop)
    assert at == k + 1
    assert seq.output_text == text[:text.find(stop)]


def test_stop_string_waits_for_min_tokens(demo_tok):
    seq = make_seq(demo_tok.encode("> "), stop="b", min_tokens=3)
    hit_at = None
    for i, t in enumerate(demo_tok.encode("abababab")):
        seq.token_ids.append(t)
        new = detokenize_incrementally(demo_tok, seq)
        seq.output_text += new
        if find_stop_string(seq, len(new)):
            hit_at = i
            break
    assert hit_at == 3  # the "b"s at outputs 2 (index 1) are ignored; the 4th output may stop it
    assert seq.output_text == "aba"


def test_stop_string_not_found_leaves_text(demo_tok):
    seq, at = run_stop(demo_tok, "abcabc", ["abd", "cc"])
    assert at is None and seq.output_text == "abcabc"
    seq = make_seq([1, 2], stop="a")
    seq.output_text = "a"
    assert not find_stop_string(seq, 0)  # no new text: nothing to search


def test_stop_string_already_in_the_prompt_is_ignored(demo_tok):
    seq, at = run_stop(demo_tok, "xyz", "> ", prompt="a > b > ")
    assert at is None and seq.output_text == "xyz"


# ---- check_stop -----------------------------------------------------------------------------------------------------
def test_check_stop():
    eos = [9]
    seq = make_seq([1, 2, 3], max_tokens=3, stop_token_ids=[7])
    seq.max_tokens = 3
    seq.token_ids.append(5)
    assert check_stop(seq, 5, eos, 100) is None
    seq.token_ids.append(9)
    assert check_stop(seq, 9, eos, 100) == FinishReason.STOP
    seq.token_ids[-1] = 7
    assert check_stop(seq, 7, eos, 100) == FinishReason.STOP
    seq.token_ids[-1] = 5
    seq.token_ids.append(5)
    assert check_stop(seq, 5, eos, 100) == FinishReason.LENGTH
    # max_model_len ends it too
    seq = make_seq([1, 2, 3], max_tokens=50)
    seq.token_ids.append(4)
    assert check_stop(seq, 4, eos, 4) == FinishReason.LENGTH
    # ignore_eos: eos goes on, a stop token still stops
    seq = make_seq([1], ignore_eos=True, stop_token_ids=[7])
    seq.token_ids.append(9)
    assert check_stop(seq, 9, eos, 100) is None
    seq.token_ids.append(7)
    assert check_stop(seq, 7, eos, 100) == FinishReason.STOP
    # min_tokens: no stop before min_tokens outputs
    seq = make_seq([1], min_tokens=2)
    seq.token_ids.append(9)
    assert check_stop(seq, 9, eos, 100) is None
    seq.token_ids.append(9)
    assert check_stop(seq, 9, eos, 100) is None
    seq.token_ids.append(9)
    assert check_stop(seq, 9, eos, 100) == FinishReason.STOP


# ---- through the engine ---------------------------------------------------------------------------------------------
def test_engine_stream_concatenates_to_the_final_text(checkpoint):
    """A tiny random llama with the trained BPE tokenizer emits many partial characters: the streamed pieces must
    add up to the final text, and a held-back partial character never comes out half."""
    llm = LLM(model=checkpoint("llama"), max_model_len=128, device="cpu")
    eng = llm.engine
    eng.add_request("a", "été 数字 🙂", SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True))
    eng.add_request("b", "The quick", SamplingParams(temperature=1.0, seed=2, max_tokens=30, n=2, ignore_eos=True))
    eng.add_request("c", "Une phrase", SamplingParams(temperature=1.0, seed=3, max_tokens=30, stop=["e", "a"]))
    streams: dict[tuple[str, int], list[str]] = {}
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            for c in out.outputs:
                streams.setdefault((out.request_id, c.index), []).append(c.new_text)
            if out.finished:
                final[out.request_id] = out
    assert set(final) == {"a", "b", "c"}
    for (rid, i), parts in streams.items():
        text = final[rid].outputs[i].text
        assert "".join(parts) == text
        # text is only ever appended to: each streamed prefix is a prefix of the final text
        acc = ""
        for p in parts:
            acc += p
            assert text.startswith(acc)
    c = final["c"].outputs[0]
    assert "e" not in c.text and "a" not in c.text
    assert llm.stats()["kv_blocks_in_use"] == 0
