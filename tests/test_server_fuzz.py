"""Property/fuzz test of the HTTP API: hypothesis-generated JSON bodies for every route (valid fields with wild
values, unknown fields, wrong types, raw bytes, odd paths and methods) never yield a 5xx, every error is an
OpenAI error object, and the server keeps serving. Bounded in examples and time (~40 s on 2 cores).

The bodies come from each route's request model (its pydantic JSON schema), so every field of every route is
generated, a new field included, without being listed here; the fields whose values matter (lengths,
counts, constraints, decoding drivers) get curated strategies that are valid 9 times in 10.
``test_every_route_is_fuzzed`` fails when a route is added without a request model here."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import tiny_server

from logitlab.server import schemas

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


STATUSES: Counter = Counter()  # (path, status) -> count, to check that the run is not all 400s


@pytest.fixture(scope="module")
def server(real_tokenizer):
    return tiny_server(real_tokenizer)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.runner.crashes == 0


# ---- the routes and their request models ---------------------------------------------------------------

def body_models() -> dict[str, type]:
    """POST route -> the pydantic model its body is read with."""
    from logitlab.server import game_route, views

    models = {"/v1/completions": schemas.CompletionRequest, "/v1/chat/completions": schemas.ChatRequest,
              "/tokenize": schemas.TokenizeRequest, "/detokenize": schemas.DetokenizeRequest,
              "/v1/distribution": schemas.DistributionRequest, "/v1/pipeline": views.PipelineRequest,
              "/v1/beam_tree": views.BeamTreeRequest, "/v1/logit_lens": views.LensRequest,
              "/v1/sequence_view": views.SequenceRequest, "/v1/game": game_route.GameRequest}
    return models


GET_ROUTES = {"/v1/models", "/v1/models/{name:path}", "/health", "/metrics", "/tokenizer_info", "/"}


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
                          valid_ids.filter(bool), st.lists(valid_ids.filter(bool), min_size=1, max_size=2),
                          st.sampled_from(["😀中文", "\U0001f99c", "é" * 5])))
stop_text = st.text(min_size=1, max_size=4)
stop = mostly(st.one_of(stop_text, st.lists(stop_text, max_size=4)),
              st.one_of(json_values, st.lists(st.text(max_size=3), max_size=6)))
bias = st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3)
content = mostly(st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=8)}), min_size=1, max_size=2)))
message = mostly(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "developer"]),
                    st.sampled_from(["tool", "x", ""])), "content": content}))

# constraints and drivers: valid, empty, malformed, Lark and EBNF
regexes = st.sampled_from(["", "[ab]{1,3}", "yes|no", "(", "\\d{2}", "😀+", "a*"])
grammars = st.sampled_from(["", "  ", 'root ::= "a" | "b"', 'root ::= "x" [0-9]', "root ::= ",
                            'start: "a" | "b"', 'start: WORD\nWORD: /[a-c]+/', 'start: "x"+\n%ignore " "',
                            "start: undefined", "start: /a/i", 'start: x{"a"}', "rule: nothing", "::=", "start:"])
json_schemas = st.sampled_from([{}, {"type": "object"}, {"type": "integer"}, '{"type": "string", "maxLength": 3}',
                                "", "{", "[1]", {"type": "bogus"}, {"enum": ["a", "b"]}])
choices = mostly(st.lists(st.sampled_from(["yes", "no", "", "maybe", "😀"]), max_size=3))
response_formats = st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                    {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
                                    {"type": "json_schema", "json_schema": {}}, {"type": "json_schema"},
                                    {"type": "xml"}])
stream_options = st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                     "continuous_usage_stats": st.booleans()})

SAMPLING = {
    "max_tokens": integer(0, 6), "temperature": num(0, 2), "top_p": num(0.01, 1), "n": integer(1, 3),
    "stop": stop, "presence_penalty": num(-2, 2), "frequency_penalty": num(-2, 2),
    "seed": integer(0, 2**63 - 1), "logit_bias": mostly(bias), "user": mostly(st.text(max_size=8)),
    "top_k": integer(0, 100), "min_p": num(0, 1), "typical_p": num(0.01, 1), "epsilon": num(0, 0.5),
    "eta": num(0, 0.5), "repetition_penalty": num(0.5, 2), "min_tokens": integer(0, 2),
    "stop_token_ids": token_ids, "ignore_eos": mostly(st.booleans()),
    "allowed_token_ids": mostly(valid_ids.filter(bool)), "banned_token_ids": token_ids,
    "explain": mostly(st.booleans()), "logprobs_mode": mostly(st.sampled_from(["raw", "processed"])),
    "penalize_prompt": mostly(st.booleans()), "temperature_frequency_penalty": num(0, 2),
    "temperature_presence_penalty": num(0, 2), "model": mostly(st.just("tiny"), st.sampled_from(["x", None])),
    "stream": mostly(st.booleans()), "stream_options": mostly(stream_options),
    "prompt_logprobs": integer(0, 5),
    "top_n_sigma": num(0, 3), "xtc_probability": num(0, 1), "xtc_threshold": num(0, 0.5),
    "dry_multiplier": num(0, 2), "dry_base": num(1, 3), "dry_allowed_length": integer(0, 4),
    "dry_penalty_last_n": integer(-1, 8), "mirostat": integer(0, 2), "mirostat_tau": num(0, 10),
    "mirostat_eta": num(0, 1), "dynatemp_range": num(0, 2), "dynatemp_exponent": num(0, 2),
    "no_repeat_ngram_size": integer(0, 3),
    "dry_sequence_breakers": mostly(st.lists(st.sampled_from(["\n", ":", "", "ab", "😀"]), max_size=3)),
    # decoding drivers, kept small: each runs whole on the runner thread
    "beam_width": integer(1, 3), "length_penalty": num(-2, 2),
    "contrastive": mostly(st.fixed_dictionaries({"amateur": st.sampled_from(["early-exit:1", "early-exit:9", "x"])},
                                                optional={"alpha": st.floats(0, 1)})),
    "speculative": mostly(st.fixed_dictionaries({"draft": st.sampled_from(["ngram", "ngram:2", "early-exit:1",
                                                                           "bogus"])},
                                                optional={"num_tokens": st.integers(0, 5)})),
    "guided_json": mostly(json_schemas), "guided_regex": mostly(regexes), "guided_grammar": mostly(grammars),
    "guided_choice": choices,
}
COMPLETION = {**SAMPLING, "prompt": prompt, "logprobs": integer(0, 5), "echo": mostly(st.booleans())}
CHAT = {**SAMPLING, "messages": mostly(st.lists(message, min_size=1, max_size=3)),
        "logprobs": mostly(st.booleans()), "top_logprobs": integer(0, 5), "max_completion_tokens": integer(1, 6),
        "response_format": mostly(response_formats)}
OTHERS = {  # the other routes' fields whose ranges or cost matter; the rest come from their schemas
    "prompt": mostly(st.one_of(text_prompt, valid_ids.filter(bool))), "generated": token_ids,
    "top": integer(1, 200), "stage_top": integer(0, 100), "text": mostly(st.one_of(text_prompt, valid_ids)),
    "tokens": token_ids, "messages": mostly(st.lists(message, min_size=1, max_size=2)),
    "width": integer(1, 3), "max_tokens": integer(1, 4), "length_penalty": num(-4, 4),
    "paragraph": mostly(st.text(min_size=1, max_size=60)), "prefixes": mostly(st.lists(st.text(max_size=12),
                                                                                       max_size=3)),
    "search": mostly(st.sampled_from(["greedy", "beam", "x"])), "budget": integer(1, 2),
    "top_k": integer(0, 4), "paragraph_k": integer(0, 4), "model": mostly(st.just("tiny")),
    "guided_regex": mostly(regexes), "guided_choice": choices, "guided_json": mostly(json_schemas),
    **{k: SAMPLING[k] for k in ("temperature", "top_p", "min_p", "typical_p", "epsilon", "eta", "presence_penalty",
                                "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids",
                                "banned_token_ids", "seed", *schemas.NEW_SAMPLERS)},
}


def from_schema(schema: dict, defs: dict):
    """Values of a pydantic JSON schema (the subset pydantic writes: $ref, anyOf, const, enum, objects,
    arrays and scalars with bounds), small ones."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -3), schema.get("maximum", 64))
    if kind == "number":
        return st.floats(schema.get("minimum", -3.0), schema.get("maximum", 3.0), allow_nan=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 20), 20))
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" and "properties" in schema:
        props = schema["properties"]
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(props[k], defs) for k in required},
                                     optional={k: from_schema(v, defs) for k, v in props.items() if k not in required})
    return json_values


def bodies(model: type, overrides: dict, short: bool = False):
    """Dicts with a random subset of ``model``'s fields (the required ones usually present), a value from
    ``overrides`` or else from the field's JSON schema (an anything-JSON value 1 time in 10), sometimes an
    unknown field too. ``short``: cap the length (chat defaults to the rest of the context)."""
    schema = model.model_json_schema(by_alias=True)
    defs, props = schema.get("$defs", {}), schema["properties"]
    fields = {k: overrides[k] if k in overrides else mostly(from_schema(v, defs)) for k, v in props.items()}
    names, required = sorted(fields), tuple(schema.get("required", ()))

    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
        keys = set(chosen) | {r for r in required if draw(st.integers(0, 19)) > 0}
        body = {k: draw(fields[k]) for k in sorted(keys)}
        unbounded = "max_tokens" not in body and "max_completion_tokens" not in body
        if short and unbounded:
            body["max_tokens"] = draw(st.integers(1, 4))
        if draw(st.integers(0, 19)) == 0:
            body[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
        return body

    return build()


# OpenAI / vLLM conformance fields and the decoding drivers, on an otherwise valid request
NEW_FIELDS = ("prompt_logprobs", "stream_options", "stream", "echo", "logprobs", "guided_regex", "guided_grammar",
              "guided_json", "guided_choice", "beam_width", "length_penalty", "contrastive", "speculative", "n",
              "max_tokens", "stop", "seed", "temperature")


@st.composite
def conformance_bodies(draw, chat: bool = False):
    fields = CHAT if chat else COMPLETION
    names = [k for k in NEW_FIELDS if k in fields] + (["top_logprobs", "response_format"] if chat else [])
    body = {"messages": [{"role": "user", "content": draw(st.text(max_size=12))}]} if chat \
        else {"prompt": draw(st.one_of(text_prompt, valid_ids.filter(bool), st.lists(valid_ids.filter(bool),
                                                                                    min_size=1, max_size=2)))}
    body["max_tokens"] = draw(st.integers(0 if not chat else 1, 4))
    for k in draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=4)):
        body[k] = draw(fields[k])
    if chat and isinstance(body.get("logprobs"), bool):
        body["logprobs"] = body["logprobs"] or "top_logprobs" in body
    return body


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


@settings(max_examples=90, **SETTINGS)
@given(body=bodies(schemas.CompletionRequest, COMPLETION))
def test_fuzz_completions(http, body):
    post(http, "/v1/completions", body)


@settings(max_examples=60, **SETTINGS)
@given(body=bodies(schemas.ChatRequest, CHAT, short=True))
def test_fuzz_chat(http, body):
    post(http, "/v1/chat/completions", body)


@settings(max_examples=70, **SETTINGS)
@given(body=st.one_of(conformance_bodies(), conformance_bodies(chat=True)))
def test_fuzz_conformance_fields_and_drivers(http, body):
    post(http, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)


OTHER_ROUTES = sorted(p for p in body_models() if p not in ("/v1/completions", "/v1/chat/completions"))


@settings(max_examples=90, **SETTINGS)
@given(data=st.data(), path=st.sampled_from(OTHER_ROUTES))
def test_fuzz_other_routes(http, data, path):
    post(http, path, data.draw(bodies(body_models()[path], OTHERS)))


def test_every_route_is_fuzzed(server):
    """Each route of the app is either a GET without a body or a POST whose request model is above."""
    routes = {(m, r.path) for r in server.app.routes if isinstance(r, APIRoute) for m in r.methods}
    posts = {p for m, p in routes if m == "POST"}
    gets = {p for m, p in routes if m == "GET"}
    assert posts == set(body_models()), "a POST route without a request model in body_models()"
    assert gets <= GET_ROUTES, "a GET route missing from GET_ROUTES"
    for path, model in body_models().items():  # every field of every model gets generated values
        assert set(model.model_json_schema(by_alias=True)["properties"]), path


RAW_PATHS = ["/v1/completions", "/v1/chat/completions", "/nope", "/v1/models/x", "/v1/models/tiny",
             *sorted(p for p in GET_ROUTES if "{" not in p), *sorted(body_models())]


@settings(max_examples=60, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(sorted(set(RAW_PATHS))),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       ctype=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_fuzz_raw_requests(http, raw, path, method, ctype):
    r = http.request(method, path, content=raw, headers={"content-type": ctype} if ctype else {})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()


def test_fuzz_reached_both_outcomes(http):
    """The generated bodies are a mix: some are served (200), some are refused (400), on every route."""
    if not STATUSES:
        pytest.skip("run together with the fuzz tests above")
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert STATUSES[path, 200] >= 3 and STATUSES[path, 400] >= 3, dict(STATUSES)
    assert {p for p, _ in STATUSES} >= set(body_models()), dict(STATUSES)
    others = Counter()
    for (p, status), k in STATUSES.items():
        if p in OTHER_ROUTES:
            others[status] += k
    assert others[200] >= 10 and others[400] >= 10, dict(STATUSES)
