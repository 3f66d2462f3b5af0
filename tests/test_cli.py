"""The logitlab CLI end to end on the real model (one real subprocess; the rest in-process on the
session's engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from logitlab import cli
from logitlab.sampling import SamplingParams

pytestmark = pytest.mark.real_model


@pytest.fixture
def use_real_engine(monkeypatch, real_engine):
    monkeypatch.setattr(cli, "_engine", lambda a, **kw: real_engine)
    return real_engine


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_in_a_fresh_process(real_engine):
    r = subprocess.run([sys.executable, "-m", "logitlab.cli", "generate", "The capital of France is",
                        "--max-tokens", "8", "--temperature", "0", "--json", "--logprobs", "2"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr
    resp = json.loads(r.stdout)
    choice = resp["choices"][0]
    expected = real_engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    assert choice["token_ids"] == expected[0].choices[0].token_ids
    assert choice["text"] == expected[0].choices[0].text
    assert choice["finish_reason"] in ("stop", "length")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(choice["token_ids"])
    assert all(len(t) == 2 for t in lp["top_logprobs"])
    assert resp["object"] == "text_completion" and resp["usage"]["completion_tokens"] == len(choice["token_ids"])


@pytest.mark.parametrize("argv, field", [
    (["generate", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--logit-bias", "12=3"], "logit_bias"),
    (["generate", "x", "--banned-token-id", "99999999"], "banned_token_ids"),
    (["generate", "x", "--max-tokens", "100000"], "max_tokens"),
    (["generate", "x", "--no-such-flag"], "arguments"),
    (["generate", "x", "--top-k", "abc"], "arguments"),
    (["score"], "text"),
    (["score", "--file", "/no/such/file.txt"], "file"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, use_real_engine, argv, field):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), err
    assert "Traceback" not in err


def test_unknown_model_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "generate", "x", "--model", "no-such-model")
    assert code == 2 and err.startswith("error: model:") and len(err.strip().splitlines()) == 1


def test_generate_streams_with_logprobs_and_explain(capsys, use_real_engine):
    code, out, err = run_cli(capsys, "generate", "Once upon a time", "--max-tokens", "5", "--seed", "3",
                             "--top-k", "20", "--logprobs", "3", "--explain")
    assert code == 0
    expected = use_real_engine.generate("Once upon a time", SamplingParams(max_tokens=5, seed=3, top_k=20))
    assert out == expected[0].choices[0].text + "\n"
    assert "top_k" in err and "drew" in err and "finish_reason" in err


def test_no_kv_cache_flag_gives_the_same_greedy_text(capsys, monkeypatch, real_engine):
    from logitlab.engine import Engine

    made = {}

    def fake(a, **kw):
        made.update(kw)
        return Engine(real_engine.model, real_engine.tokenizer, **kw)

    monkeypatch.setattr(cli, "_engine", fake)
    code, out, _ = run_cli(capsys, "generate", "The sky is", "--max-tokens", "6", "--temperature", "0",
                           "--no-kv-cache")
    assert code == 0 and made["use_cache"] is False
    expected = real_engine.generate("The sky is", SamplingParams(max_tokens=6, temperature=0))
    assert out == expected[0].choices[0].text + "\n"


def test_score_json(capsys, use_real_engine):
    code, out, _ = run_cli(capsys, "score", " Paris.", "--context", "The capital of France is", "--json")
    assert code == 0
    res = json.loads(out)
    ref = use_real_engine.score(" Paris.", context="The capital of France is")
    assert res["total_logprob"] == pytest.approx(ref.total_logprob, abs=1e-4)
    assert res["num_tokens"] == len(res["token_logprobs"]) == len(ref.tokens)
    assert res["perplexity"] == pytest.approx(ref.perplexity, rel=1e-4)


def test_score_file_with_progress(capsys, use_real_engine, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The cat sat on the mat. " * 5)
    code, out, _ = run_cli(capsys, "score", "--file", str(f))
    assert code == 0 and "perplexity" in out


def test_dist_table_and_plot(capsys, use_real_engine, tmp_path):
    png = tmp_path / "dist.png"
    code, out, err = run_cli(capsys, "dist", "The capital of France is", "--top-k", "5", "--top-p", "0.6",
                             "--top", "12", "--plot", str(png))
    assert code == 0
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 12
    # top-k=5 keeps exactly the first 5 rows (no ties in a real distribution)
    assert all(("kept" in r.split()[-3]) == (i < 5) for i, r in enumerate(rows))
    assert "top_k=5: keeps 5 tokens" in out


def test_chat_reads_turns_until_eof(capsys, monkeypatch, use_real_engine):
    inputs = iter(["Say hi"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = run_cli(capsys, "chat", "--max-tokens", "8", "--temperature", "0")
    assert code == 0 and out.strip()
