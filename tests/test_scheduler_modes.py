"""Decoding modes inside the one scheduler: a beam search is rows of the continuous batch, so the other
requests keep getting a token every step while it runs, and its result is the standalone search's."""

from __future__ import annotations

import pytest

from logitlab.decoding.beam import beam_search
from logitlab.decoding.modes import DriverOptions, beam_group
from logitlab.engine import Engine
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model


@pytest.fixture(scope="module")
def engine(real_tokenizer):
    return Engine(tiny_model(seed=5, vocab_size=real_tokenizer.vocab_size, context_length=256), real_tokenizer,
                  max_batch=8, max_len=256)


def test_plain_streams_get_a_token_every_step_while_a_beam_search_runs(engine):
    sched = engine.scheduler
    plain = [r for i in range(3) for r in engine.make_requests(
        f"stream {i}", SamplingParams(max_tokens=40, temperature=0.8, seed=i, ignore_eos=True))]
    sched.add(plain)
    sched.step()  # the plain requests are running
    ids = engine.encode_prompt("Once upon a time")
    params = SamplingParams(max_tokens=12, n=2)
    group = beam_group(engine, ids, params, DriverOptions(beam_width=4), None)
    sched.add(group.requests)
    steps = 0
    while not group.done:
        before = [len(r.output_ids) for r in plain]
        events = sched.step()
        steps += 1
        assert [len(r.output_ids) for r in plain] == [b + 1 for b in before]  # nobody paused
        assert {e.request.id for e in events if e.token_id is not None} == {r.id for r in plain}
    assert steps >= 2 and all(r.finished for r in group.requests)
    alone = beam_search(engine.model, ids, width=4, n=2, max_tokens=12,
                        eos_token_ids=sorted(engine.tokenizer.eos_token_ids), params=params)
    assert [r.output_ids for r in group.requests] == [h.token_ids for h in alone.hypotheses]
    while sched.has_work():
        sched.step()
    assert sched.cache.used_blocks() == 0  # beams' and streams' blocks all returned


def test_a_cancelled_beam_search_frees_its_rows_and_blocks(engine):
    sched = engine.scheduler
    group = beam_group(engine, engine.encode_prompt("Hello"), SamplingParams(max_tokens=50),
                       DriverOptions(beam_width=3), None)
    sched.add(group.requests)
    sched.step()
    assert sched.groups and sched.cache.used_blocks() > 0
    sched.abort(group.requests[0])
    events = sched.step()
    assert {e.finish_reason for e in events if e.request.beam is group} == {"abort"}
    assert not sched.groups and sched.cache.used_blocks() == 0


def test_a_beam_wider_than_the_batch_is_refused(engine):
    group = beam_group(engine, engine.encode_prompt("Hello"), SamplingParams(max_tokens=5),
                       DriverOptions(beam_width=9), None)
    with pytest.raises(ParamError, match="beam_width"):
        engine.scheduler.add(group.requests)


@pytest.mark.parametrize("driver", [
    {"beam_width": 4, "n": 2},
    {"speculative": {"draft": "early-exit:1", "num_tokens": 4}},
    {"contrastive": {"amateur": "early-exit:1", "alpha": 0.1}},
], ids=["beam", "speculative", "contrastive"])
def test_server_streams_keep_flowing_during_a_decoding_driver(real_tokenizer, driver):
    """Over HTTP: a stream started before a long beam search / speculative / contrastive request keeps
    receiving chunks while it runs (they used to run whole on the runner thread and freeze every stream).
    Beam search runs in the scheduler; the others step the scheduler between their rounds."""
    import threading
    import time

    import httpx
    from server_harness import tiny_server

    server = tiny_server(real_tokenizer)
    stamps: list[float] = []
    window: list[float] = []

    def stream():
        body = {"prompt": "tell me", "max_tokens": 240, "temperature": 0.8, "seed": 1, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 60
    while len(stamps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    window.append(time.monotonic())
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, **driver})
    window.append(time.monotonic())
    t.join(120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == driver.get("n", 1)
    during = [s for s in stamps if window[0] < s < window[1]]
    assert len(during) >= 5, (len(during), len(stamps))  # the stream advanced while the driver ran
    # ... and never paused for long: the longest wait (up to the driver's end, unless the stream had already
    # finished by then) is a small part of the driver's whole run (a frozen stream waits all of it)
    ends = during if stamps[-1] < window[1] else during + [window[1]]
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    assert max(gaps) < 0.5 * (window[1] - window[0]), (max(gaps), window[1] - window[0])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_contrastive_rows_batched_with_a_neighbour_equal_the_rows_alone(engine, temperature):
    """An early-exit amateur is the model's own first K layers, read from the same batched pass: contrastive
    rows batched beside an ordinary request give the tokens they give alone (``contrastive_generate``, a
    scheduler of their own), seeded or greedy (tests/test_contrastive.py checks them against a from-scratch
    loop)."""
    from logitlab.decoding.contrastive import contrastive_generate

    ids = engine.encode_prompt("The weather today is")
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=3, n=2, ignore_eos=True)
    loop = contrastive_generate(engine.model, "early-exit:1", ids, alpha=0.2, params=params,
                                eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    plain = engine.make_requests("a neighbour", SamplingParams(max_tokens=10, temperature=0.7, seed=1))
    engine.scheduler.add(plain)  # batched with an ordinary request
    got = engine.generate(ids, params, contrastive=(1, 0.2, 1.0))[0]
    assert [c.token_ids for c in got.choices] == loop.token_ids
    while engine.scheduler.has_work():
        engine.scheduler.step()
    assert plain[0].finished and engine.scheduler.cache.used_blocks() == 0


@pytest.mark.parametrize("draft", ["ngram", "early-exit:1"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_rows_in_the_scheduler_equal_the_speculative_loop(engine, draft, temperature):
    """Speculative decoding as scheduler rows (verification over the paged cache, commits through the one
    stop policy) gives the loop's tokens exactly, batched beside an ordinary request."""
    from logitlab.decoding.modes import spec_group
    from logitlab.decoding.speculative import speculative_generate

    ids = engine.encode_prompt("one two three one two three one two")
    params = SamplingParams(max_tokens=14, temperature=temperature, seed=7, n=2, ignore_eos=True)
    loop = speculative_generate(engine.model, draft, ids, params, num_speculative_tokens=3,
                                eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    sched = engine.scheduler
    plain = engine.make_requests("a neighbour", SamplingParams(max_tokens=12, temperature=0.7, seed=1))
    group = spec_group(engine, ids, params, DriverOptions(speculative=draft, num_speculative_tokens=3))
    sched.add(plain)
    sched.add(group.requests)
    while not all(r.finished for r in group.requests):
        events = sched.step()
        assert all(e.request.finish_reason != "error" for e in events)
    assert [r.output_ids for r in group.requests] == loop.token_ids
    assert group.stats.generated == sum(len(t) for t in loop.token_ids) and group.stats.rounds <= 14
    while sched.has_work():
        sched.step()
    assert plain[0].finished and sched.cache.used_blocks() == 0


def test_speculative_verification_rides_in_the_one_decode_forward(engine, monkeypatch):
    """Once running, a step of a plain stream beside a speculative request is one target forward: the drafted
    tokens are verified as one-token rows of the plain rows' decode forward, not in a call of their own; the
    neighbour's tokens are the ones it gets alone, and the speculative rows' are the standalone loop's."""
    from logitlab.decoding.modes import spec_group
    from logitlab.decoding.speculative import speculative_generate

    ids = engine.encode_prompt("one two three one two three one two")
    params = SamplingParams(max_tokens=12, temperature=0.0, seed=7, ignore_eos=True)
    loop = speculative_generate(engine.model, "ngram", ids, params, num_speculative_tokens=3,
                                eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    neighbour = SamplingParams(max_tokens=40, temperature=0.7, seed=1, ignore_eos=True)
    alone = engine.generate(engine.encode_prompt("a neighbour"), neighbour)[0].choices[0].token_ids
    sched = engine.scheduler
    plain = engine.make_requests("a neighbour", neighbour)
    sched.add(plain)
    sched.step()  # the neighbour is running
    group = spec_group(engine, ids, params, DriverOptions(speculative="ngram", num_speculative_tokens=3))
    sched.add(group.requests)
    sched.step()  # the speculative prompt is prefilled
    calls, model = [], engine.model
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    steps = 0
    while not group.requests[0].finished:
        sched.step()
        steps += 1
    # one forward a step, the neighbour's row and the verification rows (1 + g + 1, g drafted: 0 to 3)
    assert len(calls) == steps and any(shape[0] > 2 for shape in calls), calls
    assert all(shape[1] == 1 and shape[0] >= 2 for shape in calls), calls
    monkeypatch.undo()
    assert group.requests[0].output_ids == loop.token_ids[0]
    while sched.has_work():
        sched.step()
    assert plain[0].output_ids == alone and sched.cache.used_blocks() == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_choice_scores_options_as_rows_a_chunk_per_step(engine, temperature):
    """guided_choice inside the scheduler: the options' log-probabilities are classify's, scored a few per
    step (more options than the batch has rows), while a neighbour keeps decoding; the picks are the ones
    classify.rank_choices makes from them."""
    from logitlab.classify import continuation_logprobs, rank_choices
    from logitlab.decoding.modes import choice_group
    from logitlab.sampling.rng import derive_seed

    options = [f"option number {i}" for i in range(20)]  # 20 options > max_batch (8): 5 chunks of 4
    ids = engine.encode_prompt("Pick one:")
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=2, n=3)
    sched = engine.scheduler
    plain = engine.make_requests("a neighbour", SamplingParams(max_tokens=30, temperature=0.7, seed=1,
                                                               ignore_eos=True))
    sched.add(plain)
    sched.step()
    group = choice_group(engine, ids, params, DriverOptions(choice=options))
    sched.add(group.requests)
    steps = 0
    while not group.done:
        before = len(plain[0].output_ids)
        sched.step()
        steps += 1
        assert len(plain[0].output_ids) == before + 1  # the neighbour never waits for all the options
    sched.step()  # the step that hands out the picks
    assert steps >= 3 and all(r.finish_reason == "stop" for r in group.requests)
    ref = continuation_logprobs(engine, ids, options)
    for got, want in zip(group.per_token, ref, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    ranked = rank_choices(options, ref)
    order = sorted(range(len(options)), key=lambda i: -ranked.probs[i])
    for i, r in enumerate(group.requests):
        want = order[i] if temperature == 0 else rank_choices(
            options, ref, temperature, derive_seed(2, i) % (1 << 63)).index
        assert r.text == options[want]
    while sched.has_work():
        sched.step()
    assert sched.cache.used_blocks() == 0
