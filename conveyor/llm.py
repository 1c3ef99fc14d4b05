"""Offline API in vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...)) and .chat(messages, ...)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from conveyor.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from conveyor.engine.engine import Engine, Prompt
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams, ensure_utf8


class LLM:
    def __init__(self, model: str = "demo", *, dtype: str = "auto", block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None, load_format: str = "auto",
                 device: str = "auto", seed: int = 0, revision: str | None = None, batching: str = "continuous",
                 kv_layout: str = "paged", batch_window_s: float = 0.05, batch_timeout_s: float = 2.0,
                 enable_prefix_caching: bool = True, watermark: float = 0.01, scheduling_policy: str = "fcfs",
                 long_prefill_token_threshold: int = 0, preemption_mode: str = "recompute",
                 swap_space: float = 0.0, tokenizer: str | None = None, quantization: str | None = None,
                 max_logprobs: int = 20, speculative_config: dict | SpeculativeConfig | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False,
                 async_scheduling: bool = False) -> None:
        """vLLM's LLM arguments (README: "Offline"). speculative_config: vLLM's --speculative-config as a dict
        or a SpeculativeConfig. Raises ValueError for a bad value of any of them."""
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, load_format=load_format, max_model_len=max_model_len,
                              seed=seed, revision=revision, tokenizer=tokenizer, quantization=quantization,
                              max_logprobs=max_logprobs),
            cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization, kv_layout=kv_layout,
                              enable_prefix_caching=enable_prefix_caching, watermark=watermark,
                              preemption_mode=preemption_mode, swap_space=swap_space),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      batching=batching, batch_window_s=batch_window_s,
                                      batch_timeout_s=batch_timeout_s, scheduling_policy=scheduling_policy,
                                      long_prefill_token_threshold=long_prefill_token_threshold),
            device=device, speculative=speculative_config, attention_backend=attention_backend,
            enforce_eager=enforce_eager, async_scheduling=async_scheduling,
        )
        self.engine = Engine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; results come back in input order. A prompt is a string, a list of token ids,
        {"prompt": text} or {"prompt_token_ids": [...]}. Every prompt is validated before any is queued, so a bad
        one raises ValueError and leaves the engine as it was."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        return self._run([(p, None) for p in prompts], self._params(sampling_params, len(prompts)), use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = False,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of OpenAI-style messages) or to a list of them, rendered with
        the model's chat template (or `chat_template`), as vLLM's LLM.chat. Messages are {"role", "content"} with
        content a string or a list of {"type": "text", "text"} parts (plus tool_calls / tool_call_id for tool
        use); `tools` (OpenAI function tools) are shown to the model through the template, or through a system
        prompt block when the template ignores them (conveyor.tools.render_chat). The output is not parsed for
        tool calls. continue_final_message leaves the last message open for the reply to continue (needs
        add_generation_prompt=False); chat_template_kwargs are extra variables for the template (JSON values, not
        the renderer's own arguments). Raises ValueError for malformed messages, tools or options, or a template
        that fails on them."""
        from conveyor.tools import ToolRequest, check_chat_options, check_tool_messages, render_chat

        check_chat_options(chat_template_kwargs, add_generation_prompt, continue_final_message)
        conversations = _conversations(messages)
        tool_request = ToolRequest.from_request(tools, None, None)
        tok = self.engine.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("the model has no chat template; pass chat_template= or use generate()")
        rendered = []
        for conv in conversations:
            check_tool_messages(conv)
            try:
                text = render_chat(tok, conv, tool_request, add_generation_prompt=add_generation_prompt,
                                   chat_template=chat_template, continue_final_message=continue_final_message,
                                   template_kwargs=chat_template_kwargs)
                ids = tok.encode(text, add_special_tokens=False)  # the template writes any special tokens
            except Exception as e:  # a template may raise on messages it does not accept
                raise ValueError(f"the messages could not be rendered with the chat template "
                                 f"({type(e).__name__}: {str(e)[:200]})") from None
            rendered.append(({"prompt_token_ids": ids}, text))
        return self._run(rendered, self._params(sampling_params, len(rendered)), use_tqdm)

    @staticmethod
    def _params(sampling_params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params or SamplingParams()] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"{n} prompts but {len(params)} sampling params")
        return params

    def _run(self, prompts: list[tuple[Prompt, str | None]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        """Validate every (prompt, its text if already rendered) first, queue them all, run until all finish."""
        for (p, _), sp in zip(prompts, params):
            self.engine.validate(p, sp)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, (p, text), sp in zip(ids, prompts, params):
                self.engine.add_request(rid, p, sp, prompt_text=text)
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
            if not self.engine.last_step_num_seqs and len(results) < len(ids):
                time.sleep(0.001)  # a batching mode is waiting for its batch to fill
        while not self.engine.requests and self.engine.has_unfinished_requests():
            self.engine.step()  # a step still in flight (asynchronous scheduling) for sequences that have ended
        bar.close()
        return [results[r] for r in ids]

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()


def _conversations(messages: Any) -> list[list[dict[str, Any]]]:
    """One conversation or a list of them, each checked and its text content parts joined. Raises ValueError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of messages, or a list of such lists")
    convs = [messages] if all(isinstance(m, dict) for m in messages) else messages
    out = []
    for c, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"conversation {c} must be a non-empty list of message dicts")
        out.append([_message(m, f"conversation {c} message {i}") for i, m in enumerate(conv)])
    return out


def _message(m: dict[str, Any], where: str) -> dict[str, Any]:
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where}: 'role' must be a non-empty string")
    if isinstance(content, (list, tuple)):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"{where}: content parts must be {{'type': 'text', 'text': str}} (only text is "
                             f"supported)")
        content = "".join(p["text"] for p in content)
    elif content is None:
        if not (role == "assistant" and m.get("tool_calls")):
            raise ValueError(f"{where}: 'content' is missing (only an assistant message with tool_calls may omit it)")
    elif not isinstance(content, str):
        raise ValueError(f"{where}: 'content' must be a string or a list of text parts")
    if content is not None:
        ensure_utf8(content, f"{where}'s content")
    return {**m, "content": content}
