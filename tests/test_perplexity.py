"""`conveyor eval perplexity`: the engine's forward against transformers on tiny random checkpoints, the windows,
and the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor.cli import main
from conveyor.config import ModelConfig
from conveyor.eval.perplexity import perplexity, windows
from conveyor.model.loader import load_model

TEXT = Path(__file__).resolve().parent.parent / "bench" / "data" / "perplexity_en.txt"


def hf_nll(path: str, ids: list[int], spans: list[tuple[int, int]], context: int,
           bos: int | None) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL from transformers' own forward, one window at a time, and the log-probabilities
    [scored tokens, vocab] of the scored positions."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    nlls, rows = [], []
    for start, first in spans:
        window = torch.tensor([ids[start:start + context]])
        if bos is not None:
            window[0, 0] = bos
        with torch.no_grad():
            logp = F.log_softmax(hf(window).logits[0].double(), dim=-1)
        for pos in range(first - start, context):
            nlls.append(-logp[pos - 1, window[0, pos]].item())
            rows.append(logp[pos - 1])
    return sum(nlls) / len(nlls), torch.stack(rows)


@pytest.mark.parametrize("kind,stride,bos", [("llama", None, None), ("qwen2", 32, None), ("llama-tied", None, 1)])
def test_perplexity_matches_transformers(checkpoint, kind, stride, bos):
    path = checkpoint(kind)
    ids = AutoTokenizer.from_pretrained(path)(TEXT.read_text(), add_special_tokens=False).input_ids[:1500]
    context = 128
    loaded = load_model(ModelConfig(model=path, dtype="float32"), "cpu")
    r = perplexity(loaded, ids, context, stride, bos_token_id=bos)
    step = stride or context
    # the windows written out independently: every `step` tokens, the last min(step, context // 2) scored
    spans = [(s, s + context - min(step, context // 2)) for s in range(0, len(ids) - context + 1, step)]
    ref, ref_logp = hf_nll(path, ids, spans, context, bos)
    assert r.windows == len(spans)
    assert r.num_tokens == sum(s + context - f for s, f in spans)
    assert r.nll == pytest.approx(ref, rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(ref), rel=1e-4)
    # the greedy predictions are transformers' argmax, up to near-ties (float32 rounding may order those either way)
    ours = torch.tensor(r.predictions)
    gap = ref_logp.max(-1).values - ref_logp.gather(1, ours[:, None])[:, 0]
    assert len(ours) == r.num_tokens and gap.max().item() < 1e-4


def test_default_windows_score_second_halves_as_llama_cpp():
    # 1000 tokens, -c 256: three whole chunks (the 232-token tail is dropped), each scores its second half
    assert windows(1000, 256) == [(0, 128), (256, 384), (512, 640)]
    assert windows(256, 256) == [(0, 128)]
    assert windows(5, 3) == [(0, 2)]  # odd context: the longer part is history


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 300), st.data())
def test_overlapping_windows_score_every_token_once(context, data):
    stride = data.draw(st.integers(1, context // 2))
    n = data.draw(st.integers(context, 3 * context + 7))
    spans = windows(n, context, stride)
    scored = [t for start, first in spans for t in range(first, start + context)]
    assert len(scored) == len(set(scored))  # no token twice
    last_end = spans[-1][0] + context
    assert set(scored) == set(range(context - stride, last_end))  # no gap; the first window's history unscored
    assert context - stride >= context // 2
    assert last_end > n - stride  # only a tail shorter than a stride is left out
    assert all(first - start >= context - context // 2 for start, first in spans)  # history of >= context / 2


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 300), st.data())
def test_any_stride_scores_no_token_twice_and_keeps_half_a_window_of_history(context, data):
    stride = data.draw(st.integers(1, 2 * context))
    spans = windows(data.draw(st.integers(context, 4 * context)), context, stride)
    scored = [t for start, first in spans for t in range(first, start + context)]
    assert len(scored) == len(set(scored))
    assert all(first - start >= context - context // 2 for start, first in spans)


@pytest.mark.parametrize("n,context,stride,match", [
    (100, 1, None, "context must be at least 2"), (100, 64, 0, "stride must be at least 1"),
    (63, 64, None, "fewer than one window"),
])
def test_windows_reject_bad_arguments(n, context, stride, match):
    with pytest.raises(ValueError, match=match):
        windows(n, context, stride)


def test_perplexity_rejects_a_context_over_max_model_len_and_bad_token_ids(checkpoint):
    loaded = load_model(ModelConfig(model=checkpoint("llama"), dtype="float32", max_model_len=64), "cpu")
    with pytest.raises(ValueError, match="exceeds the model's max_model_len 64"):
        perplexity(loaded, list(range(200)), context=128)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
        perplexity(loaded, [5] * 63 + [320], context=64)


def test_cli_prints_the_numbers(checkpoint, capsys):
    path = checkpoint("llama")
    args = ["eval", "perplexity", "--model", path, "--text", str(TEXT), "--context", "128", "--dtype", "float32",
            "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    loaded = load_model(ModelConfig(model=path, dtype="float32"), "cpu")
    ids = loaded.tokenizer(TEXT.read_text(), add_special_tokens=False).input_ids
    r = perplexity(loaded, ids, 128)
    assert (out["tokens_scored"], out["windows"], out["text_tokens"]) == (r.num_tokens, r.windows, len(ids))
    assert out["nll"] == pytest.approx(r.nll, rel=1e-9) and out["ppl"] == pytest.approx(r.ppl, rel=1e-9)
    assert (out["model"], out["dtype"], out["context"], out["bos"]) == (path, "float32", 128, False)
    assert out["seconds"] > 0 and out["tokens_per_s"] > 0
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert f"{r.num_tokens} tokens scored in {r.windows} windows" in line and f"ppl={r.ppl:.4f}" in line


@pytest.mark.parametrize("setup,extra,match", [
    ("missing", [], "no such text file"),
    ("empty", [], "holds no text"),
    ("latin1", [], "not UTF-8"),
    ("short", [], "fewer than one window of 512"),
    ("text", ["--context", "1"], "context must be at least 2"),
    ("text", ["--stride", "0"], "stride must be at least 1"),
    ("text", ["--model", "/nonexistent/model.gguf"], "no such file"),
])
def test_cli_bad_input_is_one_error_line(checkpoint, tmp_path, capsys, setup, extra, match):
    f = tmp_path / "t.txt"
    contents = {"empty": " \n\n", "latin1": "café".encode("latin-1"), "short": "The quick brown fox.",
                "text": TEXT.read_text()}
    if setup in contents:
        data = contents[setup]
        f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data)
    rc = main(["eval", "perplexity", "--model", checkpoint("llama"), "--text", str(f), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_console_script_exit_status(tmp_path):
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "eval", "perplexity", "--model", "demo", "--text",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: no such text file: {tmp_path / 'missing.txt'}"
