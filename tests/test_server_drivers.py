"""Issue 4 through the HTTP API: structured output (streamed through the scheduler), beam search,
contrastive and speculative decoding and guided_choice (run whole on the runner thread), and their
errors, via the official `openai` client against the tiny-model server."""

from __future__ import annotations

import json
import re

import openai
import pytest
from server_harness import tiny_server


@pytest.fixture(scope="module")
def srv(real_tokenizer):
    return tiny_server(real_tokenizer)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, extra, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("prompt", "Once upon a time")
    return client.completions.create(extra_body=extra, **kw)


def _chat(client, extra, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": "Give me some JSON."}])
    return client.chat.completions.create(extra_body=extra, **kw)


def _bad(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    return e.value.body


# ---- constraints alone: through the scheduler --------------------------------------------------------

def test_guided_regex_matches_for_several_seeds(client):
    pattern = r"(yes|no), [a-z]{1,6}\."
    for seed in range(4):
        r = _complete(client, {"guided_regex": pattern}, max_tokens=24, temperature=1.0, seed=seed, n=2)
        assert r.model_extra["constraint"] == "regex"
        for c in r.choices:
            assert c.finish_reason == "stop", c
            assert re.fullmatch(pattern, c.text), c.text


def test_guided_regex_streams(client):
    pattern = r"[0-9]{3}-[0-9]{2}"
    text = ""
    for chunk in client.completions.create(model="tiny", prompt="Call", max_tokens=16, temperature=0.8, seed=3,
                                           stream=True, extra_body={"guided_regex": pattern}):
        for ch in chunk.choices:
            text += ch.text
    assert re.fullmatch(pattern, text), text


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["ok", "kind"], "additionalProperties": False}


@pytest.mark.parametrize("as_text", [False, True])
def test_guided_json_validates(client, as_text):
    schema = json.dumps(SCHEMA) if as_text else SCHEMA
    for seed in range(3):
        r = _complete(client, {"guided_json": schema}, max_tokens=40, temperature=1.0, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        obj = json.loads(c.text)
        assert set(obj) == {"ok", "kind"} and isinstance(obj["ok"], bool) and obj["kind"] in ("cat", "dog")


def test_chat_response_format(client):
    r = _chat(client, {}, max_tokens=40, temperature=0.7, seed=1,
              response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    obj = json.loads(r.choices[0].message.content)
    assert obj["kind"] in ("cat", "dog")
    assert r.model_extra["constraint"] == "json_schema"
    r = _chat(client, {}, max_tokens=5, temperature=0, response_format={"type": "text"})
    assert r.choices[0].message.content is not None and "constraint" not in (r.model_extra or {})


def test_chat_json_object_parses(client):
    parsed = 0
    for seed in range(6):
        r = _chat(client, {}, max_tokens=48, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        c = r.choices[0]
        assert c.message.content.startswith("{"), c.message.content
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
            parsed += 1
    assert parsed >= 1


def test_guided_grammar(client):
    grammar = 'root ::= "a" ("b" | "c")+ "."'
    r = _complete(client, {"guided_grammar": grammar}, max_tokens=20, temperature=1.0, seed=0)
    c = r.choices[0]
    assert re.fullmatch(r"a[bc]+\.?", c.text) and (c.finish_reason != "stop" or c.text.endswith("."))


# ---- drivers outside the scheduler ---------------------------------------------------------------

def test_guided_choice(client):
    choices = ["yes", "no", "maybe later"]
    r = _complete(client, {"guided_choice": choices}, max_tokens=8, temperature=0)
    assert r.choices[0].text in choices
    ch = r.model_extra["choice"]
    assert ch["choices"] == choices and abs(sum(ch["probs"]) - 1) < 1e-4
    assert r.choices[0].text == choices[max(range(3), key=lambda i: ch["probs"][i])]
    r = _chat(client, {"guided_choice": choices}, temperature=1.0, seed=5, n=3)
    assert len(r.choices) == 3 and all(c.message.content in choices for c in r.choices)


def test_beam_search_two_best(client):
    r = _complete(client, {"beam_width": 3, "length_penalty": 1.0, "ignore_eos": True}, max_tokens=6, n=2,
                  temperature=0)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    beam = r.model_extra["beam"]
    assert beam["width"] == 3 and len(beam["scores"]) == 2 and beam["scores"][0] >= beam["scores"][1]
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
    # streamed: the same result replayed as SSE chunks, the extra fields in a last chunk without choices
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, n=2,
                                            temperature=0, stream=True,
                                            extra_body={"beam_width": 3, "ignore_eos": True}))
    texts = {ch.index: ch.text for chunk in chunks for ch in chunk.choices}
    assert texts == {c.index: c.text for c in r.choices}
    assert chunks[-1].choices == [] and chunks[-1].model_extra["beam"]["scores"] == pytest.approx(beam["scores"])


def test_beam_chat(client):
    r = _chat(client, {"beam_width": 2}, max_tokens=5, temperature=0, n=2)
    assert len(r.choices) == 2 and len(r.model_extra["beam"]["scores"]) == 2
    chunks = list(_chat(client, {"beam_width": 2}, max_tokens=5, temperature=0, stream=True))
    text = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
    assert text == _chat(client, {"beam_width": 2}, max_tokens=5, temperature=0).choices[0].message.content


def test_speculative_ngram_greedy_equals_plain(client):
    prompt = "the cat sat on the mat and the cat sat on the"
    kw = dict(prompt=prompt, max_tokens=12, temperature=0)
    plain = _complete(client, {"ignore_eos": True}, **kw).choices[0].text
    r = _complete(client, {"ignore_eos": True, "speculative": {"draft": "ngram", "num_tokens": 3}}, **kw)
    assert r.choices[0].text == plain
    s = r.model_extra["speculative"]
    assert s["draft"] == "ngram" and s["num_speculative_tokens"] == 3 and {"drafted", "accepted"} <= set(s)


def test_contrastive_early_exit(client):
    r = _complete(client, {"contrastive": {"amateur": "early-exit:1", "alpha": 0.2}}, max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    assert r.model_extra["contrastive"] == {"amateur": "early-exit:1", "alpha": 0.2}


# ---- errors: 400 with an OpenAI error object naming the param ------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"beam_width": 0}, "beam_width"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "/etc/passwd"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"contrastive": {"amateur": "gpt2"}}, "contrastive"),
    ({"contrastive": {"amateur": "early-exit:1", "alpha": 0}}, "contrastive"),
    ({"speculative": {"draft": "/tmp/model"}}, "speculative"),
    ({"speculative": {"draft": "ngram", "num_tokens": 0}}, "speculative"),
    ({"speculative": {"draft": "ngram"}, "guided_regex": "a+"}, "speculative"),
    ({"beam_width": 2, "speculative": {"draft": "ngram"}}, "speculative"),
    ({"beam_width": 2, "n": 3}, "n"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"guided_regex": "a+", "guided_grammar": 'root ::= "a"'}, "guided_grammar"),
    ({"beam_width": "3"}, "beam_width"),
])
def test_completion_errors(client, extra, param):
    body = _bad(lambda: _complete(client, extra, max_tokens=4))
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error" and body["message"]


@pytest.mark.parametrize("rf,param", [
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "response_format"),
])
def test_chat_response_format_errors(client, rf, param):
    body = _bad(lambda: _chat(client, {}, max_tokens=4, response_format=rf))
    assert body["param"] == param, body


def test_chat_guided_json_and_response_format_conflict(client):
    body = _bad(lambda: _chat(client, {"guided_json": SCHEMA}, max_tokens=4, response_format={"type": "json_object"}))
    assert body["param"] == "guided_json"


def test_completions_have_no_response_format(client):
    body = _bad(lambda: _complete(client, {"response_format": {"type": "json_object"}}, max_tokens=4))
    assert body["param"] == "response_format" and body["code"] == "unknown_parameter"


def test_beam_with_constraint_and_driver_logprobs(client):
    r = _complete(client, {"beam_width": 3, "guided_regex": r"(red|green|blue)!"}, max_tokens=8, n=2, temperature=0)
    assert all(re.fullmatch(r"(red|green|blue)!", c.text) for c in r.choices), [c.text for c in r.choices]
    assert r.model_extra["constraint"] == "regex" and len(r.model_extra["beam"]["scores"]) == 2
    r = _complete(client, {"speculative": {"draft": "ngram"}, "ignore_eos": True}, max_tokens=5, temperature=0,
                  logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(x <= 0 for x in lp.token_logprobs)
    r = _chat(client, {"beam_width": 2}, max_tokens=4, temperature=0, logprobs=True)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
