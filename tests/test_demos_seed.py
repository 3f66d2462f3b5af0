"""Every seed example as ``logitlab demo NAME``: each runs and draws (or refuses --plot with exit 2) on a tiny
model; the slides that need a trained model are checked on SmolLM2 (real_model). Also ``dist --plot``'s top-p
curve and the explainer's entropy."""

from __future__ import annotations

import io

import pytest
import torch

from logitlab import cli
from logitlab.demos import DEMOS, NO_PLOT, PENALTIES, SLIDE_TRANSLATION, run_demo
from logitlab.engine import Engine
from logitlab.explain import cumulative_curve, format_knob_report, format_trace, knob_report, plot_knob_report
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"

# small settings so that every demo runs in seconds on the tiny model
QUICK = {"repetition": dict(max_tokens=8), "epsilon": dict(max_tokens=4, samples=2), "beam": dict(max_tokens=4),
         "kvcache": dict(lengths=(16, 32), repeats=1), "contrastive": dict(max_tokens=6),
         "speculative": dict(max_tokens=8), "game": dict(budget=1, top_k=3, paragraph_k=3),
         "aot": dict(steps=2, batch=8)}


@pytest.fixture(scope="module")
def tiny_engine(real_tokenizer):
    model = tiny_model(seed=5, vocab_size=real_tokenizer.vocab_size, context_length=256)
    return Engine(model, real_tokenizer, name="tiny", max_batch=8, max_len=256)


@pytest.mark.parametrize("name", list(DEMOS))
def test_every_demo_runs_and_draws_or_refuses(name, tiny_engine, tmp_path, one_thread):
    png = tmp_path / f"{name}.png"
    out = io.StringIO()
    if name in NO_PLOT:
        with pytest.raises(ParamError, match="^plot: "):
            run_demo(name, engine=tiny_engine, out=out, plot=str(png), **QUICK.get(name, {}))
        assert not png.exists() and out.getvalue() == ""  # refused before any work
        run_demo(name, engine=tiny_engine, out=out, **QUICK.get(name, {}))
    else:
        run_demo(name, engine=tiny_engine, out=out, plot=str(png), **QUICK.get(name, {}))
        assert png.read_bytes()[:8] == PNG
        assert f"wrote {png}" in out.getvalue()
    assert out.getvalue().strip()


@pytest.fixture
def cli_uses_tiny(monkeypatch, tiny_engine):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **kw: tiny_engine))


def test_cli_demo_draws(cli_uses_tiny, tmp_path, capsys, one_thread):
    png = tmp_path / "eps.png"
    assert cli.main(["demo", "epsilon", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG and "epsilon = 0.01" in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [
    (["demo", "contrastive", "--plot", "@x.png"], "plot"),
    (["demo", "game", "--plot", "/no/such/dir/x.png"], "plot"),
    (["demo", "game", "--plot", "@x.png", "--model", "/no/such/model.gguf"], "model"),
])
def test_cli_demo_refusals_are_one_line_before_loading(argv, field, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **kw: pytest.fail("no model may load")))
    if field == "model":  # a real refusal from the loader itself: let it run
        monkeypatch.undo()
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}:"), err
    assert not list(tmp_path.iterdir())


# ---- the slides on the real model -------------------------------------------------------------------

@pytest.mark.real_model
def test_real_yes_no_is_restricted_and_honest(real_engine):
    out = io.StringIO()
    res = run_demo("yesno", engine=real_engine, out=out)
    for q, r in res.items():
        assert r["restricted"].strip().lower() in ("yes", "no"), q
        assert r["p_yes"] + r["p_no"] == pytest.approx(1.0, abs=1e-6)
        # greedy under the restriction picks the more probable answer
        assert (r["restricted"].strip().lower() == "yes") == (r["p_yes"] > r["p_no"])
    sky = res["Is the sky blue?"]
    text = out.getvalue()
    if sky["restricted"].strip().lower() == "yes":
        assert "As on the slide" in text and "NOT the slide's result" not in text
    else:  # SmolLM2-135M says no: the demo must say that this is not the slide's answer
        assert "NOT the slide's result" in text and "As on the slide" not in text


@pytest.mark.real_model
def test_real_leg_press_loop_is_broken_by_each_penalty(real_engine):
    res = run_demo("repetition", engine=real_engine, out=io.StringIO(), max_tokens=24, contrastive=False)
    loop = res["greedy, no penalty"]
    assert loop["leg_press"] >= 3 and loop["distinct_4grams"] < 0.4  # greedy keeps the loop going
    for name in PENALTIES:
        if name != "greedy, no penalty":
            r = res[name]
            assert r["leg_press"] <= 1 and r["distinct_4grams"] >= 0.7, (name, r)
    assert res["natural loop"]["distinct_4grams"] < 0.6  # and greedy loops on its own from the plain prompt


@pytest.mark.real_model
def test_real_fewshot_never_presents_a_wrong_translation_as_the_slides(real_engine):
    out = io.StringIO()
    res = run_demo("fewshot", engine=real_engine, out=out)
    assert [label for _, label, _ in res["sentiment"]] == ["Positive", "Negative", "Positive"]
    text = out.getvalue()
    assert res["translation_matches_slide"] == (res["translation"] == SLIDE_TRANSLATION.strip())
    if res["translation_matches_slide"]:
        assert "this is the slide's translation" in text
    else:
        assert "NOT the slide's result" in text and SLIDE_TRANSLATION.strip() in text


# ---- dist --plot: the curve top-p cut ----------------------------------------------------------------

@torch.inference_mode()
def test_dist_top_p_line_is_on_the_renormalised_after_top_k_curve(tiny_engine, tmp_path, one_thread):
    prompt, T, k, p = "Hello there", 3.0, 12, 0.5
    report = knob_report(tiny_engine, prompt, SamplingParams(temperature=T, top_k=k, top_p=p), top=30)
    curve, cut, label = cumulative_curve(report)
    # independently: softmax(logits / T), keep the top k, renormalise, accumulate
    ids = tiny_engine.tokenizer.encode(prompt)
    logits = tiny_engine.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0].double()
    q = torch.softmax(logits / T, -1).sort(descending=True).values[:k]
    cum = (q / q.sum()).cumsum(0)
    expected_cut = int((cum < p).sum()) + 1
    assert curve[:k] == pytest.approx(cum.tolist(), abs=1e-5)
    assert curve[k:] == pytest.approx([1.0] * (30 - k), abs=1e-6)
    assert cut == expected_cut == report["knobs"]["top_p"]["kept"] and "after top_k" in label
    # on the distribution before top-k the same p would keep many more tokens: the curves really differ
    assert report["knobs"]["top_p"]["kept_alone"] > 100 * cut
    assert [r["p_final"] > 0 for r in report["rows"]] == [i < cut for i in range(30)]
    text = format_knob_report(report)
    assert f"top_p=0.5 after top_k: keeps {cut} tokens" in text
    png = tmp_path / "d.png"
    plot_knob_report(report, str(png))
    assert png.read_bytes()[:8] == PNG


def test_dist_without_top_p_plots_the_plain_cumulative(tiny_engine, one_thread):
    report = knob_report(tiny_engine, "Hello", SamplingParams(temperature=1.0, top_k=5), top=8)
    curve, cut, label = cumulative_curve(report)
    assert cut is None and label == "cumulative mass"
    assert curve == [r["cumulative"] for r in report["rows"]]


def test_entropy_prints_as_zero_not_minus_zero(tiny_engine, one_thread):
    trace = [{"step": 0, "stages": [{"stage": "temperature", "kept": 1, "mass_removed": 0.0},
                                    {"token": 5, "rank": 1, "prob": 1.0, "entropy": -0.0}]},
             {"step": 1, "stages": [{"token": 5, "rank": 1, "prob": 1.0, "entropy": -1e-9}]}]
    text = format_trace(trace, tiny_engine.tokenizer)
    assert text.count("entropy=0.000") == 2 and "-0.000" not in text
    c = tiny_engine.generate("Hi", SamplingParams(max_tokens=2, temperature=0, explain=True))[0].choices[0]
    text = format_trace(c.trace, tiny_engine.tokenizer)
    assert "entropy=0.000" in text and "-0.000" not in text
    report = knob_report(tiny_engine, "Hi", SamplingParams(temperature=0), top=3)
    assert "entropy 0.000 nats" in format_knob_report(report)
