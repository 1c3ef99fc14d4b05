"""Reference parity with transformers on tiny random checkpoints written by save_pretrained."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor import LLM, SamplingParams
from conveyor.engine.scheduler import ScheduledSeq
from conveyor.engine.sequence import Sequence

KINDS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]

PROMPTS = [
    "The quick",
    "Paged attention stores keys and values in fixed-size blocks. Continuous batching lets finished sequences "
    "leave and new ones join at every step. The quick brown fox jumps over the lazy dog.",
    "数字",
    "def f(x):\n    return x * 2\n" * 5,
    "Une phrase",
]
MAX_TOKENS = 20


def hf_greedy(path: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        # eos_token_id=None: run the full length without masking eos, as ignore_eos does
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
        outs.append(g[0, ids.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_under_queueing_and_preemption(checkpoint, kind):
    path = checkpoint(kind)
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    # 40 blocks of 4 slots cannot hold all five sequences: some queue, some get preempted and recomputed
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=32)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["num_preemptions"] >= 1
    assert stats["kv_blocks_in_use"] == 0
    # the same batch with a roomy cache and no chunking gives the same tokens
    roomy = LLM(path, dtype="float32", block_size=16, max_num_batched_tokens=2048)
    outs2 = roomy.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs2] == expected
    assert roomy.stats()["num_preemptions"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_last_position_logits_match(checkpoint, kind):
    """Logits from a prefill split in two chunks (the second reads the first through the block table) match
    transformers' forward within float32 tolerance."""
    path = checkpoint(kind)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    for text in PROMPTS[1:4]:
        ids = tok(text).input_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        seq = Sequence("r", 0, list(ids), len(ids), SamplingParams(), 1)
        first = len(ids) // 2
        assert engine.kv.allocate_slots(seq, first)
        engine.runner.execute([ScheduledSeq(seq, first)])
        seq.num_computed_tokens = first
        rest = len(ids) - first
        assert engine.kv.allocate_slots(seq, rest)
        logits = engine.runner.execute([ScheduledSeq(seq, rest)])[0]
        engine.kv.free(seq)
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_sharded_checkpoint_loads(tmp_path):
    from checkpoints import write_checkpoint

    path = write_checkpoint("llama", tmp_path / "sharded", max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").exists()
    expected = hf_greedy(str(path), PROMPTS[:2], 8)
    llm = LLM(str(path), dtype="float32")
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_run(checkpoint, dtype):
    llm = LLM(checkpoint("qwen3"), dtype=dtype)
    assert llm.engine.runner.kv_caches[0].dtype == getattr(torch, dtype)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_dummy_load_format_gives_random_weights_for_any_config(checkpoint):
    llm = LLM(checkpoint("mistral"), load_format="dummy", seed=7)
    again = LLM(checkpoint("mistral"), load_format="dummy", seed=7)
    w1 = llm.engine.runner.model.lm_head.weight
    w2 = again.engine.runner.model.lm_head.weight
    assert torch.equal(w1, w2) and w1.std() > 0


def test_eos_and_chat_template_come_from_the_checkpoint(checkpoint):
    llm = LLM(checkpoint("llama"))
    assert 2 in llm.engine.eos_token_ids
    text = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                   add_generation_prompt=True)
    assert text == "user: hi\nassistant:"


@pytest.mark.parametrize("chunk", [1, 3, 8, 17, 64])
def test_outputs_identical_for_every_chunk_size(checkpoint, chunk):
    """Prefill split into chunks of any size (long_prefill_token_threshold), with prefix caching, gives the
    reference tokens."""
    path = checkpoint("llama")
    expected = hf_greedy(path, PROMPTS, 8)
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=128, long_prefill_token_threshold=chunk)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # cached prefixes
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats()["prefix_cache_hits"] > 0 and llm.stats()["kv_blocks_in_use"] == 0
