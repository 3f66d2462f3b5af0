"""Scoring without a context (every token, the first after the start token) and the summarization game
(``logitlab.game``: batched cross-entropies, the prefix search, ``logitlab game``, ``POST /v1/game``), on a
tiny random model over the real tokenizer: exactness does not need a trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from logitlab import cli
from logitlab.engine import Engine, start_token
from logitlab.game import play, search_prefix
from logitlab.sampling import ParamError

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PARAGRAPH = "The Eiffel Tower is a lattice tower in Paris, named after the engineer Gustave Eiffel."


@pytest.fixture(scope="module")
def engine(real_tokenizer):
    model = tiny_model(seed=3, vocab_size=real_tokenizer.vocab_size, context_length=256)
    return Engine(model, real_tokenizer, name="tiny", max_batch=2, max_len=256)


@torch.inference_mode()
def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:i+1]) at every position, from one plain forward (no engine code)."""
    logits = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), logits_at="all")[0]
    return torch.log_softmax(logits.float(), -1)


# ---- Engine.score without a context -------------------------------------------------------------------

def test_score_without_context_scores_every_token_after_bos(engine, real_tokenizer):
    text = "Paris is the capital and most populous city of France."
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    bos = real_tokenizer.bos_token_id
    assert bos == 1 and real_tokenizer.decode([bos]) == "<|im_start|>"
    res = engine.score(text)
    assert res.tokens == ids and len(res.token_logprobs) == len(ids)
    assert res.conditioned_on == {"kind": "bos", "token": "<|im_start|>", "id": 1}
    lp = forward_logprobs(engine.model, [bos, *ids])
    assert res.token_logprobs[0] == pytest.approx(float(lp[0, ids[0]]), abs=1e-4)
    manual = [float(lp[i, t]) for i, t in enumerate(ids)]
    assert res.token_logprobs == pytest.approx(manual, abs=1e-4)


def test_without_bos_the_start_token_is_eos(engine, real_tokenizer, monkeypatch):
    monkeypatch.setattr(real_tokenizer, "bos_token_id", None)
    eos = real_tokenizer.eos_token_id
    assert start_token(real_tokenizer) == {"kind": "eos", "token": real_tokenizer.decode([eos]), "id": eos}
    ids = real_tokenizer.encode("Hello world", add_special_tokens=False)
    res = engine.score("Hello world")
    assert res.conditioned_on["kind"] == "eos" and len(res.token_logprobs) == len(ids)
    assert res.token_logprobs[0] == pytest.approx(float(forward_logprobs(engine.model, [eos, *ids])[0, ids[0]]),
                                                  abs=1e-4)
    monkeypatch.setattr(real_tokenizer, "eos_token_id", None)
    res = engine.score("Hello world")  # nothing to start from: the first token is context, not scored
    assert res.conditioned_on["kind"] == "first_token" and len(res.token_logprobs) == len(ids) - 1


def test_score_with_token_id_context(engine, real_tokenizer):
    ctx = [1, *real_tokenizer.encode("Paris", add_special_tokens=False)]
    text = " is big"
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    res = engine.score(text, context=ctx)
    lp = forward_logprobs(engine.model, ctx + ids)
    assert res.token_logprobs == pytest.approx([float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(ids)],
                                               abs=1e-4)
    assert res.conditioned_on == {"kind": "context", "num_tokens": len(ctx)}
    with pytest.raises(ParamError, match="^context: "):
        engine.score(text, context=[10**9])


def test_cli_score_json_says_what_it_conditioned_on(engine, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_engine", lambda a, **kw: engine)
    assert cli.main(["score", "Hello world", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conditioned_on"] == {"kind": "bos", "token": "<|im_start|>", "id": 1}
    assert out["num_tokens"] == len(out["token_logprobs"]) == 2
    assert cli.main(["score", "Hello world"]) == 0
    assert "first token conditioned on '<|im_start|>' (BOS, id 1)" in capsys.readouterr().out


# ---- the game -----------------------------------------------------------------------------------------

def test_game_cross_entropies_are_sums_of_engine_scores(engine, real_tokenizer):
    prefixes = ["Eiffel Tower", "A recipe for banana bread:", "Paris"]
    res = play(engine, PARAGRAPH, prefixes)
    base = engine.score(PARAGRAPH)
    assert res.conditioned_on == base.conditioned_on
    assert res.baseline.cross_entropy == pytest.approx(-sum(base.token_logprobs), abs=1e-3)
    for t, s in zip(prefixes, res.scores, strict=True):
        ref = engine.score(PARAGRAPH, context=[1, *real_tokenizer.encode(t, add_special_tokens=False)])
        assert s.prefix == t and s.cross_entropy == pytest.approx(-sum(ref.token_logprobs), abs=1e-3)
        assert s.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-4)
        assert res.gain(s) == pytest.approx(res.baseline.cross_entropy - s.cross_entropy)
    assert res.forwards == 1  # the empty prefix and all three in one batched forward


class CountingModel:
    """The engine's model, counting forwards and the rows each one ran."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, []

    def __call__(self, tokens, *args, **kw):
        self.calls += 1
        self.rows.append(tokens.shape[0])
        return self.model(tokens, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("method,width", [("greedy", 1), ("beam", 3)])
def test_search_is_batched_and_never_worse_than_no_prefix(engine, method, width, monkeypatch):
    counter = CountingModel(engine.model)
    monkeypatch.setattr(engine, "model", counter)
    res = search_prefix(engine, PARAGRAPH, budget=3, search=method, width=width, top_k=6, paragraph_k=8)
    assert res.best.cross_entropy <= res.baseline.cross_entropy
    assert len(res.best.prefix_ids) <= 3 and [s["length"] for s in res.steps] == [1, 2, 3]
    # each step scored every candidate of every kept prefix, in a few forwards (not one per candidate)
    assert res.scored == sum(s["candidates"] for s in res.steps) >= 3 * 8
    assert counter.calls == res.forwards <= 1 + 3 * 2 and max(counter.rows) > 1
    assert sum(counter.rows) == res.scored + 1  # +1: the empty prefix
    monkeypatch.undo()
    # the reported CE is a re-score of the reported prefix
    ref = engine.score(PARAGRAPH, context=[1, *res.best.prefix_ids])
    assert res.best.cross_entropy == pytest.approx(-sum(ref.token_logprobs), abs=1e-3)
    # and each step's best is at least as good as greedy's would allow: steps only keep what they scored
    for st in res.steps:
        r = engine.score(PARAGRAPH, context=[1, *st["best_prefix_ids"]])
        assert st["cross_entropy"] == pytest.approx(-sum(r.token_logprobs), abs=1e-3)


def test_beam_finds_no_worse_than_greedy_at_the_first_step(engine):
    g = search_prefix(engine, PARAGRAPH, budget=1, search="greedy", top_k=6, paragraph_k=8)
    b = search_prefix(engine, PARAGRAPH, budget=1, search="beam", width=4, top_k=6, paragraph_k=8)
    assert b.steps[0]["cross_entropy"] == pytest.approx(g.steps[0]["cross_entropy"], abs=1e-6)


def test_search_candidates_exclude_special_tokens(engine, real_tokenizer):
    res = search_prefix(engine, PARAGRAPH, budget=2, search="beam", width=2, top_k=20, paragraph_k=4)
    special = set(real_tokenizer.special_token_ids) | set(real_tokenizer.eos_token_ids)
    assert not special & {t for st in res.steps for t in st["best_prefix_ids"]}


@pytest.mark.parametrize("kw,field", [
    (dict(budget=0), "budget"), (dict(budget=99), "budget"), (dict(search="random"), "search"),
    (dict(width=0), "width"), (dict(top_k=0, paragraph_k=0), "top_k"), (dict(top_k=-1), "top_k"),
])
def test_search_bad_settings(engine, kw, field):
    with pytest.raises(ParamError, match=f"^{field}: "):
        search_prefix(engine, PARAGRAPH, **kw)


def test_paragraph_too_long_or_empty(engine):
    with pytest.raises(ParamError, match="^paragraph: "):
        play(engine, "word " * 400, ["x"])
    with pytest.raises(ParamError, match="^paragraph: "):
        play(engine, "   ", ["x"])


# ---- the command line -----------------------------------------------------------------------------------

def test_cli_game_json_and_colours(engine, monkeypatch, capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(PARAGRAPH + "\n", encoding="utf-8")
    monkeypatch.setattr(cli, "_engine", lambda a, **kw: engine)
    assert cli.main(["game", str(f), "--prefix", "Eiffel", "--search", "greedy", "--budget", "2",
                     "--top-k", "4", "--paragraph-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = play(engine, PARAGRAPH, ["Eiffel"])
    assert out["baseline"]["cross_entropy"] == pytest.approx(ref.baseline.cross_entropy, abs=1e-4)
    assert out["results"][0]["cross_entropy"] == pytest.approx(ref.scores[0].cross_entropy, abs=1e-4)
    assert out["search"]["best"]["cross_entropy"] <= out["baseline"]["cross_entropy"]
    assert out["conditioned_on"]["kind"] == "bos"
    assert cli.main(["game", str(f), "--prefix", "Eiffel", "--color", "always"]) == 0
    text = capsys.readouterr().out
    assert "\x1b[" in text and "prefix 'Eiffel'" in text and "nats saved vs no prefix" in text
    assert cli.main(["game", str(f), "--color", "never"]) == 0  # capsys is not a terminal: never, and auto
    text = capsys.readouterr().out
    assert "\x1b[" not in text and "most surprising" in text
    assert cli.main(["game", str(f)]) == 0
    assert "\x1b[" not in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [
    (["game", "/no/such/file.txt"], "paragraph_file"),
    (["game", "@empty"], "paragraph_file"),
    (["game", "@p", "--search", "greedy", "--budget", "0"], "budget"),
    (["game", "@p", "--search", "beam", "--width", "100"], "width"),
    (["game", "@p", "--search", "sideways"], "arguments"),
    (["game", "@p", "--prefix", ""], "prefix"),
])
def test_cli_game_bad_input_is_one_line(argv, field, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "p.txt").write_text(PARAGRAPH)
    monkeypatch.setattr(cli, "_engine", lambda a, **kw: pytest.fail("no model may load for bad input"))
    argv = [str(tmp_path / (a[1:] + ".txt")) if a.startswith("@") else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}:"), err


# ---- the server route -----------------------------------------------------------------------------------

def test_server_game_route(engine):
    from fastapi.testclient import TestClient

    from logitlab.server.app import create_app

    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/game", json={"paragraph": PARAGRAPH, "prefixes": ["Eiffel", "Paris"],
                                          "search": "greedy", "budget": 1, "top_k": 3, "paragraph_k": 3})
        assert r.status_code == 200, r.text
        d = r.json()
        ref = play(engine, PARAGRAPH, ["Eiffel", "Paris"])
        assert [x["prefix"] for x in d["results"]] == ["Eiffel", "Paris"]
        assert [x["cross_entropy"] for x in d["results"]] == pytest.approx([s.cross_entropy for s in ref.scores],
                                                                           abs=1e-4)
        assert d["baseline"]["cross_entropy"] == pytest.approx(ref.baseline.cross_entropy, abs=1e-4)
        assert d["search"]["best"]["cross_entropy"] <= d["baseline"]["cross_entropy"] + 1e-9
        assert d["model"] == "tiny" and len(d["paragraph_tokens"]) == len(d["baseline"]["token_logprobs"])
        assert all(math.isfinite(x) for x in d["baseline"]["token_logprobs"])
        for body, param in (({"paragraph": ""}, "paragraph"), ({"paragraph": "x", "budget": 99}, "budget"),
                            ({"paragraph": "x", "search": "up"}, "search"), ({"paragraph": "x", "bogus": 1}, "bogus")):
            r = client.post("/v1/game", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
