"""The playground end to end in headless Chromium (Debian's `chromium`, driven by Playwright): the page
loads, moving the temperature slider changes the plotted distribution, Generate streams coloured tokens,
clicking a token shows its alternatives and trace, Step reproduces Generate token by token; a screenshot
is kept under artifacts/. Nothing may be fetched from anywhere but the server itself.

Then the views of the whole pipeline (issue 12): their routes against hand computations (/v1/pipeline stage
by stage, with a constraint, and its seeded draw against /v1/completions; /v1/beam_tree), and each view in
the browser -- Pipeline (stage table, constraint), Tree (branches, rewind, beam search), Logit lens,
Sequence -- with one screenshot each, checked to be a real picture of the view."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from server_harness import tiny_server

CHROMIUM = os.environ.get("LOGITLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def page(real_tokenizer):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium)")
    srv = tiny_server(real_tokenizer)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        pg.requests_seen = []
        pg.console_errors = []
        pg.on("request", lambda r: pg.requests_seen.append(r.url))
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        pg.goto(srv.url + "/")
        pg.srv = srv
        yield pg
        browser.close()


def _signature(page) -> str:
    return page.locator("#chart").get_attribute("data-signature") or ""


def test_page_loads_and_slider_changes_the_distribution(page):
    page.wait_for_selector("#chart svg rect.bar-after")
    assert page.locator("#chart svg rect.bar-after").count() == 50
    assert page.locator("#model").inner_text() == "tiny"
    before = _signature(page)
    assert before
    page.locator("#k_temperature").fill("0.3")
    page.wait_for_function("s => document.querySelector('#chart').dataset.signature !== s", arg=before)
    after = _signature(page)
    top_before, top_after = float(before.split(",")[0]), float(after.split(",")[0])
    assert top_after > top_before  # colder: the top token gets more mass
    # top-k draws its cut-off and zeroes the bars behind it
    page.locator("#k_top_k").fill("5")
    page.wait_for_selector("#chart svg line.cut-top_k", state="attached")
    page.wait_for_function("() => document.querySelector('#chart').dataset.signature.split(',')"
                           ".filter(x => parseFloat(x) > 0).length === 5")
    page.locator("#k_top_k").fill("0")
    page.locator("#k_temperature").fill("1")
    page.wait_for_function("() => !document.querySelector('#chart svg line.cut-top_k')")


def test_generate_click_token_and_step(page):
    page.locator("#seed").fill("1234")
    page.locator("#k_max_tokens").fill("12")
    page.locator("#ignore_eos").check()
    page.locator("#k_top_k").fill("40")  # so the trace has a truncation stage to show
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelectorAll('#output .tok').length === 12 && "
                           "!document.querySelector('#generate').disabled")
    spans = page.locator("#output .tok")
    generated = [spans.nth(i).get_attribute("data-id") for i in range(12)]
    assert all(t.isdigit() for t in generated)
    assert page.locator("#output").inner_text().startswith("The capital of France is")
    # tokens are coloured by probability
    assert spans.first.evaluate("e => e.style.background").startswith("rgb")
    # clicking a token shows its alternatives, its trace and the distribution at that step
    spans.nth(3).click()
    page.wait_for_selector("#details:not(.hidden)")
    assert page.locator("#alts tr.alt").count() >= 5
    assert page.locator("#trace table tr").count() >= 2  # header + the top_k stage
    assert "rank" in page.locator("#trace .trace-summary").inner_text()
    page.wait_for_function("() => document.querySelector('#chart-title').textContent.includes('step 4')")
    page.screenshot(path=str(_artifact("playground.png")), full_page=True)
    # Step samples one token at a time: the same tokens Generate made with this seed
    page.locator("#clear").click()
    for k in range(1, 4):
        page.locator("#step").click()
        page.wait_for_function(f"() => document.querySelectorAll('#output .tok').length === {k} && "
                               "!document.querySelector('#step').disabled")
    stepped = [page.locator("#output .tok").nth(i).get_attribute("data-id") for i in range(3)]
    assert stepped == generated[:3]
    page.screenshot(path=str(_artifact("playground-step.png")), full_page=True)


def test_no_external_requests_and_no_console_errors(page):
    origin = page.srv.url
    assert page.requests_seen and all(u.startswith(origin) for u in page.requests_seen), page.requests_seen
    assert not page.console_errors, page.console_errors


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


# ---- the views of the whole pipeline (issue 12): HTTP routes -------------------------------------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv(real_tokenizer):
    return tiny_server(real_tokenizer)


def _post(srv, path, **body):
    return httpx.post(srv.url + path, json=body, timeout=60)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), -1)


def _hand_stages(logits: torch.Tensor, bias: dict[int, float], T: float, k: int, min_p: float) -> list:
    """(stage, p) after each stage, the pipeline's formulas written out: bias, temperature, top-k, min-p."""
    l = logits.double().clone()
    out = [("model", _softmax(l))]
    for tid, b in bias.items():
        l[tid] += b
    out.append(("logit_bias", _softmax(l)))
    l = l / T
    out.append(("temperature", _softmax(l)))
    kth = l.topk(k).values[-1]
    l = l.masked_fill(l < kth, float("-inf"))
    out.append(("top_k", _softmax(l)))
    p = _softmax(l)
    l = l.masked_fill(p < min_p * p.max(), float("-inf"))
    out.append(("min_p", _softmax(l)))
    return out


def test_pipeline_route_stage_by_stage(srv):
    tok = srv.engine.tokenizer
    ids = tok.encode(PROMPT)
    gen = tok.encode(" Paris", add_special_tokens=False)
    logits = srv.engine.next_token_logits(ids + gen)
    lowest = int(logits.argmin())  # a bias large enough to bring the least likely token into the top 5
    bias, T, k, min_p = {lowest: float(logits.max() - logits.min()) + 1.0}, 0.5, 5, 0.2
    r = _post(srv, "/v1/pipeline", prompt=ids, generated=gen, temperature=T, top_k=k, min_p=min_p,
              logit_bias={str(t): b for t, b in bias.items()}, stage_top=30, top=10)
    assert r.status_code == 200, r.text
    d = r.json()
    hand = _hand_stages(logits, bias, T, k, min_p)
    assert [s["stage"] for s in d["stages"]] == [name for name, _ in hand]
    for s, (_, p), prev in zip(d["stages"], hand, [None] + [p for _, p in hand[:-1]], strict=True):
        assert s["kept"] == int((p > 0).sum())
        removed = 0.0 if prev is None else float(prev[(prev > 0) & (p == 0)].sum())
        assert s["mass_removed"] == pytest.approx(removed, abs=1e-5)
    rows = d["stage_rows"]
    # the 30 most probable by model p, then the final distribution's tokens not among them: the biased one
    assert len(rows) == 31 and rows[-1]["id"] == lowest
    for row in rows:
        assert row["p"] == pytest.approx([float(p[row["id"]]) for _, p in hand], abs=1e-5)
        gone = [name for name, p in hand if p[row["id"]] == 0]
        assert row["removed_by"] == (gone[0] if gone else None)
        assert row["token"] == tok.decode([row["id"]])
    assert {r["removed_by"] for r in rows} >= {"top_k", "min_p", None}
    # the chart's rows are those of /v1/distribution
    plain = _post(srv, "/v1/distribution", prompt=ids, generated=gen, temperature=T, top_k=k, min_p=min_p,
                  logit_bias={str(t): b for t, b in bias.items()}, top=10).json()
    assert [x["id"] for x in d["tokens"]] == [x["id"] for x in plain["tokens"]]
    assert [x["p_after"] for x in d["tokens"]] == pytest.approx([x["p_after"] for x in plain["tokens"]], abs=1e-7)


@pytest.fixture(scope="module")
def vocab_texts(srv):
    tok = srv.engine.tokenizer
    return [tok.decode([i]) for i in range(srv.engine.vocab_size)]


@pytest.mark.parametrize("field, value, allowed", [
    ("guided_regex", "[0-9]+", lambda t: re.fullmatch("[0-9]+", t)),
    ("guided_choice", ["Paris", " Lyon"], lambda t: t and ("Paris".startswith(t) or " Lyon".startswith(t))),
    # an object, compact: "{", then "}" or the start of a key (the vocabulary has no longer such prefixes)
    ("guided_json", '{"type": "object"}', lambda t: re.fullmatch(r'\{(\}|"[^"\\]*)?', t)),
])
def test_pipeline_route_constraint_allows_exactly_the_grammars_tokens(srv, vocab_texts, field, value, allowed):
    r = _post(srv, "/v1/pipeline", prompt=PROMPT, stage_top=10, **{field: value})
    assert r.status_code == 200, r.text
    d = r.json()
    want = {i for i, t in enumerate(vocab_texts) if allowed(t)}
    c = d["constraint"]
    assert c["allowed"] == len(want) and {t["id"] for t in c["top_allowed"]} == want
    assert d["stages"][1]["stage"] == "constraint" and d["stages"][1]["kept"] == len(want)
    for row in d["stage_rows"]:
        assert row["allowed"] == (row["id"] in want)
        assert (row["removed_by"] == "constraint") == (row["id"] not in want)
        assert (row["p"][-1] > 0) == (row["id"] in want)  # no other stage is on
    assert all((x["p_after"] > 0) == x["allowed"] for x in d["tokens"])


KNOB_SETS = [{}, {"temperature": 0.8, "top_k": 40, "presence_penalty": 1.0},
             {"top_p": 0.9, "xtc_probability": 0.5, "xtc_threshold": 0.01}, {"guided_regex": "[0-9]{2} apples"}]


@pytest.mark.parametrize("knobs", KNOB_SETS)
def test_pipeline_route_seed_draws_what_completions_draws(srv, knobs):
    """A path stepped one token at a time with `seed` is the path /v1/completions samples with that seed."""
    ids = srv.engine.tokenizer.encode(PROMPT)
    path = []
    for _ in range(5):
        d = _post(srv, "/v1/pipeline", prompt=ids, generated=path, seed=99, top=1, stage_top=0, **knobs).json()
        path.append(d["sampled"]["id"])
        logits = srv.engine.next_token_logits(ids + path[:-1])
        assert d["sampled"]["logprob"] == pytest.approx(float(torch.log_softmax(logits, -1)[path[-1]]), abs=1e-4)
    r = _post(srv, "/v1/completions", prompt=ids, max_tokens=5, seed=99, ignore_eos=True, **knobs).json()
    assert path == r["choices"][0]["token_ids"]


def test_beam_tree_route(srv):
    tok = srv.engine.tokenizer
    ids = tok.encode("My favorite thing about fall is")
    r = _post(srv, "/v1/beam_tree", prompt="My favorite thing about fall is", width=3, max_tokens=4, length_penalty=1.0)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["prompt_tokens"] == len(ids) and len(d["steps"]) == 4 and len(d["hypotheses"]) == 3

    def logprob(path):  # the model's own, token by token (one forward per prefix)
        return sum(float(torch.log_softmax(srv.engine.next_token_logits(ids + path[:i]).double(), -1)[t])
                   for i, t in enumerate(path))

    prev = [{"ids": [], "logprob": 0.0}]
    for s in d["steps"]:
        assert len(s["beams"]) == 3
        for c in s["candidates"]:
            parent = prev[c["parent"]]
            assert c["ids"][:-1] == parent["ids"]
            assert c["logprob"] == pytest.approx(parent["logprob"] + math.log(c["token_prob"]), abs=1e-6)
        for b in s["beams"]:
            assert b["ids"][:-1] == prev[b["parent"]]["ids"]
            assert b["logprob"] == pytest.approx(logprob(b["ids"]), abs=1e-3)
        # the beam keeps the best extensions among the candidates
        best = sorted((c["logprob"] for c in s["candidates"]), reverse=True)[:3]
        assert sorted((b["logprob"] for b in s["beams"]), reverse=True) == pytest.approx(best, abs=1e-9)
        prev = s["beams"]
    scores = [h["score"] for h in d["hypotheses"]]
    assert scores == sorted(scores, reverse=True)
    for h in d["hypotheses"]:
        assert h["score"] == pytest.approx(h["logprob"] / len(h["ids"]))
        assert h["text"] == tok.decode(h["ids"])
    used = {t for s in d["steps"] for c in s["candidates"] for t in c["ids"]}
    assert used <= {int(k) for k in d["token_texts"]}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/pipeline", {"prompt": "hi", "guided_regex": "[0-9"}, "guided_regex"),
    ("/v1/pipeline", {"prompt": "hi", "guided_regex": ""}, "guided_regex"),
    ("/v1/pipeline", {"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ("/v1/pipeline", {"prompt": "hi", "guided_choice": ["a", ""]}, "guided_choice"),
    ("/v1/pipeline", {"prompt": "hi", "guided_json": "/etc/passwd"}, "guided_json"),
    ("/v1/pipeline", {"prompt": "hi", "guided_json": "[1, 2]"}, "guided_json"),
    ("/v1/pipeline", {"prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/pipeline", {"prompt": "hi", "guided_regex": "[0-9]+", "generated": [64]}, "generated"),
    ("/v1/pipeline", {"prompt": "hi", "generated": [-1]}, "generated"),
    ("/v1/pipeline", {"prompt": "hi", "stage_top": 101}, "stage_top"),
    ("/v1/pipeline", {"prompt": "hi", "seed": "1"}, "seed"),
    ("/v1/pipeline", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/pipeline", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/pipeline", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/pipeline", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/pipeline", {"prompt": ""}, "prompt"),
    ("/v1/beam_tree", {"prompt": "hi", "width": 0}, "width"),
    ("/v1/beam_tree", {"prompt": "hi", "width": 9}, "width"),
    ("/v1/beam_tree", {"prompt": "hi", "max_tokens": 25}, "max_tokens"),
    ("/v1/beam_tree", {"prompt": "hi", "length_penalty": 1e9}, "length_penalty"),
    ("/v1/beam_tree", {"prompt": list(range(250)), "max_tokens": 10}, "max_tokens"),
    ("/v1/beam_tree", {"prompt": [10**6]}, "prompt"),
])
def test_view_routes_reject_bad_input(srv, path, body, param):
    r = _post(srv, path, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


# ---- the views in the browser, one screenshot each ---------------------------------------------------------

DEFAULT_KNOBS = {"temperature": "1", "top_k": "0", "top_p": "1", "min_p": "0", "frequency_penalty": "0",
                 "presence_penalty": "0", "repetition_penalty": "1"}


def _reset(page):
    """Back to the prompt alone: no output, no tree, default knobs, no constraint, the Pipeline tab."""
    page.locator("#tab-pipeline").click()
    page.locator("#clear").click()
    page.locator("#tab-tree").click()
    page.locator("#tree-clear").click()
    page.locator("#tab-pipeline").click()
    page.select_option("#c_kind", "")
    for name, v in DEFAULT_KNOBS.items():
        page.locator(f"#k_{name}").fill(v)
    page.wait_for_function("() => document.querySelector('#chart-title').textContent === 'Next token' && "
                           "document.querySelectorAll('#stage-table th.stage-col').length === 1")


def _check_png(path: Path, element, min_height: int = 300) -> None:
    """A real picture of the view: a PNG of the element's size with many colours (not a blank panel)."""
    from PIL import Image

    box = element.bounding_box()
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert abs(w - round(box["width"])) <= 2 and abs(h - round(box["height"])) <= 2
        assert w >= 600 and h >= min_height
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200
    assert path.stat().st_size > 20_000


def _data_ps(page, selector: str) -> list[float]:
    return page.eval_on_selector_all(selector, "els => els.map(e => parseFloat(e.dataset.p))")


def test_pipeline_view_stage_table_and_constraint(page, tmp_path):
    _reset(page)
    srv = page.srv
    logits = srv.engine.next_token_logits(srv.engine.tokenizer.encode(PROMPT))
    page.locator("#k_temperature").fill("0.5")
    page.locator("#k_top_k").fill("5")
    page.wait_for_function("() => document.querySelectorAll('#stage-table tr.srow.removed-top_k').length === 15")
    heads = page.eval_on_selector_all("#stage-table th.stage-col", "els => els.map(e => e.dataset.stage)")
    assert heads == ["model", "temperature", "top_k"]
    assert page.locator("#stage-table tr.srow").count() == 20
    # the top-k column against the hand computation: the 5 most probable at T = 0.5, renormalised
    top5 = torch.softmax(logits.double() / 0.5, -1).topk(5)
    want = (top5.values / top5.values.sum()).tolist()
    got = _data_ps(page, "#stage-table tr.srow.kept td.pc[data-stage=top_k]")
    assert got == pytest.approx(want, abs=1e-5)
    kept_ids = page.eval_on_selector_all("#stage-table tr.srow.kept", "els => els.map(e => +e.dataset.id)")
    assert kept_ids == top5.indices.tolist()
    assert page.locator("#stage-table tr.srow.removed td.pc.cut[data-stage=top_k]").count() == 15
    panel = page.locator("#panel-pipeline")
    panel.screenshot(path=str(tmp_path / "pipeline.png"))
    _check_png(tmp_path / "pipeline.png", panel)
    # a constraint: its column, the allowed tokens highlighted, the others crossed out by it
    page.select_option("#c_kind", "regex")
    page.locator("#c_value").fill("[0-9]+")
    page.wait_for_function("() => document.querySelectorAll('#allowed-chips .chip').length === 10")
    chips = page.eval_on_selector_all("#allowed-chips .chip", "els => els.map(e => e.textContent)")
    assert sorted(chips) == [str(i) for i in range(10)]
    assert "allows 10 of" in page.locator("#constraint-info").inner_text()
    heads = page.eval_on_selector_all("#stage-table th.stage-col", "els => els.map(e => e.dataset.stage)")
    assert heads == ["model", "constraint", "temperature", "top_k"]
    # the table adds the final distribution's tokens: top-k keeps the 5 most probable digits
    digits = torch.tensor([srv.engine.tokenizer.token_to_id(str(i)) for i in range(10)])
    best = digits[logits[digits].topk(5).indices].tolist()
    allowed = page.eval_on_selector_all("#stage-table tr.srow.allowed", "els => els.map(e => +e.dataset.id)")
    assert allowed == best
    assert page.locator("#stage-table tr.srow.removed-constraint").count() == 20
    assert page.locator("#chart svg text.xlabel.allowed").count() == 10
    panel.screenshot(path=str(tmp_path / "pipeline-constraint.png"))
    _check_png(tmp_path / "pipeline-constraint.png", panel)
    page.select_option("#c_kind", "")
    # a row of the stage table branches there: a new branch of the tree, the Tree tab shown
    page.wait_for_function("() => document.querySelectorAll('#stage-table th.stage-col').length === 3")
    second = page.locator("#stage-table tr.srow").nth(1)
    tid = second.get_attribute("data-id")
    second.click()
    page.wait_for_selector("#panel-tree:not(.hidden) #branches tr.branch-row")
    assert page.locator("#branches tr.branch-row").first.get_attribute("data-ids") == tid


def test_tree_view_branches_and_beam(page, tmp_path):
    _reset(page)
    srv = page.srv
    ids = srv.engine.tokenizer.encode(PROMPT)
    page.locator("#tab-tree").click()
    page.locator("#seed").fill("77")
    page.locator("#ignore_eos").check()
    page.locator("#tree-sample5").click()
    page.wait_for_function("() => document.querySelectorAll('#branches tr.branch-row').length === 1 && "
                           "!document.querySelector('#tree-sample5').disabled")
    row = page.locator("#branches tr.branch-row").first
    b1 = [int(x) for x in row.get_attribute("data-ids").split(",")]
    # branch 1 samples with the seed box's seed: the tokens Generate makes with it
    gen = _post(srv, "/v1/completions", prompt=ids, max_tokens=5, seed=77, ignore_eos=True).json()
    assert b1 == gen["choices"][0]["token_ids"]
    # its cumulative logprob: the model's log p of each token after its prefix, summed
    want = sum(float(torch.log_softmax(srv.engine.next_token_logits(ids + b1[:i]).double(), -1)[t])
               for i, t in enumerate(b1))
    assert float(row.get_attribute("data-logprob")) == pytest.approx(want, abs=1e-3)
    assert page.locator("#tree g.node").count() == 6  # the prompt + 5 tokens
    # rewind to step 2 and branch there with another token
    page.locator("#tree g.node[data-depth='2']").click()
    page.wait_for_function("() => document.querySelector('#chart-title').textContent.startsWith('Tree: step 2')")
    page.wait_for_selector("#tree-alts tr.alt-row.chosen")
    alt = page.locator("#tree-alts tr.alt-row:not(.chosen)").first
    alt_id = int(alt.get_attribute("data-id"))
    alt.click()
    page.wait_for_function("() => document.querySelectorAll('#branches tr.branch-row').length === 2")
    b2 = [int(x) for x in page.locator("#branches tr.branch-row").nth(1).get_attribute("data-ids").split(",")]
    assert b2 == [b1[0], alt_id]
    page.locator("#tree-sample1").click()
    page.wait_for_function("() => document.querySelector('#branches tr.branch-row:nth-child(3)')"
                           ".dataset.ids.split(',').length === 3 && !document.querySelector('#tree-sample1').disabled")
    assert page.locator("#tree g.node").count() == 6 + 2  # the new branch shares step 1 with the first
    assert page.locator("#tree g.node.selected").get_attribute("data-depth") == "3"
    # the beam walk-through as a tree: width 2, 3 steps
    page.locator("#beam-width").fill("2")
    page.locator("#beam-tokens").fill("3")
    page.locator("#beam-run").click()
    page.wait_for_selector("#beam-hyps tr.hyp-row")
    assert page.locator("#beam-hyps tr.hyp-row").count() == 2
    for depth in (1, 2, 3):  # each step keeps `width` hypotheses alive (no end of sequence here)
        assert page.locator(f"#beam-tree g.bnode.in-beam[data-depth='{depth}']").count() == 2
        assert page.locator(f"#beam-tree g.bnode[data-depth='{depth}']").count() == (2 if depth == 1 else 4)
    best = page.locator("#beam-hyps tr.hyp-row").first
    best_ids = [int(x) for x in best.get_attribute("data-ids").split(",")]
    want = sum(float(torch.log_softmax(srv.engine.next_token_logits(ids + best_ids[:i]).double(), -1)[t])
               for i, t in enumerate(best_ids))
    assert float(best.get_attribute("data-logprob")) == pytest.approx(want, abs=1e-3)
    assert page.locator(f"#beam-tree g.bnode.best[data-path='{','.join(map(str, best_ids))}']").count() == 1
    panel = page.locator("#panel-tree")
    panel.screenshot(path=str(tmp_path / "tree.png"))
    _check_png(tmp_path / "tree.png", panel)
    page.locator("#ignore_eos").uncheck()


def test_logit_lens_view(page, tmp_path):
    _reset(page)
    srv = page.srv
    page.locator("#tab-lens").click()
    layers = srv.engine.config.num_layers
    page.wait_for_function(f"() => document.querySelectorAll('#lens-table tr.lens-row').length === {layers + 1}")
    assert page.locator("#lens-table td.lens-cell").count() == 5 * (layers + 1)
    # the last row is the model's own prediction for the next token
    p = torch.softmax(srv.engine.next_token_logits(srv.engine.tokenizer.encode(PROMPT)).double(), -1)
    final = page.locator(f"#lens-table tr.lens-row[data-layer='{layers}']")
    assert int(final.get_attribute("data-top1")) == int(p.argmax())
    assert _data_ps(page, f"#lens-table tr.lens-row[data-layer='{layers}'] td.lens-cell") == pytest.approx(
        p.topk(5).values.tolist(), abs=1e-5)
    page.locator("#lens-top").fill("3")
    page.locator("#lens-top").dispatch_event("change")
    page.wait_for_function(f"() => document.querySelectorAll('#lens-table td.lens-cell').length === {3 * (layers + 1)}")
    panel = page.locator("#panel-lens")
    panel.screenshot(path=str(tmp_path / "lens.png"))
    _check_png(tmp_path / "lens.png", panel, min_height=150)  # 4 rows: the tiny model has 3 blocks


def test_sequence_view(page, tmp_path):
    _reset(page)
    srv = page.srv
    text = "The capital of France is Paris. It is known for the Eiffel Tower, built in 1889."
    tok = srv.engine.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    page.locator("#tab-sequence").click()
    page.locator("#seq-text").fill(text)
    page.locator("#seq-run").click()
    page.wait_for_function(f"() => document.querySelectorAll('#seq-out .seq-tok').length === {len(ids)}")
    assert page.locator("#seq-out").inner_text() == text
    spans = page.eval_on_selector_all("#seq-out .seq-tok", "els => els.map(e => [+e.dataset.id, +e.dataset.rank, "
                                      "e.className, getComputedStyle(e).backgroundColor])")
    assert [s[0] for s in spans] == ids
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seq = [start] + ids
    for i, (_, rank, cls, _bg) in enumerate(spans):  # GLTR ranks against one forward per prefix
        p = srv.engine.next_token_logits(seq[: i + 1]).double().softmax(-1)
        pt = p[seq[i + 1]]  # rank = 1 + the tokens more likely, up to rounding (another forward, near-ties)
        assert int((p > pt * (1 + 1e-4)).sum()) + 1 <= rank <= int((p >= pt * (1 - 1e-4)).sum())
        bucket = next((b for b in (1, 10, 100, 1000) if rank <= b), "rest")
        assert f"bucket-{bucket}" in cls.split()
    perplexity = float(page.locator("#seq-stats").get_attribute("data-perplexity"))
    assert perplexity == pytest.approx(srv.engine.score(text).perplexity, rel=1e-4)
    assert f"perplexity {perplexity:.2f}" in page.locator("#seq-stats").inner_text()
    assert page.locator("#seq-chart svg rect.surprisal-bar").count() == len(ids)
    assert page.locator("#seq-chart svg polyline.entropy-line").count() == 1
    # colour by surprisal instead: same tokens, other colours
    page.locator("#seq-mode-surprisal").check()
    page.wait_for_function("() => document.querySelector('#seq-legend .grad') !== null")
    after = page.eval_on_selector_all("#seq-out .seq-tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert after != [s[3] for s in spans]
    panel = page.locator("#panel-sequence")
    panel.screenshot(path=str(tmp_path / "sequence.png"))
    _check_png(tmp_path / "sequence.png", panel)
    page.locator("#seq-mode-rank").check()


def test_views_made_no_external_requests_and_no_console_errors(page):
    origin = page.srv.url
    assert all(u.startswith(origin) for u in page.requests_seen), page.requests_seen
    assert not page.console_errors, page.console_errors
