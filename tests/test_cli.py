from __future__ import annotations

import json
import subprocess
import sys

from conveyor.cli import main


def test_generate_prints_json_outputs(capsys):
    rc = main(["generate", "--model", "demo", "--prompt", "Hello", "--prompt", "Hi there", "--max-tokens", "5",
               "--ignore-eos", "--json", "--block-size", "8", "--max-num-seqs", "4"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["prompt"] for d in lines] == ["Hello", "Hi there"]
    assert all(len(d["token_ids"]) == 5 and d["finish_reason"] == "length" for d in lines)


def test_generate_rejects_bad_input_with_a_message(capsys):
    rc = main(["generate", "--model", "demo", "--prompt", "x", "--max-tokens", "100000"])
    assert rc == 2
    assert "maximum length" in capsys.readouterr().err


def test_console_script_chat_mode_runs():
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "generate", "--model", "demo", "--chat", "--prompt", "Hi",
                          "--max-tokens", "4", "--temperature", "0.7", "--sampling-seed", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--- prompt: 'Hi' [0]" in out.stdout
