"""`logitlab bench --train` compares like with like: the same weights, batch and optimizer (no timing asserted)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_train_bench_starts_both_models_from_the_same_loss(tmp_path, one_thread):
    from logitlab.bench_train import run

    res = run("tiny", batch=2, seq_len=32, rounds=1, steps=1)
    assert abs(res["first_loss_ours"] - res["first_loss_transformers"]) < 1e-4
    assert res["ours_train_tok_s"] > 0 and res["transformers_train_tok_s"] > 0
    assert res["ratio_vs_transformers"] == pytest.approx(res["ours_train_tok_s"] / res["transformers_train_tok_s"])
    # PaLM's count for the tiny shape, by hand: 6 * (4 layers * 12 C^2 + V C) + 12 L C T
    c, v, layers, t = 256, 4096, 4, 32
    assert res["gflop_per_token"] * 1e9 == pytest.approx(6 * (layers * 12 * c * c + v * c) + 12 * layers * c * t)


def test_train_bench_cli_writes_json(tmp_path, one_thread):
    from logitlab.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--train", "--shape", "tiny", "--batch", "1", "--seq-len", "16", "--rounds", "1",
                 "--steps", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["shape"] == "tiny"
    assert main(["bench", "--train", "--batch", "0"]) == 2
