"""`conveyor run-batch`: OpenAI batch JSONL in, one answer per line out, through the server's own app; resume from
the output file after a truncation or a kill; file-level errors as one line and exit 2."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conveyor import LLM, SamplingParams
from conveyor.cli import main

ENGINE = ["--model", "demo", "--num-kv-blocks", "512", "--max-num-seqs", "16"]


def line(cid, url="/v1/completions", method="POST", **body) -> str:
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


def completion(cid: str, max_tokens: int = 4, **kw) -> str:
    return line(cid, prompt=f"prompt {cid}", max_tokens=max_tokens, temperature=0, **kw)


def run(tmp_path, lines: list[str], *extra: str) -> tuple[int, list[dict]]:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc = main(["run-batch", "-i", str(src), "-o", str(out), *ENGINE, *extra])
    return rc, read(out)


def read(path) -> list[dict]:
    return [json.loads(t) for t in path.read_text().splitlines()]


def by_id(records: list[dict]) -> dict:
    return {r["custom_id"]: r for r in records}


def test_a_mixed_file_gets_one_answer_per_line_in_openai_shapes(tmp_path, capsys):
    chat = [{"role": "user", "content": "Hi"}]
    lines = [
        "\ufeff" + line("chat", "/v1/chat/completions", model="demo", messages=chat, max_tokens=3, logprobs=True,
                        top_logprobs=2),  # a UTF-8 BOM before the first line is dropped
        completion("cmpl", model="demo"),
        json.dumps({"custom_id": "sep", "method": "POST", "url": "/v1/completions",  # U+2028 does not end a line
                    "body": {"prompt": "a\u2028b", "max_tokens": 2}}, ensure_ascii=False),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        "",  # blank lines are skipped
        line("embed", "/v1/embeddings", input="x"),
        line("get", method="GET", prompt="x"),
        completion("stream", stream=True),
        completion("too-long", max_tokens=100000),
        completion("unknown-field", bogus=1),
        completion("other-model", model="gpt-4o"),
    ]
    rc, out = run(tmp_path, lines)
    assert rc == 0, capsys.readouterr().err
    assert len(out) == 11 and all(r["id"].startswith("batch_req_") for r in out)
    anonymous = [r for r in out if r["custom_id"] is None]
    assert [r["error"]["code"] for r in anonymous] == ["invalid_json", "missing_custom_id"]
    assert all(r["response"] is None and r["error"]["message"].startswith("line ") for r in anonymous)
    got = by_id(out)
    assert {k: got[k]["error"]["code"] for k in ("embed", "get", "stream")} == \
        {"embed": "invalid_url", "get": "invalid_method", "stream": "invalid_body"}

    c = got["chat"]["response"]
    assert got["chat"]["error"] is None and c["status_code"] == 200
    assert c["body"]["object"] == "chat.completion" and c["body"]["id"] == f"chatcmpl-{c['request_id']}"
    assert c["body"]["choices"][0]["message"]["role"] == "assistant"
    assert len(c["body"]["choices"][0]["logprobs"]["content"]) == 3 == c["body"]["usage"]["completion_tokens"]

    # the same tokens the engine gives offline: the server's defaults and the engine flags reach the engine
    expected = LLM(model="demo").generate(["prompt cmpl"], SamplingParams(max_tokens=4, temperature=0))
    assert got["cmpl"]["response"]["body"]["choices"][0]["text"] == expected[0].outputs[0].text

    assert got["sep"]["response"]["status_code"] == 200
    for cid, status, param in (("too-long", 400, "prompt"), ("unknown-field", 400, "bogus"),
                               ("other-model", 404, "model")):
        r = got[cid]
        assert r["error"] is None and r["response"]["status_code"] == status, r
        assert r["response"]["body"]["error"]["param"] == param
    err = capsys.readouterr().err
    assert "run-batch" in err and "11 lines answered (8 with an error)" in err  # the bar and the summary


def test_resume_after_a_torn_output_answers_each_line_once(tmp_path, capsys, monkeypatch):
    lines = [completion(f"r{i}") for i in range(8)] + ["not json"]
    rc, first = run(tmp_path, lines, "--max-concurrency", "3")
    assert rc == 0 and len(first) == 9
    out = tmp_path / "out.jsonl"
    kept = out.read_bytes().split(b"\n")
    head = b"\n".join(kept[:4]) + b"\n"
    out.write_bytes(head + kept[4][:25])  # four whole lines and a torn fifth, as a kill while writing leaves
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))  # -i - reads stdin
    assert main(["run-batch", "-i", "-", "-o", str(out), *ENGINE, "--disable-tqdm"]) == 0
    again = out.read_bytes()
    assert again.startswith(head)  # earlier answers untouched
    records = read(out)
    assert sorted(r["custom_id"] for r in records if r["custom_id"]) == [f"r{i}" for i in range(8)]
    assert sum(r["custom_id"] is None for r in records) == 1
    assert "5 lines answered" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(out), *ENGINE]) == 0
    assert out.read_bytes() == again and "nothing to do" in capsys.readouterr().err


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    lines = [completion(f"k{i}", max_tokens=48, ignore_eos=True) for i in range(40)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "conveyor.cli", "run-batch", "-i", str(src), "-o", str(out), *ENGINE,
           "--max-concurrency", "2", "--disable-tqdm"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    before = out.read_bytes()
    whole = before[:before.rfind(b"\n") + 1]
    assert 3 <= whole.count(b"\n") < 40, "the run ended before it was killed"
    assert main(["run-batch", "-i", str(src), "-o", str(out), *ENGINE, "--disable-tqdm"]) == 0
    assert out.read_bytes().startswith(whole)
    ids = [r["custom_id"] for r in read(out)]
    assert sorted(ids) == sorted(f"k{i}" for i in range(40))
    assert all(r["response"]["status_code"] == 200 for r in read(out))


@pytest.mark.parametrize("device_broken", [False, True])
def test_lines_the_server_fails_are_left_for_a_rerun(tmp_path, capsys, monkeypatch, device_broken):
    """A forward that raises for one request (a 500) or for good (the engine stops): those lines get no answer,
    exit 1, and a rerun answers them."""
    from conveyor.model.runner import ModelRunner

    poison, execute, broken = [7, 7, 7, 7], ModelRunner.execute, []

    def faulty(self, scheduled, *args, **kwargs):
        if broken or any(s.seq.token_ids[:4] == poison for s in scheduled):
            broken.extend([True] if device_broken else [])
            raise RuntimeError("injected fault")
        return execute(self, scheduled, *args, **kwargs)

    ok = [completion(f"f{i}") for i in range(8)]
    bad = [line("poison", prompt=poison, max_tokens=4)]
    monkeypatch.setattr(ModelRunner, "execute", faulty)
    rc, out = run(tmp_path, bad + ok if device_broken else ok + bad, "--max-concurrency", "1")  # in input order
    assert rc == 1 and sorted(r["custom_id"] for r in out) == ([] if device_broken else [f"f{i}" for i in range(8)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "run the same command again" in err
    assert ("the engine stopped (" if device_broken else "failed 1 requests (first: custom_id 'poison'") in err
    monkeypatch.setattr(ModelRunner, "execute", execute)
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE]) == 0
    records = read(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in records) == [f"f{i}" for i in range(8)] + ["poison"]
    assert all(r["response"]["status_code"] == 200 for r in records)


@pytest.mark.parametrize("case", ["missing-input", "missing-dir", "output-is-dir", "duplicate", "same-file",
                                  "foreign-output"])
def test_file_problems_are_one_line_and_exit_2(tmp_path, capsys, case):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(completion("a") + "\n" + completion("b") + "\n")
    if case == "missing-input":
        src = tmp_path / "nope.jsonl"
    elif case == "missing-dir":
        out = tmp_path / "no" / "out.jsonl"
    elif case == "output-is-dir":
        out = tmp_path
    elif case == "duplicate":
        src.write_text(completion("a") + "\n" + completion("a") + "\n")
    elif case == "same-file":
        out = src
    else:
        out.write_text("hello\n" + json.dumps({"custom_id": "a"}) + "\n")
    before = out.read_bytes() if out.is_file() else None
    assert main(["run-batch", "-i", str(src), "-o", str(out), *ENGINE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing-input": "cannot read -i", "missing-dir": "cannot write -o", "output-is-dir": "cannot write -o",
                "duplicate": "lines 1 and 2", "same-file": "is the input file", "foreign-output": "line 1 is not"}
    assert expected[case] in err[0]
    if before is not None:
        assert out.read_bytes() == before  # nothing written, nothing cut


def test_bad_flags_are_refused_while_parsing(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run-batch", "-i", "x", "-o", "y", "--max-concurrency", "0"])
    assert e.value.code == 2 and "--max-concurrency" in capsys.readouterr().err
