"""Property/fuzz test of the HTTP API: hypothesis-generated JSON bodies (valid fields with wild values,
unknown fields, wrong types, raw bytes, odd paths and methods) never yield a 500, every error is an
OpenAI error object, and the server keeps serving. Bounded in examples and time."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import tiny_server

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


STATUSES: Counter = Counter()  # (path, status) -> count, to check that the run is not all 400s


@pytest.fixture(scope="module")
def http(real_tokenizer):
    s = tiny_server(real_tokenizer)
    with httpx.Client(base_url=s.url, timeout=60) as c:
        yield c
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
    assert s.runner.crashes == 0


# ---- value strategies ----------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

def mostly(valid, wild=None):
    """A valid value 9 times in 10, otherwise anything JSON (or ``wild``)."""
    wild = wild if wild is not None else json_values
    return st.integers(0, 9).flatmap(lambda k: wild if k == 0 else valid)


def num(lo, hi):
    return mostly(st.floats(lo, hi), st.one_of(json_values, st.sampled_from([-1e300, 1e300, -0.0, 5e-324])))


def integer(lo, hi):
    return mostly(st.integers(lo, hi), st.one_of(json_values, st.integers(-(2**70), 2**70)))


valid_ids = st.lists(st.integers(0, 49151), max_size=5)
token_ids = mostly(valid_ids, st.one_of(json_values, st.lists(st.integers(-5, 2**40), max_size=5)))
text_prompt = st.text(min_size=1, max_size=30)
prompt = mostly(st.one_of(text_prompt, st.lists(text_prompt, min_size=1, max_size=2),
                          valid_ids.filter(bool), st.lists(valid_ids.filter(bool), min_size=1, max_size=2)))
stop_text = st.text(min_size=1, max_size=4)
stop = mostly(st.one_of(stop_text, st.lists(stop_text, max_size=4)),
              st.one_of(json_values, st.lists(st.text(max_size=3), max_size=6)))
bias = st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3)

SAMPLING = {
    "max_tokens": integer(1, 6), "temperature": num(0, 2), "top_p": num(0.01, 1), "n": integer(1, 3),
    "stop": stop, "presence_penalty": num(-2, 2), "frequency_penalty": num(-2, 2),
    "seed": integer(0, 2**63 - 1), "logit_bias": mostly(bias), "user": mostly(st.text(max_size=8)),
    "top_k": integer(0, 100), "min_p": num(0, 1), "typical_p": num(0.01, 1), "epsilon": num(0, 0.5),
    "eta": num(0, 0.5), "repetition_penalty": num(0.5, 2), "min_tokens": integer(0, 2),
    "stop_token_ids": token_ids, "ignore_eos": mostly(st.booleans()),
    "allowed_token_ids": mostly(valid_ids.filter(bool)), "banned_token_ids": token_ids,
    "explain": mostly(st.booleans()), "logprobs_mode": mostly(st.sampled_from(["raw", "processed"])),
    "penalize_prompt": mostly(st.booleans()), "temperature_frequency_penalty": num(0, 2),
    "temperature_presence_penalty": num(0, 2), "model": mostly(st.just("tiny"), st.sampled_from(["x", None])),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
}
COMPLETION = {**SAMPLING, "prompt": prompt, "logprobs": integer(0, 5), "echo": mostly(st.booleans()),
              "stream": mostly(st.booleans())}
content = mostly(st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=8)}), min_size=1, max_size=2)))
message = mostly(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "developer"]),
                    st.sampled_from(["tool", "x", ""])), "content": content}))
CHAT = {**SAMPLING, "messages": mostly(st.lists(message, min_size=1, max_size=3)),
        "logprobs": mostly(st.booleans()), "top_logprobs": integer(0, 5),
        "max_completion_tokens": integer(1, 6), "stream": mostly(st.booleans())}
DIST = {"prompt": mostly(st.one_of(text_prompt, valid_ids.filter(bool))), "generated": token_ids,
        "top": integer(1, 200), **{k: SAMPLING[k] for k in (
            "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids",
            "banned_token_ids")}}
TOKENIZE = {"prompt": mostly(st.text(max_size=30)), "add_special_tokens": mostly(st.booleans()),
            "messages": mostly(st.lists(message, min_size=1, max_size=2)), "tokens": token_ids}


def bodies(fields: dict, required: tuple[str, ...], short: bool = False):
    """Dicts with a random subset of the known fields (the required ones usually present), sometimes an
    unknown field too. ``short``: cap the length (chat defaults to the rest of the context)."""
    names = sorted(fields)

    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
        keys = set(chosen) | {r for r in required if draw(st.integers(0, 9)) > 0}
        body = {k: draw(fields[k]) for k in sorted(keys)}
        unbounded = "max_tokens" not in body and "max_completion_tokens" not in body
        if short and unbounded:
            body["max_tokens"] = draw(st.integers(1, 4))
        if draw(st.integers(0, 9)) == 0:
            body[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
        return body

    return build()


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln for ln in r.text.split("\n") if ln]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            obj = json.loads(ln[len("data: "):])
            assert "error" not in obj, obj
    else:
        r.json()


def post(http, path, body):
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    STATUSES[path, r.status_code] += 1
    check(r)
    return r


@settings(max_examples=80, **SETTINGS)
@given(body=bodies(COMPLETION, ("prompt",)))
def test_fuzz_completions(http, body):
    post(http, "/v1/completions", body)


@settings(max_examples=50, **SETTINGS)
@given(body=bodies(CHAT, ("messages",), short=True))
def test_fuzz_chat(http, body):
    post(http, "/v1/chat/completions", body)


@settings(max_examples=40, **SETTINGS)
@given(body=bodies(DIST, ("prompt",)))
def test_fuzz_distribution(http, body):
    post(http, "/v1/distribution", body)


@settings(max_examples=30, **SETTINGS)
@given(body=bodies(TOKENIZE, ()), path=st.sampled_from(["/tokenize", "/detokenize"]))
def test_fuzz_tokenize(http, body, path):
    post(http, path, body)


@settings(max_examples=40, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                             "/v1/distribution", "/v1/models", "/health", "/metrics", "/nope",
                             "/v1/models/x"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       ctype=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_fuzz_raw_requests(http, raw, path, method, ctype):
    r = http.request(method, path, content=raw, headers={"content-type": ctype} if ctype else {})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()


def test_fuzz_reached_both_outcomes(http):
    """The generated bodies are a mix: some are served (200), some are refused (400)."""
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/distribution"):
        if not any(p == path for p, _ in STATUSES):
            pytest.skip("run together with the fuzz tests above")
        assert STATUSES[path, 200] >= 3 and STATUSES[path, 400] >= 3, dict(STATUSES)
