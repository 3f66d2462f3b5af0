"""`logitlab serve`: the OpenAI-compatible API through the official `openai` client against a live server
on 127.0.0.1 (a tiny random model over the real tokenizer; a few tests on the real model)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from server_harness import API_KEY, real_server, strict_server, tiny_server


@pytest.fixture(scope="module")
def srv(real_tokenizer):
    return tiny_server(real_tokenizer)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def strict(real_tokenizer):
    return strict_server(real_tokenizer)


def _complete(client, **kw):
    kw.setdefault("model", "tiny")
    return client.completions.create(**kw)


def _stream_text(client, **kw):
    kw.setdefault("model", "tiny")
    texts, ids, finish = {}, {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            ids.setdefault(ch.index, []).extend((ch.model_extra or {}).get("token_ids") or [])
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return texts, ids, finish


# ---- basics ----------------------------------------------------------------------------------------

def test_models_health_and_unknown_model(srv, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    with pytest.raises(openai.NotFoundError) as e:
        _complete(client, model="gpt-17", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok"


def test_completion_shape_usage_and_greedy_determinism(client):
    kw = dict(prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    a, b = _complete(client, **kw), _complete(client, **kw)
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    c = a.choices[0]
    assert c.finish_reason == "length" and c.text == b.choices[0].text
    assert a.usage.completion_tokens == 8 == len(c.model_extra["token_ids"])
    assert a.usage.total_tokens == a.usage.prompt_tokens + 8


def test_prompt_forms(srv, client):
    tok = srv.engine.tokenizer
    ids = tok.encode("The cat sat")
    kw = dict(max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    by_text = _complete(client, prompt="The cat sat", **kw).choices[0].text
    by_ids = _complete(client, prompt=ids, **kw).choices[0].text
    assert by_text == by_ids
    many = _complete(client, prompt=["The cat sat", "A dog"], **kw)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == by_text
    many_ids = _complete(client, prompt=[ids, tok.encode("A dog")], **kw)
    assert [c.text for c in many_ids.choices] == [c.text for c in many.choices]
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("A dog"))


def test_n_and_seed(client):
    kw = dict(prompt="Hello", max_tokens=8, temperature=1.0, seed=42, extra_body={"ignore_eos": True})
    a = _complete(client, n=3, **kw)
    b = _complete(client, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3  # the n samples differ
    other = _complete(client, n=1, **{**kw, "seed": 43})
    assert other.choices[0].text != a.choices[0].text
    # two prompts with n=2: indices prompt-major
    two = _complete(client, prompt=["a", "b"], n=2, max_tokens=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]


def test_logprobs_and_echo(srv, client):
    r = _complete(client, prompt="The sky is", max_tokens=4, temperature=0, logprobs=3,
                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the chosen token is the top one
    assert "".join(lp.tokens) == r.choices[0].text
    e = _complete(client, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    c = e.choices[0]
    assert c.text == "The sky is" + r.choices[0].text
    n_prompt = len(srv.engine.tokenizer.encode("The sky is"))
    assert len(c.logprobs.tokens) == n_prompt + 4
    assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert c.logprobs.text_offset[0] == 0


def test_stop_strings(client):
    full = _complete(client, prompt="Tell me", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    r = _complete(client, prompt="Tell me", max_tokens=24, temperature=0, stop=[stop, "@@@@"],
                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]
    single = _complete(client, prompt="Tell me", max_tokens=24, temperature=0, stop=stop,
                       extra_body={"ignore_eos": True})
    assert single.choices[0].text == r.choices[0].text


def test_logit_bias(srv, client):
    tok_id = srv.engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = _complete(client, prompt="I like", max_tokens=5, seed=3, logit_bias={str(tok_id): 100},
                  extra_body={"ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == [tok_id] * 5
    greedy = _complete(client, prompt="I like", max_tokens=1, temperature=0).choices[0]
    greedy = greedy.model_extra["token_ids"][0]
    r2 = _complete(client, prompt="I like", max_tokens=1, temperature=0, logit_bias={str(greedy): -100})
    assert r2.choices[0].model_extra["token_ids"][0] != greedy


def test_extensions_through_extra_body(srv, client):
    greedy = _complete(client, prompt="Zebra", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    top1 = _complete(client, prompt="Zebra", max_tokens=6, temperature=1.5, seed=9,
                     extra_body={"top_k": 1, "ignore_eos": True})
    assert top1.choices[0].text == greedy.choices[0].text
    allowed = srv.engine.tokenizer.encode(" yes no", add_special_tokens=False)
    r = _complete(client, prompt="Answer:", max_tokens=6, seed=1,
                  extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert set(r.choices[0].model_extra["token_ids"]) <= set(allowed)
    ids = greedy.choices[0].model_extra["token_ids"]
    st = _complete(client, prompt="Zebra", max_tokens=6, temperature=0,
                   extra_body={"stop_token_ids": [ids[2]], "ignore_eos": True})
    assert st.choices[0].model_extra["token_ids"] == ids[: ids.index(ids[2]) + 1]
    assert st.choices[0].finish_reason == "stop"
    ex = _complete(client, prompt="Zebra", max_tokens=3, temperature=0.8, seed=2,
                   extra_body={"explain": True, "min_p": 0.05, "typical_p": 0.95, "repetition_penalty": 1.2,
                               "min_tokens": 2, "epsilon": 1e-4, "eta": 0.0, "ignore_eos": True})
    trace = ex.choices[0].model_extra["trace"]
    assert len(trace) == 3 and all("stages" in step for step in trace)


def test_stream_equals_non_stream_and_ends_with_done(srv, client):
    kw = dict(prompt="Streaming test", max_tokens=12, temperature=0.9, seed=11, n=2,
              extra_body={"ignore_eos": True})
    full = _complete(client, **kw)
    texts, ids, finish = _stream_text(client, **kw)
    assert [texts[i] for i in range(2)] == [c.text for c in full.choices]
    assert [ids[i] for i in range(2)] == [c.model_extra["token_ids"] for c in full.choices]
    assert finish == {0: "length", 1: "length"}
    # raw SSE: data lines, usage chunk with include_usage, [DONE] last
    body = {"model": "tiny", "prompt": "Streaming test", "max_tokens": 3, "stream": True, "seed": 1,
            "stream_options": {"include_usage": True}, "logprobs": 2, "echo": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["text"] == "Streaming test"  # echo first
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    again = _complete(client, prompt="Streaming test", max_tokens=3, seed=1, echo=True)
    assert streamed == again.choices[0].text


def test_chat(srv, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, n=2, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and len(r.choices) == 2
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == r.choices[1].message.content  # greedy
    content = c.logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens // 2
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == c.message.content
    # the prompt is the chat template
    prompt = srv.engine.chat_prompt(msgs)
    assert r.usage.prompt_tokens == len(srv.engine.tokenizer.encode(prompt))
    # streamed chat == non-streamed chat, with include_usage
    kw = dict(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full and finish == "length" and usage.completion_tokens == 8
    # content parts, max_completion_tokens
    parts = [{"type": "text", "text": "Hi"}]
    r = client.chat.completions.create(model="tiny", max_completion_tokens=2,
                                       messages=[{"role": "user", "content": parts}])
    assert r.usage.completion_tokens <= 2


def test_tokenize_detokenize(srv):
    tok = srv.engine.tokenizer
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    d = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert d["prompt"] == tok.decode(r["tokens"])
    m = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert m["tokens"] == tok.encode(srv.engine.chat_prompt([{"role": "user", "content": "Hi"}]))
    bad = httpx.post(srv.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics(srv, client):
    _complete(client, prompt="count me", max_tokens=2)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("logitlab_requests_total", "logitlab_prompt_tokens_total",
                 "logitlab_generation_tokens_total", "logitlab_queue_depth", "logitlab_running_requests",
                 "logitlab_request_latency_seconds_bucket", "logitlab_time_to_first_token_seconds_count"):
        assert name in text
    assert 'logitlab_requests_total{route="/v1/completions",status="200"}' in text
    gen = next(ln for ln in text.splitlines() if ln.startswith("logitlab_generation_tokens_total "))
    assert int(gen.split()[1]) >= 2


# ---- the distribution endpoint (the playground's chart) ----------------------------------------------

def test_distribution_uses_the_pipeline(srv):
    eng = srv.engine
    body = {"prompt": "The capital of France is", "top": 50, "temperature": 0.7, "top_k": 5}
    d = httpx.post(srv.url + "/v1/distribution", json=body).json()
    rows = d["tokens"]
    assert len(rows) == 50 and d["cutoffs"]["top_k"]["kept"] == 5
    kept = [r for r in rows if r["p_after"] > 0]
    assert len(kept) == 5 == d["kept"] and sum(r["p_after"] for r in kept) == pytest.approx(1, abs=1e-4)
    assert [r["cumulative"] for r in rows] == sorted(r["cumulative"] for r in rows)
    logits = eng.next_token_logits("The capital of France is").float()
    p = torch.softmax(logits, -1)
    assert rows[0]["p_before"] == pytest.approx(float(p.max()), rel=1e-4)
    assert rows[0]["p_tempered"] == pytest.approx(float(torch.softmax(logits / 0.7, -1).max()), rel=1e-4)
    # the processed distribution is what the sampler draws from: top_k=5 + greedy agree on the top token
    g = httpx.post(srv.url + "/v1/completions", json={"prompt": body["prompt"], "max_tokens": 1,
                                                      "temperature": 0}).json()
    assert g["choices"][0]["token_ids"][0] == rows[0]["id"]
    hot = httpx.post(srv.url + "/v1/distribution", json={**body, "temperature": 1.5}).json()
    assert hot["tokens"][0]["p_after"] < rows[0]["p_after"]
    tp = httpx.post(srv.url + "/v1/distribution", json={"prompt": "x", "top_p": 0.5}).json()
    k = tp["cutoffs"]["top_p"]["kept"]
    cum = [r["cumulative"] for r in tp["tokens"]]
    assert k >= 1 and (k == 1 or cum[k - 2] < 0.5)


# ---- errors ------------------------------------------------------------------------------------------

def test_errors_400(srv, client):
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", max_tokens=100000)
    msg = e.value.body["message"]
    assert "100000" in msg and "256" in msg  # both lengths
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", logprobs=21)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt=[10**9])
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", extra_body={"top_k": "five"})
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", logit_bias={"abc": 1})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", n=1000)
    assert e.value.body["param"] == "n"
    for raw in (b"{not json", b"[1, 2]", b'{"prompt": NaN}', b"\xff\xfe", b'{"prompt": "\\ud800"}'):
        r = httpx.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_errors_404_405(srv):
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_401(strict):
    ok = openai.OpenAI(base_url=strict.url + "/v1", api_key=API_KEY, max_retries=0)
    assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=strict.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic " + API_KEY}, {"Authorization": "Bearer"}):
        r = httpx.post(strict.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(strict.url + "/metrics").status_code == 401
    assert httpx.get(strict.url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(strict.url + "/").status_code == 200


def test_body_too_large_413(strict):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(strict.url + "/v1/completions", json={"prompt": "x" * 5000}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(strict.url + "/v1/completions", content=chunks(), headers=auth)
    assert r.status_code == 413


def test_queue_full_429(strict):
    """With the engine loop held (a job on the runner thread), two requests fill the queue of 2; the
    third gets 429; once the loop runs again the queued two complete and new requests are accepted."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    _wait_idle(strict)
    gate = threading.Event()
    strict.runner.call(lambda: gate.wait(30))
    body = {"prompt": "queued", "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(httpx.post, strict.url + "/v1/completions", json=body, headers=auth, timeout=60)
                  for _ in range(2)]
        deadline = time.monotonic() + 10
        while strict.runner.queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(strict.url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        gate.set()
        assert [f.result().status_code for f in queued] == [200, 200]
    ok = httpx.post(strict.url + "/v1/completions", json=body, headers=auth)
    assert ok.status_code == 200


# ---- concurrency and cancellation ----------------------------------------------------------------------

def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while server.runner.running or server.runner.queued:
        assert time.monotonic() < deadline, "requests still in the scheduler"
        time.sleep(0.01)


def test_16_concurrent_streams_equal_their_sequential_results(srv, client):
    # top_k keeps the inverse-CDF draw away from float noise: batched and single-row matmuls round
    # differently (~1e-5 in the logits), which can flip a draw that lands on a boundary between two of
    # the tiny model's ~49k near-equal probabilities; a real model's peaked distribution rarely does.
    jobs = [dict(prompt=f"Story {i}:", max_tokens=10 + i % 5, temperature=0.5 + 0.05 * i, seed=100 + i,
                 top_p=0.9 if i % 2 else 1.0, extra_body={"ignore_eos": True, "top_k": 50})
            for i in range(16)]
    sequential = [_complete(client, **j).choices[0].text for j in jobs]
    start = threading.Barrier(16)

    def run(j):
        start.wait()
        texts, _, finish = _stream_text(client, **j)
        return texts[0], finish[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    assert [t for t, _ in results] == sequential
    assert all(f == "length" for _, f in results)
    _wait_idle(srv)


def test_disconnect_mid_stream_frees_the_slot(srv, client, monkeypatch):
    _wait_idle(srv)
    runner = srv.runner
    steps_at_abort = []
    real_abort = runner.abort

    def spy(requests):
        steps_at_abort.append(runner.steps)
        real_abort(requests)

    monkeypatch.setattr(runner, "abort", spy)
    body = {"model": "tiny", "prompt": "long", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert runner.running == 1
    deadline = time.monotonic() + 10
    while runner.running:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.005)
    assert steps_at_abort and runner.steps - steps_at_abort[0] <= 2  # freed at the next step
    metrics = httpx.get(srv.url + "/metrics").text
    assert "logitlab_aborted_requests_total 0" not in metrics
    # and the server keeps serving
    alive = _complete(client, prompt="still alive?", max_tokens=2)
    assert alive.choices[0].finish_reason in ("length", "stop")


def test_non_streaming_client_timeout_cancels(srv):
    _wait_idle(srv)
    body = {"prompt": "slow", "max_tokens": 240, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
    _wait_idle(srv, timeout=10)


# ---- the real model ----------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_chat_and_stream(real_engine):
    s = real_server(real_engine)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    name = real_engine.name
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    kw = dict(model=name, prompt="The three primary colors are", max_tokens=10, temperature=0.8, seed=4)
    full = c.completions.create(**kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == full and len(full) > 0
    d = httpx.post(s.url + "/v1/distribution", json={"prompt": "The capital of France is", "top": 5},
                   timeout=60).json()
    assert d["tokens"][0]["p_before"] > 0.2
    assert d["tokens"][0]["token"].strip() == "Paris"


@pytest.mark.real_model
def test_real_model_16_concurrent_streams_equal_sequential(real_engine):
    s = real_server(real_engine)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    jobs = [dict(model=real_engine.name, prompt=f"Write a sentence about the number {i}.", max_tokens=6,
                 temperature=0.7 + 0.03 * i, seed=i, extra_body={"ignore_eos": True}) for i in range(16)]
    sequential = [c.completions.create(**j).choices[0].text for j in jobs]
    start = threading.Barrier(16)

    def run(j):
        start.wait()
        return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **j) if ch.choices)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, jobs)) == sequential


def test_serve_command_flags():
    import argparse

    from logitlab.sampling import ParamError
    from logitlab.server.cli import _check, _is_loopback, add_serve_command

    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve"])
    assert (a.host, a.port, a.api_key, a.max_batch, a.max_queue) == ("127.0.0.1", 8000, None, 32, 256)
    a = p.parse_args(["serve", "--port", "0", "--max-batch", "4", "--max-body-bytes", "10", "--api-key", "k"])
    _check(a)
    with pytest.raises(ParamError):
        _check(p.parse_args(["serve", "--max-queue", "0"]))
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")


def test_app_without_lifespan_starts_its_loop_on_demand(srv):
    """An ASGI server that skips lifespan events (or httpx's ASGITransport) still gets served."""
    import asyncio

    from logitlab.engine import Engine
    from logitlab.server.app import create_app

    engine = Engine(srv.engine.model, srv.engine.tokenizer, name="tiny", max_batch=2, max_len=64)
    app = create_app(engine)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            health = (await c.get("/health")).status_code
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
            return health, r.status_code, r.json()

    try:
        health, status, body = asyncio.run(go())
    finally:
        app.state.runner.stop()
    assert health == 200 and status == 200 and len(body["choices"][0]["token_ids"]) == 2


def test_playground_is_served_with_no_outside_sources(srv):
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "logitlab playground" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/playground.js", "/static/playground.css", "/static/favicon.svg"):
        r = httpx.get(srv.url + asset)
        assert r.status_code == 200 and "content-security-policy" in r.headers
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    js = httpx.get(srv.url + "/static/playground.js").text
    assert "http://" not in js.replace("http://www.w3.org/2000/svg", "") and "https://" not in js
