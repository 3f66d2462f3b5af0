"""The playground end to end in headless Chromium (Debian's `chromium`, driven by Playwright): the page
loads, moving the temperature slider changes the plotted distribution, Generate streams coloured tokens,
clicking a token shows its alternatives and trace, Step reproduces Generate token by token; a screenshot
is kept under artifacts/. Nothing may be fetched from anywhere but the server itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
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
