"""Offline API in vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from tqdm import tqdm

from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from conveyor.engine.engine import Engine, Prompt
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "demo", *, dtype: str = "auto", block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None, load_format: str = "auto",
                 device: str = "auto", seed: int = 0, revision: str | None = None, batching: str = "continuous",
                 kv_layout: str = "paged", batch_window_s: float = 0.05, batch_timeout_s: float = 2.0,
                 enable_prefix_caching: bool = True, watermark: float = 0.01, scheduling_policy: str = "fcfs",
                 long_prefill_token_threshold: int = 0, preemption_mode: str = "recompute",
                 swap_space: float = 0.0, tokenizer: str | None = None, quantization: str | None = None) -> None:
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, load_format=load_format, max_model_len=max_model_len,
                              seed=seed, revision=revision, tokenizer=tokenizer, quantization=quantization),
            cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization, kv_layout=kv_layout,
                              enable_prefix_caching=enable_prefix_caching, watermark=watermark,
                              preemption_mode=preemption_mode, swap_space=swap_space),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      batching=batching, batch_window_s=batch_window_s,
                                      batch_timeout_s=batch_timeout_s, scheduling_policy=scheduling_policy,
                                      long_prefill_token_threshold=long_prefill_token_threshold),
            device=device,
        )
        self.engine = Engine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; results come back in input order. Every prompt is validated before any is
        queued, so a bad one raises ValueError and leaves the engine as it was."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for p in prompts:
            self.engine.tokenize(p)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, p, sp in zip(ids, prompts, params):
                self.engine.add_request(rid, p, sp)
                added.append(rid)
        except ValueError:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
            if not self.engine.last_step_num_seqs:
                time.sleep(0.001)  # a batching mode is waiting for its batch to fill
        bar.close()
        return [results[r] for r in ids]

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()
