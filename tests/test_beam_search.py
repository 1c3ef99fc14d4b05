"""Beam search is an engine mode that matches transformers' generate(num_beams=..., do_sample=False)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor import LLM, SamplingParams

CASES = [(4, 2, 1.0, False), (3, 3, 0.5, True), (2, 1, 1.0, "never"), (4, 4, 2.0, "never")]
PROMPTS = ["The quick", "Paged attention stores keys and values", "数字"]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_beam_search_matches_transformers(checkpoint, kind):
    path = checkpoint(kind)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=200)
    for width, n, length_penalty, early_stopping in CASES:
        sp = SamplingParams(use_beam_search=True, beam_width=width, n=n, max_tokens=10,
                            length_penalty=length_penalty, early_stopping=early_stopping)
        outs = llm.generate(PROMPTS, sp)  # the prompts' beams run in one batch
        for prompt, out in zip(PROMPTS, outs):
            ids = tok(prompt, return_tensors="pt").input_ids
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=n,
                            do_sample=False, max_new_tokens=10, length_penalty=length_penalty,
                            early_stopping=early_stopping, pad_token_id=0)
            assert len(out.outputs) == n
            for c, ref in zip(out.outputs, g[:, ids.shape[1]:].tolist()):
                assert c.token_ids == ref[:len(c.token_ids)], (width, n, length_penalty, early_stopping)
                # transformers fills after an eos with `pad_token_id or eos`: the eos here, as pad_token_id is 0
                assert all(t == 2 for t in ref[len(c.token_ids):])
                assert c.finish_reason == ("stop" if c.token_ids[-1] == 2 else "length")
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_beams_share_blocks_and_free_them():
    llm = LLM(block_size=8, num_kv_blocks=256)
    prompt = {"prompt_token_ids": list(range(40, 140))}  # 12.5 blocks
    out = llm.generate(prompt, SamplingParams(use_beam_search=True, beam_width=6, n=2, max_tokens=12))[0]
    st = llm.stats()
    assert len(out.outputs) == 2
    assert st["kv_blocks_peak"] < 6 * 13  # six beams did not each hold a copy of the prompt
    assert st["num_cow_copies"] > 0 and st["kv_blocks_in_use"] == 0


def test_beam_search_abort_frees_blocks():
    llm = LLM(num_kv_blocks=128)
    eng = llm.engine
    eng.add_request("b", "hello there", SamplingParams(use_beam_search=True, beam_width=4, max_tokens=50))
    for _ in range(5):
        eng.step()
    out = eng.abort_request("b")
    assert out.finished and llm.stats()["kv_blocks_in_use"] == 0 and not eng.has_unfinished_requests()


def test_bad_beam_parameters():
    with pytest.raises(ValueError):
        SamplingParams(use_beam_search=True, beam_width=2, n=3)
    with pytest.raises(ValueError):
        SamplingParams(use_beam_search=True, early_stopping="sometimes")
    with pytest.raises(ValueError):
        LLM(max_num_seqs=2).generate("x", SamplingParams(use_beam_search=True, beam_width=4))


def test_beam_searches_that_preempt_each_other_finish_with_the_same_beams():
    """Three searches on a cache that holds only one: beams are preempted as a group (the search restarts), so no
    beam holds blocks waiting for a sibling that cannot get any, and the result is the one computed alone."""
    sp = SamplingParams(use_beam_search=True, beam_width=4, n=2, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(40 + i, 60 + i))} for i in range(3)]
    roomy = LLM(dtype="float32", block_size=4, num_kv_blocks=400)
    want = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, sp)]
    assert roomy.stats()["num_preemptions"] == 0
    tight = LLM(dtype="float32", block_size=4, num_kv_blocks=34)  # 5 prompt blocks + 4 beams x 7 blocks, + 1
    eng = tight.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp)
    got = {}
    for _ in range(2000):
        for o in eng.step():
            if o.finished:
                got[int(o.request_id)] = [c.token_ids for c in o.outputs]
        if not eng.has_unfinished_requests():
            break
    assert [got.get(i) for i in range(3)] == want
    st = tight.stats()
    assert st["num_preemptions"] > 0 and st["kv_blocks_in_use"] == 0


def test_beam_search_that_can_never_fit_is_rejected():
    llm = LLM(block_size=4, num_kv_blocks=30)
    with pytest.raises(ValueError, match="beam search"):
        llm.engine.add_request("b", {"prompt_token_ids": list(range(40, 60))},
                               SamplingParams(use_beam_search=True, beam_width=4, max_tokens=24))
    assert not llm.engine.has_unfinished_requests()
