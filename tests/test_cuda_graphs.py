"""Decode graphs (conveyor/model/cuda_graphs.py): the batch-size buckets, and decode batches run through the static
buffers with padding rows ("padded": what a replayed CUDA graph computes, run eagerly, so it is tested on CPU; the
capture itself is checked on a GPU by bench/gpu_check.py) give the same tokens as the eager path."""
from __future__ import annotations

import pytest

from conveyor import LLM, SamplingParams
from conveyor.cli import build_parser, engine_kwargs
from conveyor.config import CacheConfig, ModelConfig, SchedulerConfig
from conveyor.engine import engine as engine_module
from conveyor.model.cuda_graphs import MAX_CAPTURE_SIZE, capture_sizes
from conveyor.model.loader import load_model
from conveyor.model.runner import ModelRunner


def test_capture_sizes_cover_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(17) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(10_000)[-1] == MAX_CAPTURE_SIZE
    for n in range(1, 600):
        sizes = capture_sizes(n)
        assert sizes == sorted(set(sizes)) and sizes[-1] >= min(n, MAX_CAPTURE_SIZE)
        assert len(sizes) == 1 or sizes[-2] < n  # no bucket beyond the first that holds them all


def padded_llm(monkeypatch, path: str, **kw) -> LLM:
    """An LLM whose runner sends decode batches through the decode graphs' static buffers (mode "padded")."""
    monkeypatch.setattr(engine_module, "ModelRunner",
                        lambda *a, **k: ModelRunner(*a, **{**k, "cuda_graphs": "padded"}))
    llm = LLM(path, **kw)
    monkeypatch.undo()
    return llm


def count_runs(llm: LLM) -> list[tuple[int, int]]:
    """Per decode batch through the graphs: (batch, bucket)."""
    graphs, seen = llm.engine.runner.graphs, []
    run = graphs.run

    def counting(ids, positions, tables):
        seen.append((len(ids), graphs.bucket(len(ids))))
        return run(ids, positions, tables)

    graphs.run = counting
    return seen


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [(5 * i + 3 * j) % 200 + 10 for j in range(3 + 7 * i)]} for i in range(n)]


@pytest.mark.parametrize("kind,backend,dtype", [("llama", "auto", "float32"), ("mistral", "auto", "bfloat16"),
                                                ("qwen3", "triton", "float32")])
def test_padded_decode_batches_match_eager(monkeypatch, checkpoint, kind, backend, dtype):
    """Batches of 7 shrinking to 1 run in buckets 8, 4, 2, 1 with padding rows, and give the eager path's greedy
    tokens and logprobs. Sequences in the middle of the batch finish first, so later rows move up and a padding row
    takes a row a running sequence had (a stale slot there would overwrite its keys). mistral: a sliding window;
    triton: Triton's interpreter."""
    path = checkpoint(kind)
    lengths = [12, 3, 11, 5, 10, 7, 9] if backend == "auto" else [5, 2, 4]
    n = len(lengths)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in lengths]
    kw = dict(dtype=dtype, num_kv_blocks=64, attention_backend=backend, max_num_seqs=8)
    eager = LLM(path, **kw).generate(prompts(n), params)
    llm = padded_llm(monkeypatch, path, **kw)
    seen = count_runs(llm)
    got = llm.generate(prompts(n), params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager]
    for a, b in zip(got, eager):
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-3 for t in x)
    assert any(b < size for b, size in seen), "some batch ran with padding rows"
    assert {b for b, _ in seen} >= {n, 1}
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_pad_block_is_outside_the_block_pool(monkeypatch, checkpoint):
    llm = padded_llm(monkeypatch, checkpoint("llama"), dtype="float32", num_kv_blocks=20)
    runner = llm.engine.runner
    assert runner.num_blocks == llm.engine.kv.num_blocks == 20
    assert all(kv.shape[2] == 21 for kv in runner.kv_caches) and runner.graphs.pad_block == 20
    # every block the pool can hand out, in use at once: none is the pad block, and decodes still match
    out = llm.generate(prompts(3), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eager = LLM(checkpoint("llama"), dtype="float32", num_kv_blocks=20).generate(
        prompts(3), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in eager]


def test_preemption_parallel_sampling_and_prefix_caching_through_graphs(monkeypatch, checkpoint):
    """Few blocks (sequences are preempted and recomputed), n=3 (copy-on-write forks), a shared prefix: the same
    greedy outputs with and without the graphs."""
    path = checkpoint("llama")
    system = [(7 * i) % 200 + 10 for i in range(40)]
    reqs = [{"prompt_token_ids": system + [11 + i, 12 + i]} for i in range(5)]
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    kw = dict(dtype="float32", num_kv_blocks=24, max_num_seqs=16)
    want = [[c.token_ids for c in o.outputs] for o in LLM(path, **kw).generate(reqs, params)]
    llm = padded_llm(monkeypatch, path, **kw)
    seen = count_runs(llm)
    got = [[c.token_ids for c in o.outputs] for o in llm.generate(reqs, params)]
    assert got == want
    assert seen and llm.engine.scheduler.num_preemptions > 0
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_steps_the_graphs_do_not_take_run_eagerly(monkeypatch, checkpoint):
    """Prompt logprobs, and speculative verification (several tokens per sequence), fall back to the eager
    forward; the decodes around them still use the graphs."""
    path = checkpoint("llama")
    llm = padded_llm(monkeypatch, path, dtype="float32", num_kv_blocks=64,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    seen = count_runs(llm)
    rep = [{"prompt_token_ids": [21, 22, 23, 24] * 6}]
    spec = llm.generate(rep, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    eager = LLM(path, dtype="float32", num_kv_blocks=64,
                speculative_config={"method": "ngram", "num_speculative_tokens": 3}).generate(
        rep, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert spec[0].outputs[0].token_ids == eager[0].outputs[0].token_ids
    seen.clear()
    plp = llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    assert plp[0].prompt_logprobs and not seen


def test_modes_that_cannot_run_are_refused(checkpoint):
    loaded = load_model(ModelConfig(model=checkpoint("llama"), dtype="float32"), "cpu")
    for mode, backend, match in (("capture", "auto", "CUDA device"), ("padded", "torch", "torch attention"),
                                 ("sometimes", "auto", "cuda_graphs must be")):
        with pytest.raises(ValueError, match=match):
            ModelRunner(loaded, CacheConfig(num_kv_blocks=8), SchedulerConfig(), "cpu", attention_backend=backend,
                        cuda_graphs=mode)


def test_enforce_eager_flag_reaches_the_engine(checkpoint):
    args = build_parser().parse_args(["serve", checkpoint("llama"), "--enforce-eager"])
    assert engine_kwargs(args)["enforce_eager"] is True
    llm = LLM(checkpoint("llama"), dtype="float32", num_kv_blocks=8, enforce_eager=True)
    assert llm.engine.config.enforce_eager and llm.engine.runner.graphs is None
    assert LLM(checkpoint("llama"), dtype="float32", num_kv_blocks=8).engine.runner.graphs is None  # CPU: none
