"""Long work shows progress: the Progress helper on and off a terminal, model loads, `bench compare`; outputs that
cannot be written are refused before the work starts."""
from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

import conveyor.progress as progress
from conveyor.cli import main
from conveyor.output_files import check_output_file, prepare_output_dir
from conveyor.progress import Progress, format_duration


def test_off_a_terminal_lines_are_rate_limited_and_end_with_the_total():
    lines: list[str] = []
    with Progress(4, "work", "items", emit=lines.append, every_s=3600, after_s=0, tty=False) as p:
        for _ in range(4):
            p.update()
    # the first update is due at once (after_s=0), the next not for an hour; close adds the final count
    assert lines[0].startswith("work: 1/4 items (25%)") and "left" in lines[0]
    assert lines[1].startswith("work: 4/4 items (100%), done in") and len(lines) == 2


def test_fast_work_prints_nothing_but_notes_always_show():
    lines: list[str] = []
    with Progress(3, "work", emit=lines.append, after_s=3600, tty=False) as p:
        p.update(3)
        p.note("phase two")
    assert lines == ["phase two"]
    quiet: list[str] = []
    with Progress(3, "work", emit=quiet.append, after_s=0, every_s=0, tty=False, disable=True) as p:
        p.update(3)
        p.note("phase two")
    assert quiet == []


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    lines: list[str] = []
    with Progress(2, "bar", "req", emit=lines.append, after_s=0, tty=True) as p:
        p.update(2)
    assert lines == [] and "bar: 100%" in err.getvalue() and "2/2" in err.getvalue()


def test_eta_and_durations():
    p = Progress(10, "x", tty=False, disable=True)
    assert p.eta_s() is None
    p.update(5)
    assert p.eta_s() is not None and p.eta_s() >= 0
    p.add_total(10)
    assert p.total == 20
    assert [format_duration(s) for s in (4.4, 125, 3720)] == ["4 s", "2m05s", "1h02m"]


def test_model_loads_log_progress_off_a_terminal(checkpoint, monkeypatch, caplog):
    """A load that lasts past LOAD_AFTER_S logs its progress as conveyor.loader lines (JSON under serve)."""
    from conveyor import LLM

    monkeypatch.setattr(progress, "LOAD_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LOAD_EVERY_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="conveyor.loader"):
        LLM(checkpoint("qwen2"), num_kv_blocks=8)
        LLM(checkpoint("qwen2"), num_kv_blocks=8, quantization="int8")
    msgs = [r.getMessage() for r in caplog.records if r.name == "conveyor.loader"]
    assert any(m.startswith("Loading safetensors weights: 1/") for m in msgs), msgs
    assert any(m.startswith("Loading safetensors weights: ") and "(100%), done in" in m for m in msgs), msgs
    assert any(m.startswith("Quantizing weights to int8: 2/2 layers (100%)") for m in msgs), msgs


def test_gguf_load_logs_progress(checkpoint, tmp_path, monkeypatch, caplog):
    from gguf_checkpoint import write_gguf

    from conveyor import LLM

    path = write_gguf("qwen2", Path(checkpoint("qwen2")), tmp_path / "m.gguf", "Q8_0")
    monkeypatch.setattr(progress, "LOAD_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LOAD_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="conveyor.loader"):
        LLM(str(path), num_kv_blocks=8)
    msgs = [r.getMessage() for r in caplog.records if r.message.startswith("Loading GGUF weights")]
    assert msgs and "(100%), done in" in msgs[-1], msgs


# ---- outputs --------------------------------------------------------------------------------------------------
def test_output_checks(tmp_path):
    check_output_file(tmp_path / "r.json", "--output")
    assert not (tmp_path / "r.json").exists()  # no trace left
    with pytest.raises(ValueError, match=r"^--output .*: the folder .*missing does not exist$"):
        check_output_file(tmp_path / "missing" / "r.json", "--output")
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(tmp_path, "--output")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_file(tmp_path / "f" / "r.json", "--output")
    prepare_output_dir(tmp_path / "a" / "b", "--plot")
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ValueError, match="^--plot .*: is a file"):
        prepare_output_dir(tmp_path / "f", "--plot")


# ---- bench compare --------------------------------------------------------------------------------------------
COMPARE = ["bench", "compare", "--model", "demo", "--num-requests", "2", "--prompt-len", "8", "--output-len", "4",
           "--modes", "none", "continuous-paged"]


def test_compare_refuses_an_unwritable_output_before_loading(tmp_path, monkeypatch, capsys):
    from conveyor.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "run_compare", lambda a: pytest.fail("the experiment started"))
    assert main(COMPARE + ["--output", str(tmp_path / "nope" / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --output") and "does not exist" in err[0]


def test_compare_shows_each_run_off_a_terminal(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(COMPARE + ["--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "# run 1/2: none" in err and "# run 2/2: continuous-paged; 2/4 requests done, ~" in err, err
    assert out.exists()
