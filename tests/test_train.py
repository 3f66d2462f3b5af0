"""logitlab train: the optimizer step against a hand-written one, learning, backward reversal, padding,
resume, DDP, the CLI end to end, and bad input."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitlab.train import checkpoint, loop
from logitlab.train.data import (
    IGNORE,
    TrainOrder,
    build_tokenizer,
    collate,
    load_texts,
    make_samples,
    split_corpus,
)
from logitlab.train.loop import TrainConfig, build_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def corpus(n_docs: int = 24, seed: int = 0) -> list[str]:
    """Sentences from a small grammar: far from uniform, with structure beyond single-byte frequencies."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "a small bird"]
    verb = ["sees", "likes", "follows", "finds", "watches"]
    obj = ["the ball", "a red apple", "the river", "his hat", "the green door"]
    return [" ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(rng.randint(3, 8)))
            for _ in range(n_docs)]


def small_cfg(**kw) -> TrainConfig:
    base = dict(preset="micro", seq_len=32, batch=4, steps=4, lr=1e-2, eval_every=2, eval_batches=2,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def row_tokens(batch, i: int) -> list[int]:
    """Row i's tokens (inputs then the last target), without padding."""
    n = int((batch.targets[i] != IGNORE).sum())
    return batch.inputs[i, :n].tolist() + [int(batch.targets[i, n - 1])]


# ---- the optimizer step ------------------------------------------------------------------------------

def test_steps_equal_a_hand_written_adamw_with_clipping_and_schedule():
    texts = corpus()
    cfg = small_cfg(steps=4, warmup=2, lr=2e-2, grad_clip=0.05, weight_decay=0.1, min_lr_ratio=0.1,
                    packing="padded", eval_every=100)
    tok = build_tokenizer("bytes", texts)
    split = split_corpus(texts, tok, cfg.seed, cfg.val_fraction)
    order = TrainOrder(make_samples(split.train, cfg.seq_len, "padded"), cfg.seed, cfg.batch)
    model = build_model(cfg, tok.vocab_size)

    params = dict(model.named_parameters())  # the tied LM head is the embedding: listed once
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    b1, b2, eps = 0.9, 0.95, 1e-8
    clipped = 0
    for step in range(cfg.steps):
        # warm-up: lr * (step+1)/2 for steps 0, 1; then a cosine from lr (step 2) to lr/10 (step 3, the last)
        lr = cfg.lr * (step + 1) / 2 if step < 2 else \
            cfg.lr * 0.1 + 0.5 * (1 + math.cos(math.pi * (step - 2) / 1)) * (cfg.lr - cfg.lr * 0.1)
        b = collate(order.rows(step), tok.pad_token_id)
        logits = model(b.inputs, b.positions, valid=b.valid, logits_at="all")
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE)  # mean per token
        model.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params.values()))
        scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
        clipped += scale < 1
        t = step + 1
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad * scale
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                if p.dim() >= 2:  # decoupled weight decay, matrices only
                    p.mul_(1 - lr * cfg.weight_decay)
                p.sub_(lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps))
    assert clipped == cfg.steps  # the clip was active at every step

    res = train(cfg, texts=texts)
    got = dict(res.model.named_parameters())
    assert got.keys() == params.keys()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p, atol=2e-6, rtol=1e-5, msg=n)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [loop.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[10 + 89 // 2] == pytest.approx(0.55, abs=0.02)  # halfway down the cosine


def test_gpt2_init_statistics():
    cfg = TrainConfig(preset="small")
    model = build_model(cfg, 300)
    p = {n: t.detach() for n, t in model.named_parameters()}
    assert float(p["model.embed_tokens.weight"].std()) == pytest.approx(0.02, rel=0.05)
    assert float(p["model.layers.0.mlp.up_proj.weight"].std()) == pytest.approx(0.02, rel=0.05)
    assert float(p["model.layers.3.mlp.down_proj.weight"].std()) == pytest.approx(0.02 / math.sqrt(12), rel=0.05)
    assert float(p["model.layers.0.self_attn.o_proj.weight"].std()) == pytest.approx(0.02 / math.sqrt(12), rel=0.05)
    assert torch.all(p["model.layers.0.input_layernorm.weight"] == 1)
    assert torch.all(p["model.layers.0.self_attn.qkv_proj.bias"] == 0)
    again = build_model(cfg, 300)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)  # seeded


# ---- learning ------------------------------------------------------------------------------------

def test_loss_falls_below_the_unigram_entropy():
    texts = corpus(40)
    cfg = small_cfg(steps=240, batch=8, seq_len=32, lr=1e-2, eval_every=240, eval_batches=4)
    tok = build_tokenizer("bytes", texts)
    split = split_corpus(texts, tok, cfg.seed, cfg.val_fraction)
    counts = np.bincount(np.concatenate(split.train), minlength=tok.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats/token: the best a model blind to context can do
    res = train(cfg, texts=texts)
    assert res.metrics[-1]["step"] == 240
    assert res.final_val_loss < unigram - 0.5, (res.final_val_loss, unigram)


# ---- data ------------------------------------------------------------------------------------------

def test_load_texts_reads_files_folders_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\xff\xfe")
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "e.txt").write_text("epsilon")
    assert load_texts([tmp_path / "d", tmp_path / "c.jsonl", tmp_path / "e.txt"]) == \
        ["alpha", "beta", "gamma", "delta", "epsilon"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="^data: .*text"):
        load_texts([tmp_path / "bad.jsonl"])


def test_split_is_fixed_by_the_seed_and_covers_every_document():
    texts = corpus(30)
    tok = build_tokenizer("bytes", texts)
    a, b = split_corpus(texts, tok, 0), split_corpus(texts, tok, 0)
    c = split_corpus(texts, tok, 1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.val) == 3 and len(a.train) == 27
    docs = sorted(tok.decode(s[1:-1].tolist()) for s in a.train + a.val)
    assert docs == sorted(texts)
    spoof = split_corpus(["a<|eos|>b", "c"], tok, 0)  # special tokens written in the text stay text
    assert sorted(len(s) for s in spoof.train + spoof.val) == [3, 2 + 9]
    one = split_corpus(["x" * 200], tok, 0)  # one document: its token stream is split
    assert len(one.train[0]) + len(one.val[0]) == 202 and len(one.val[0]) == 20


def test_collate_shifts_targets_and_masks_padding():
    b = collate([np.array([5, 6, 7, 8]), np.array([9, 10])], pad_id=0)
    assert b.inputs.tolist() == [[5, 6, 7], [9, 10, 0]]
    assert b.targets.tolist() == [[6, 7, 8], [10, IGNORE, IGNORE]]
    assert b.valid.tolist() == [[True, True, True], [True, True, False]]
    assert b.positions.tolist() == [[0, 1, 2], [0, 1, 2]] and b.num_targets == 4
    r = collate([np.array([5, 6, 7, 8]), np.array([9, 10])], pad_id=0, backward=True)
    assert r.inputs.tolist() == [[8, 7, 6], [10, 9, 0]] and r.targets.tolist() == [[7, 6, 5], [9, IGNORE, IGNORE]]
    assert collate([np.array([1, 2, 3])], 0).valid is None  # no padding: the model's fast causal path


def test_packed_windows_frame_documents_with_bos_and_eos():
    texts = corpus(10)
    tok = build_tokenizer("bytes", texts)
    split = split_corpus(texts, tok, 0)
    assert all(s[0] == tok.bos_token_id and s[-1] == tok.eos_token_id for s in split.train + split.val)
    samples = make_samples(split.train, 24, "packed")
    stream = np.concatenate(split.train)
    assert samples.n == (len(stream) - 1) // 24
    rows = TrainOrder(samples, 0, 8).rows(0)
    assert all(len(r) == 25 for r in rows)
    assert all(any(np.array_equal(stream[i: i + 25], r) for i in range(len(stream) - 24)) for r in rows)


def test_batch_order_is_a_pure_function_of_seed_and_step_and_covers_each_epoch():
    texts = corpus(30)
    tok = build_tokenizer("bytes", texts)
    samples = make_samples(split_corpus(texts, tok, 0).train, 16, "padded")
    order = TrainOrder(samples, seed=3, global_batch=5)
    fresh = TrainOrder(samples, seed=3, global_batch=5)
    for step in (7, 0, 7):
        assert all(np.array_equal(x, y) for x, y in zip(order.rows(step), fresh.rows(step), strict=True))
    n = samples.n
    seen = [tuple(r) for s in range(math.ceil(n / 5)) for r in order.rows(s)][:n]
    assert sorted(seen) == sorted(tuple(samples.get(i)) for i in range(n))  # an epoch is a permutation
    other = TrainOrder(samples, seed=4, global_batch=5)
    assert any(not np.array_equal(x, y) for x, y in zip(order.rows(0), other.rows(0), strict=True))


def test_bpe_tokenizer_is_trained_on_the_data_and_saved(tmp_path):
    from logitlab.tokenizer import Tokenizer
    from logitlab.train import save_tokenizer

    texts = corpus(20)
    tok = build_tokenizer("bpe:320", texts)
    assert tok.vocab_size == 320
    ids = tok.encode(texts[0], add_special_tokens=False)
    assert len(ids) < len(texts[0].encode()) / 2  # merges learnt from the data
    assert tok.decode(ids) == texts[0]
    save_tokenizer(tok, tmp_path)
    back = Tokenizer.from_hf_dir(tmp_path)
    assert back.encode(texts[1]) == [tok.bos_token_id] + tok.encode(texts[1], add_special_tokens=False)
    assert (back.bos_token, back.eos_token) == ("<|bos|>", "<|eos|>")
    assert build_tokenizer("bpe:320", texts).backend.to_str() == tok.backend.to_str()  # deterministic


# ---- backward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_backward_run_sees_the_forward_batches_flipped_along_time(monkeypatch, packing):
    seen: list = []
    real = loop.token_nll

    def spy(model, batch, device):
        seen.append(batch)
        return real(model, batch, device)

    monkeypatch.setattr(loop, "token_nll", spy)
    texts = corpus(12)
    runs = {}
    for direction in ("forward", "backward"):
        seen.clear()
        train(small_cfg(direction=direction, packing=packing, steps=3, eval_every=3, batch=4, seq_len=24),
              texts=texts)
        runs[direction] = list(seen)
    fwd, bwd = runs["forward"], runs["backward"]
    assert len(fwd) == len(bwd) >= 3 + 1  # 3 training batches, then the validation batches
    for f, b in zip(fwd, bwd, strict=True):
        assert f.inputs.shape == b.inputs.shape
        assert (f.valid is None) == (b.valid is None)
        for i in range(f.inputs.shape[0]):
            assert row_tokens(b, i) == row_tokens(f, i)[::-1]
        if packing == "packed":  # no padding: the whole [B, T+1] window reversed
            full = lambda x: torch.cat([x.inputs, x.targets[:, -1:]], 1)  # noqa: E731
            assert torch.equal(full(b), full(f).flip(1))
    if packing == "padded":
        assert sum(f.valid is not None for f in fwd) >= 2  # ragged rows really were padded


# ---- padding ---------------------------------------------------------------------------------------

def test_padded_batch_gives_the_loss_of_its_rows_alone():
    torch.manual_seed(0)
    model = build_model(small_cfg(), 259)
    with torch.no_grad():  # make the model's outputs depend strongly on context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, size=n).astype(np.int32) for n in (33, 5, 17, 2, 30)]
    batch = collate(rows, pad_id=258)
    assert batch.valid is not None and batch.inputs.shape == (5, 32)
    with torch.no_grad():
        padded = float(loop.token_nll(model, batch, torch.device("cpu"))) / batch.num_targets
        alone = [(float(loop.token_nll(model, collate([r], 258), torch.device("cpu"))), len(r) - 1) for r in rows]
    mean_alone = sum(s for s, _ in alone) / sum(n for _, n in alone)
    assert batch.num_targets == sum(n for _, n in alone)
    assert padded == pytest.approx(mean_alone, abs=1e-5)
    assert abs(padded - math.log(259)) > 0.05  # not a trivially uniform model


def test_grad_accumulation_follows_the_same_trajectory():
    texts = corpus(12)
    one = train(small_cfg(steps=3, eval_every=3, packing="padded"), texts=texts)
    two = train(small_cfg(steps=3, eval_every=3, packing="padded", grad_accum=2), texts=texts)
    assert two.losses == pytest.approx(one.losses, abs=1e-6)
    assert two.final_val_loss == pytest.approx(one.final_val_loss, abs=1e-6)


def test_bfloat16_autocast_trains_close_to_float32():
    texts = corpus(12)
    f32 = train(small_cfg(steps=3, eval_every=3), texts=texts)
    bf16 = train(small_cfg(steps=3, eval_every=3, dtype="bfloat16"), texts=texts)
    assert bf16.losses != f32.losses  # autocast really ran
    assert bf16.losses == pytest.approx(f32.losses, abs=0.05)
    assert bf16.model.model.embed_tokens.weight.dtype == torch.float32  # master weights stay float32


# ---- checkpoints and resume ---------------------------------------------------------------------------

def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    texts = corpus(16)
    full = train(small_cfg(steps=8, eval_every=4, out=tmp_path / "full"), texts=texts)

    def interrupt_at_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(steps=8, eval_every=4, out=out), texts=texts, on_step=interrupt_at_6)
    assert checkpoint.latest_step(out) == 4  # step 6 was never checkpointed; step 4 is intact
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [4]

    resumed = train(small_cfg(steps=8, eval_every=4, out=out, resume=True), texts=texts)
    assert len(resumed.losses) == 8
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert [m["val_loss"] for m in resumed.metrics] == pytest.approx([m["val_loss"] for m in full.metrics], abs=1e-6)
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    assert checkpoint.latest_step(out) == 8


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    texts = corpus(10)
    out = tmp_path / "run"
    calls = {"n": 0}
    real = checkpoint.save_file

    def flaky(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the second checkpoint, between its model and optimizer files
            raise KeyboardInterrupt
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(steps=4, eval_every=2, out=out), texts=texts)
    monkeypatch.undo()
    assert checkpoint.latest_step(out) == 2
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["latest.json", "step-00000002"]
    resumed = train(small_cfg(steps=4, eval_every=2, out=out, resume=True), texts=texts)
    full = train(small_cfg(steps=4, eval_every=2), texts=texts)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)


def test_resume_refuses_other_settings_or_data(tmp_path):
    texts = corpus(10)
    out = tmp_path / "run"
    train(small_cfg(steps=2, out=out), texts=texts)
    with pytest.raises(ValueError, match="^resume: seq_len"):
        train(small_cfg(steps=4, out=out, resume=True, seq_len=16), texts=texts)
    with pytest.raises(ValueError, match="^resume: the data"):
        train(small_cfg(steps=4, out=out, resume=True), texts=texts[:-1])
    again = train(small_cfg(steps=3, eval_every=3, out=out, seq_len=16), texts=texts)  # no --resume: start over
    assert [m["step"] for m in again.metrics] == [3] and checkpoint.latest_step(out) == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# ---- DDP ----------------------------------------------------------------------------------------------

def test_two_processes_with_torchrun_follow_the_one_process_run(tmp_path):
    texts = corpus(16)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["--data", str(data), "--preset", "micro", "--seq-len", "24", "--batch", "4", "--steps", "3",
            "--eval-every", "1", "--eval-batches", "2", "--lr", "1e-2", "--packing", "padded", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "logitlab.train",
                        "--out", str(tmp_path / "ddp"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]

    from logitlab.train.cli import _add_flags, _Parser, config_from_args  # the same flags, one process

    p = _Parser()
    _add_flags(p)
    one = train(config_from_args(p.parse_args(["--out", str(tmp_path / "one"), *args])))
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one.metrics, two, strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)


# ---- the CLI --------------------------------------------------------------------------------------------

def test_cli_trains_a_model_that_every_command_loads(tmp_path, capsys):
    from logitlab.cli import main
    from logitlab.engine import Engine
    from logitlab.sampling import SamplingParams

    data = tmp_path / "texts"
    data.mkdir()
    for i, t in enumerate(corpus(12)):
        (data / f"{i}.txt").write_text(t)
    out = tmp_path / "model"
    rc = main(["train", "--data", str(data), "--out", str(out), "--preset", "micro", "--steps", "30",
               "--seq-len", "32", "--batch", "4", "--eval-every", "10", "--tokenizer", "bpe:300", "--no-progress"])
    assert rc == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert all({"step", "tokens", "train_loss", "val_loss"} <= m.keys() for m in metrics)
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    engine = Engine.load(str(out))
    assert engine.vocab_size == 300
    res = engine.generate("the cat", SamplingParams(max_tokens=8, temperature=0.7, seed=0))
    assert len(res[0].choices[0].token_ids) >= 1
    capsys.readouterr()
    assert main(["score", "the cat sees the ball.", "--model", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_backward_checkpoint_names_its_start_and_end_tokens_the_other_way(tmp_path):
    from logitlab.engine import Engine

    out = tmp_path / "bwd"
    res = train(small_cfg(steps=2, direction="backward", out=out), texts=corpus(8))
    assert json.loads((out / "config.json").read_text())["logitlab"]["direction"] == "backward"
    engine = Engine.load(str(out))
    assert engine.tokenizer.bos_token == "<|eos|>" and engine.tokenizer.eos_token == "<|bos|>"
    assert res.tokenizer.bos_token_id == engine.tokenizer.bos_token_id


def test_the_saved_checkpoint_is_the_trained_model(tmp_path):
    from logitlab.engine import Engine

    out = tmp_path / "post"
    res = train(small_cfg(steps=2, norm_placement="post", out=out), texts=corpus(8))
    engine = Engine.load(str(out))
    assert engine.config.norm_placement == "post" and engine.config.architecture == "gpt2"
    ids = engine.tokenizer.encode("the cat sees")
    assert ids[0] == res.tokenizer.bos_token_id
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(engine.model(x, pos, logits_at="all"), res.model(x, pos, logits_at="all"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, field", [
    (["--data", "{missing}"], "data"),
    (["--data", "{empty}"], "data"),
    (["--data", "{text}", "--seq-len", "4096"], "seq_len"),
    (["--data", "{text}", "--preset", "huge"], "preset"),
    (["--data", "{text}", "--direction", "sideways"], "direction"),
    (["--data", "{text}", "--tokenizer", "bpe:ten"], "tokenizer"),
    (["--data", "{text}", "--tokenizer", "words"], "tokenizer"),
    (["--data", "{text}", "--out", "{other}"], "out"),
    (["--data", "{text}", "--resume"], "resume"),
    (["--data", "{text}", "--batch", "3", "--grad-accum", "2"], "batch"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, field):
    from logitlab.cli import main

    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "text.txt").write_text(" ".join(corpus(4)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    paths = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "text": tmp_path / "text.txt",
             "other": tmp_path / "other"}
    argv = ["train", "--out", str(tmp_path / "run"), "--preset", "micro", "--seq-len", "32", "--steps", "2",
            "--no-progress"]
    argv += [a.format(**paths) for a in extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: "), err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / "train_state").exists()


def test_python_m_logitlab_train_reports_bad_input_the_same_way(tmp_path):
    r = subprocess.run([sys.executable, "-m", "logitlab.train", "--data", str(tmp_path / "none"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: data: {tmp_path / 'none'} does not exist"]
