"""The engine's sampling surface (issue 13): prompt_logprobs, cumulative_logprob, best_of,
include_stop_str_in_output, num_emitted_tokens (a stream's text and logprobs stay together), LLM.chat and dict
prompts, and the bad input of each."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor.llm import LLM
from conveyor.sampling_params import SamplingParams as SP

EOS_IDS = (257, 261)  # the demo model's end-of-text and end-of-turn tokens


@pytest.fixture(scope="module")
def llm():
    return LLM(model="demo", max_model_len=2048, device="cpu")


def assert_clean(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not llm.engine.requests


def check_prompt_logprobs(got: list, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """got: RequestOutput.prompt_logprobs; ref: reference log-softmax [len(ids), vocab] of each position."""
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        lp, row = got[i], ref[i - 1]
        assert lp[ids[i]] == pytest.approx(row[ids[i]].item(), abs=1e-4)
        top = row.topk(k)
        assert set(lp) == {ids[i], *top.indices.tolist()}
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert lp[t] == pytest.approx(v, abs=1e-4)


# ---- prompt_logprobs ---------------------------------------------------------------------------------------------

def test_prompt_logprobs_match_a_full_forward_across_chunks_and_cached_prefixes(checkpoint):
    """Each prompt token's logprob given the tokens before it, as transformers' one forward over the whole prompt
    gives it, though the engine computes the prompt in chunks of at most 8 tokens over several steps; a second
    request for the same prompt does not read the prefix cache the first one filled."""
    path = checkpoint("llama")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = "Paged attention stores keys and values in fixed-size blocks; continuous batching shares every step."
    ids = tok(text).input_ids
    assert len(ids) > 20
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=8, device="cpu")
    params = SP(temperature=0.0, max_tokens=3, prompt_logprobs=3)
    first, other = llm.generate([text, "Another prompt beside it"], params)
    check_prompt_logprobs(first.prompt_logprobs, ids, ref, 3)
    assert other.prompt_logprobs is not None and len(other.prompt_logprobs) == len(other.prompt_token_ids)
    hits = llm.stats()["prefix_cache_hits"]
    [again] = llm.generate([text], params)
    assert llm.stats()["prefix_cache_hits"] == hits  # computed again, not read from the cache
    check_prompt_logprobs(again.prompt_logprobs, ids, ref, 3)
    [plain] = llm.generate([text], SP(temperature=0.0, max_tokens=3))
    assert plain.prompt_logprobs is None and llm.stats()["prefix_cache_hits"] > hits  # others still read it
    assert plain.outputs[0].token_ids == again.outputs[0].token_ids
    assert_clean(llm)


def test_prompt_logprobs_survive_preemption_and_n_samples():
    """With a cache too small for the batch, sequences are preempted and recomputed mid-prompt or after it: the
    prompt logprobs are still each position's once, equal to those of a roomy run."""
    prompts = [bytes(range(65 + i, 65 + i + 40)).decode() for i in range(6)]
    params = SP(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, prompt_logprobs=2, n=2)
    roomy = LLM(model="demo", device="cpu").generate(prompts, params)
    tight = LLM(model="demo", device="cpu", block_size=4, num_kv_blocks=40, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params)
    assert tight.stats()["num_preemptions"] > 0
    for a, b in zip(roomy, outs):
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids) == 40
        assert b.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(y[t] == pytest.approx(v, abs=1e-4) for t, v in x.items())
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert_clean(tight)


def test_prompt_logprobs_zero_and_one_token_prompts(llm):
    one, zero = llm.generate([[72], "Hello"], SP(max_tokens=2, prompt_logprobs=0))
    assert one.prompt_logprobs == [None]
    assert [list(d) for d in zero.prompt_logprobs[1:]] == [[t] for t in zero.prompt_token_ids[1:]]


# ---- cumulative_logprob ------------------------------------------------------------------------------------------

def test_cumulative_logprob_is_the_sum_of_the_sampled_tokens_logprobs(llm):
    with_lp, without = llm.generate(["Hello world"] * 2, [SP(temperature=0.9, seed=11, max_tokens=10, logprobs=1),
                                                          SP(temperature=0.9, seed=11, max_tokens=10)])
    a, b = with_lp.outputs[0], without.outputs[0]
    assert a.token_ids == b.token_ids and b.logprobs is None
    assert a.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(a.token_ids, a.logprobs)), abs=1e-5)
    assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-5) and a.cumulative_logprob < 0
    # the same sum read as prompt logprobs of the prompt followed by the output (an independent path)
    full = with_lp.prompt_token_ids + a.token_ids
    [rerun] = llm.generate([full], SP(max_tokens=1, prompt_logprobs=0))
    tail = rerun.prompt_logprobs[len(with_lp.prompt_token_ids):]
    assert sum(d[t] for d, t in zip(tail, a.token_ids)) == pytest.approx(a.cumulative_logprob, abs=1e-3)
    # beam search with one beam is greedy: the same score
    greedy = llm.generate("Hello world", SP(temperature=0.0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    beam = llm.generate("Hello world", SP(use_beam_search=True, beam_width=1, max_tokens=6, ignore_eos=True,
                                          prompt_logprobs=0))
    assert beam[0].outputs[0].token_ids == greedy.token_ids
    assert len(beam[0].prompt_logprobs) == len(beam[0].prompt_token_ids)
    assert all(d[t] == pytest.approx(r[t], abs=1e-4) for d, r, t in zip(beam[0].prompt_logprobs[1:],
                                                                         rerun.prompt_logprobs[1:], full[1:]))
    assert beam[0].outputs[0].cumulative_logprob == pytest.approx(greedy.cumulative_logprob, abs=1e-4)


# ---- best_of -----------------------------------------------------------------------------------------------------

def test_best_of_returns_the_n_most_likely_of_its_samples(llm):
    """best_of=5, n=2 draws the same five samples as n=5 with the same seed and returns the two with the highest
    cumulative logprob, best first; only the final output comes back."""
    all5 = llm.generate("Once upon", SP(n=5, temperature=1.0, seed=3, max_tokens=8))[0].outputs
    ranked = sorted(all5, key=lambda c: -c.cumulative_logprob)
    eng = llm.engine
    eng.add_request("best", "Once upon", SP(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs) == 1 and outs[0].finished
    best = outs[0].outputs
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert_clean(llm)


def test_best_of_bad_input(llm):
    with pytest.raises(ValueError, match="best_of"):
        SP(n=3, best_of=2)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SP(prompt_logprobs=21)
    small = SP(n=1, best_of=100, max_tokens=4)
    tight = LLM(model="demo", device="cpu", max_num_seqs=16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        tight.generate("Hi", small)
    assert tight.generate("Hi", SP(max_tokens=3))[0].outputs[0].finish_reason == "length"
    assert_clean(tight)


# ---- include_stop_str_in_output ----------------------------------------------------------------------------------

def test_include_stop_str_in_output(llm):
    base = llm.generate("Hello", SP(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = base.text[4:6]
    head = base.text[:base.text.index(stop)]

    def run(**kw):
        return llm.generate("Hello", SP(temperature=0.0, max_tokens=30, ignore_eos=True, **kw))[0].outputs[0]

    assert run(stop=stop).text == head
    kept = run(stop=stop, include_stop_str_in_output=True)
    assert kept.text == head + stop and kept.finish_reason == "stop"
    # a stop token's text too (vLLM's rule); the demo's byte tokens are characters
    stop_tok = base.token_ids[3]
    cut = base.token_ids.index(stop_tok)
    assert run(stop_token_ids=[stop_tok]).text == base.text[:cut]
    assert run(stop_token_ids=[stop_tok], include_stop_str_in_output=True).text == base.text[:cut + 1]
    assert_clean(llm)


# ---- streaming: num_emitted_tokens -------------------------------------------------------------------------------

def _feed(llm: LLM, rid: str, params: SP, tokens: list[int]) -> list:
    """Append chosen tokens to a request one at a time through the engine's own path (stop checks, incremental
    detokenization, hold-back); returns the output after each."""
    eng = llm.engine
    eng.add_request(rid, "Hi", params)
    req = eng.requests[rid]
    outs = []
    for t in tokens:
        outs.append(eng._advance(req, [(req.seqs[0], [t], [{t: -1.0}])], time.monotonic()))
        if outs[-1].finished:
            break
    return outs


def test_num_emitted_tokens_follows_the_text_handed_out(llm):
    """Text held back (a stop string may be forming, an incomplete UTF-8 character) holds back its tokens'
    logprobs too: after each output the first num_emitted_tokens tokens decode to a prefix of the text handed out
    so far."""
    text = "ab€cXYdXYZ"  # "€" is three byte tokens; "XYZ" is the stop string, "XY" twice a false start
    tokens = list(text.encode())
    outs = _feed(llm, "stream", SP(stop="XYZ", max_tokens=20, logprobs=0), tokens)
    tok = llm.get_tokenizer()
    sent, seen = "", []
    for out in outs:
        c = out.outputs[0]
        sent += c.new_text
        seen.append((c.new_text, c.num_emitted_tokens))
        k = c.num_emitted_tokens
        assert c.finished or sent.startswith(tok.decode(c.token_ids[:k]))
    assert sent == "ab€cXYd" and outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].num_emitted_tokens == len(tokens)  # the stop string's tokens come with the last
    # the three bytes of "€" come out together, with their text
    # two characters held back while "XYZ" may be forming; the three bytes of "€" come out with their text
    assert seen == [("", 0), ("", 0), ("", 0), ("", 0), ("a", 1), ("b", 2), ("€", 5), ("c", 6), ("X", 7), ("Y", 8),
                    ("d", 9), ("", 12)]
    assert_clean(llm)


def test_num_emitted_tokens_without_stop_strings(llm):
    outs = _feed(llm, "plain", SP(max_tokens=4), list("ab".encode()) + [0xC3, 0xA9])  # "é" is two bytes
    assert [(o.outputs[0].new_text, o.outputs[0].num_emitted_tokens) for o in outs] == \
        [("a", 1), ("b", 2), ("", 2), ("é", 4)]
    assert_clean(llm)


# ---- LLM.chat and dict prompts -----------------------------------------------------------------------------------

def test_chat_renders_with_the_template_and_matches_generate(llm):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    params = SP(temperature=0.0, max_tokens=6)
    [out] = llm.chat(conv, params)
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert out.prompt == text and out.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert out.outputs[0].token_ids == llm.generate({"prompt_token_ids": out.prompt_token_ids},
                                                    params)[0].outputs[0].token_ids
    two = llm.chat([conv, [{"role": "user", "content": "Yo"}]], params, add_generation_prompt=False)
    assert len(two) == 2 and not two[0].prompt.endswith("<|start_header|>assistant<|end_header|>\n\n")
    custom = llm.chat([{"role": "user", "content": "Q"}], params, chat_template="{{ messages[0]['content'] }}!")
    assert custom[0].prompt == "Q!"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    [with_tools] = llm.chat([{"role": "user", "content": "Weather?"}], params, tools=tools)
    assert "get_weather" in with_tools.prompt  # the demo template ignores tools: shown in a system block
    [cont] = llm.chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The ans"}], params,
                      add_generation_prompt=False, continue_final_message=True)
    assert cont.prompt.endswith("<|start_header|>assistant<|end_header|>\n\nThe ans")
    [kw] = llm.chat([{"role": "user", "content": "Q"}], params,
                    chat_template="{{ greeting }} {{ messages[0]['content'] }}", chat_template_kwargs={"greeting": "Hey"})
    assert kw.prompt == "Hey Q"
    for bad in [dict(continue_final_message=True), dict(chat_template_kwargs={"tokenize": True}),
                dict(chat_template_kwargs={"x": object()})]:
        with pytest.raises(ValueError):
            llm.chat([{"role": "user", "content": "Q"}], params, **bad)
    assert_clean(llm)


@pytest.mark.parametrize("messages", [
    [], "hello", [{"content": "no role"}], [{"role": "user", "content": 3}], [{"role": "user"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "tool", "content": "42"}], [[{"role": "user", "content": "ok"}], "not a conversation"],
    [{"role": "user", "content": "\ud800"}],
])
def test_chat_bad_messages(llm, messages):
    with pytest.raises(ValueError):
        llm.chat(messages, SP(max_tokens=2))
    assert llm.chat([{"role": "user", "content": "Hi"}], SP(max_tokens=2))[0].finished
    assert_clean(llm)


def test_dict_prompts(llm):
    params = SP(temperature=0.0, max_tokens=5)
    a, b, c = llm.generate([{"prompt": "Hello"}, "Hello", {"prompt_token_ids": list(b"Hello")}], params)
    assert a.prompt == b.prompt == "Hello" and a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    for bad in [{"prompt": "a", "prompt_token_ids": [1]}, {}, {"prompt": 3}, {"text": "a"}, {"prompt": ""},
                {"prompt_token_ids": "abc"}]:
        with pytest.raises(ValueError):
            llm.generate([{"prompt": "fine"}, bad], params)
    assert_clean(llm)


def test_real_model_chat_with_prompt_logprobs():
    """SmolLM2 through LLM.chat: the prompt is its chat template's rendering (no second BOS), the answer is right,
    and the prompt logprobs put the template's own continuations ("ass" "istant" after <|im_start|>) near 0."""
    from conveyor.model.builtin import DEFAULT_MODEL

    llm = LLM(DEFAULT_MODEL)
    conv = [{"role": "user", "content": "What is the capital of Germany?"}]
    [out] = llm.chat(conv, SP(temperature=0.0, max_tokens=8, prompt_logprobs=1))
    ids = llm.get_tokenizer().apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == ids
    assert "Berlin" in out.outputs[0].text and out.outputs[0].cumulative_logprob < 0
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    assert all(d[t] <= 0 and max(d.values()) >= d[t] and len(d) <= 2 for t, d in zip(ids[1:], lps[1:]))
    assert all(d[t] > -0.05 for t, d in zip(ids[-3:], lps[-3:]))  # "ass", "istant", "\n"
    assert_clean(llm)


def test_logprob_ranks_count_strictly_greater_entries():
    import torch

    from conveyor.engine.logprobs import token_logprobs
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    rows = token_logprobs(logits, [2, 3], [1, 0])
    assert [r.rank for r in rows] == [3, 2]  # ties share the best rank: row 1 has only token 0 above its tie
    assert list(rows[0]) == [2, 1] and list(rows[1]) == [3]  # the chosen token first, then the top 1
