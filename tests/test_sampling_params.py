"""SamplingParams.validate: every bad field raises ParamError naming that field and the allowed range."""

from __future__ import annotations

import dataclasses

import pytest

from logitlab.sampling import ParamError, SamplingParams

V = 100
NAN, INF = float("nan"), float("inf")


def check_bad(field: str, *, eos=(), context_length=None, prompt_len=None, **kw) -> ParamError:
    with pytest.raises(ParamError) as ei:
        SamplingParams(**kw).validate(V, context_length=context_length, prompt_len=prompt_len,
                                      eos_token_ids=eos)
    e = ei.value
    assert isinstance(e, ValueError)
    assert e.field == field, str(e)
    assert str(e) == f"{field}: {e.reason}"
    return e


def test_defaults_are_valid_and_validate_returns_self():
    p = SamplingParams()
    assert p.validate(V) is p
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.n, p.logprobs) == (
        16, 1.0, 0, 1.0, 0.0, 1.0, 1, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs_mode == "raw"


def test_message_names_the_field_and_the_range():
    e = check_bad("top_p", top_p=1.5)
    assert str(e) == "top_p: must be in (0, 1], got 1.5"


BAD = [
    ("max_tokens", dict(max_tokens=0)), ("max_tokens", dict(max_tokens=2.0)),
    ("max_tokens", dict(max_tokens=True)),
    ("temperature", dict(temperature=-0.1)), ("temperature", dict(temperature=NAN)),
    ("temperature", dict(temperature=INF)), ("temperature", dict(temperature="1")),
    ("temperature", dict(temperature=True)),
    ("top_k", dict(top_k=-1)), ("top_k", dict(top_k=True)), ("top_k", dict(top_k=2.5)),
    ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.0001)), ("top_p", dict(top_p=NAN)),
    ("min_p", dict(min_p=-0.01)), ("min_p", dict(min_p=1.01)), ("min_p", dict(min_p=INF)),
    ("typical_p", dict(typical_p=0.0)), ("typical_p", dict(typical_p=1.5)),
    ("epsilon", dict(epsilon=1.0)), ("epsilon", dict(epsilon=-1e-9)),
    ("eta", dict(eta=1.0)), ("eta", dict(eta=-0.1)), ("eta", dict(eta=NAN)),
    ("frequency_penalty", dict(frequency_penalty=2.01)), ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("presence_penalty", dict(presence_penalty=3)), ("presence_penalty", dict(presence_penalty=NAN)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=10.5)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("temperature_frequency_penalty", dict(temperature_frequency_penalty=-0.1)),
    ("temperature_presence_penalty", dict(temperature_presence_penalty=INF)),
    ("penalize_prompt", dict(penalize_prompt=1)), ("ignore_eos", dict(ignore_eos="yes")),
    ("echo", dict(echo=None)), ("explain", dict(explain=0)),
    ("n", dict(n=0)), ("n", dict(n=4097)), ("n", dict(n=True)),
    ("min_tokens", dict(min_tokens=-1)), ("min_tokens", dict(min_tokens=17)),
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("logprobs", dict(logprobs=-1)), ("logprobs", dict(logprobs=21)), ("logprobs", dict(logprobs=True)),
    ("logprobs_mode", dict(logprobs_mode="final")), ("logprobs_mode", dict(logprobs_mode=None)),
    ("seed", dict(seed="7")), ("seed", dict(seed=2**64)), ("seed", dict(seed=1.5)), ("seed", dict(seed=True)),
    ("stop", dict(stop="END")), ("stop", dict(stop=[""])), ("stop", dict(stop=["a", 3])),
    ("stop", dict(stop=[str(i) for i in range(17)])),
    ("stop_token_ids", dict(stop_token_ids=[V])), ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=5)), ("stop_token_ids", dict(stop_token_ids=[True])),
    ("allowed_token_ids", dict(allowed_token_ids=[1, V])), ("allowed_token_ids", dict(allowed_token_ids=[])),
    ("allowed_token_ids", dict(allowed_token_ids=[2.0])),
    ("banned_token_ids", dict(banned_token_ids=[-5])),
    ("banned_token_ids", dict(banned_token_ids=list(range(V)))),
    ("logit_bias", dict(logit_bias={V: 1.0})), ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={"5": 1.0})), ("logit_bias", dict(logit_bias={5: 100.5})),
    ("logit_bias", dict(logit_bias={5: -101})), ("logit_bias", dict(logit_bias={5: NAN})),
    ("logit_bias", dict(logit_bias=[(5, 1.0)])),
]


@pytest.mark.parametrize("field, kw", BAD, ids=[f"{f}={list(kw.values())[0]!r}"[:40] for f, kw in BAD])
def test_each_bad_field_is_named(field, kw):
    check_bad(field, **kw)


GOOD = [
    dict(temperature=0), dict(temperature=0.0), dict(temperature=100), dict(top_k=1), dict(top_k=10**6),
    dict(top_p=1), dict(top_p=1e-9), dict(min_p=0), dict(min_p=1), dict(typical_p=1), dict(epsilon=0.999),
    dict(eta=0), dict(frequency_penalty=-2), dict(frequency_penalty=2), dict(presence_penalty=-2.0),
    dict(repetition_penalty=10), dict(repetition_penalty=0.5), dict(temperature_frequency_penalty=10),
    dict(n=128), dict(logprobs=0), dict(logprobs=20), dict(min_tokens=16), dict(max_tokens=1),
    dict(stop=[str(i) for i in range(16)]), dict(stop=("a",)), dict(stop_token_ids=[0, V - 1]),
    dict(logit_bias={0: -100, V - 1: 100.0}), dict(allowed_token_ids=[3], banned_token_ids=[4]),
    dict(banned_token_ids=list(range(V - 1))), dict(seed=-(2**63)), dict(seed=2**64 - 1), dict(seed=0),
    dict(logprobs_mode="processed"), dict(penalize_prompt=True, echo=True, explain=True, ignore_eos=True),
]


@pytest.mark.parametrize("kw", GOOD, ids=[repr(kw)[:40] for kw in GOOD])
def test_boundary_values_are_accepted(kw):
    SamplingParams(**kw).validate(V)


def test_context_length_message_gives_both_numbers():
    SamplingParams(max_tokens=15).validate(V, context_length=25, prompt_len=10)
    e = check_bad("max_tokens", max_tokens=20, context_length=25, prompt_len=10)
    assert "10" in e.reason and "20" in e.reason and "25" in e.reason


def test_allowed_minus_banned_must_be_non_empty():
    check_bad("allowed_token_ids", allowed_token_ids=[1, 2], banned_token_ids=[2, 1])
    SamplingParams(allowed_token_ids=[1, 2], banned_token_ids=[2]).validate(V)


def test_min_tokens_needs_a_non_eos_token():
    check_bad("min_tokens", allowed_token_ids=[0, 1], min_tokens=1, eos=[0, 1])
    check_bad("min_tokens", banned_token_ids=list(range(2, V)), min_tokens=3, eos=[0, 1])
    SamplingParams(allowed_token_ids=[0, 1], min_tokens=0).validate(V, eos_token_ids=[0, 1])
    SamplingParams(allowed_token_ids=[0, 2], min_tokens=2).validate(V, eos_token_ids=[0, 1])
    SamplingParams(banned_token_ids=list(range(3, V)), min_tokens=3).validate(V, eos_token_ids=[0, 1])


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ParamError) as ei:
        SamplingParams.from_dict({"temperature": 0.5, "top_q": 0.9})
    assert ei.value.field == "top_q" and str(ei.value).startswith("top_q: ")
    with pytest.raises(ParamError):
        SamplingParams.from_dict([("temperature", 0.5)])
    p = SamplingParams.from_dict({"temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "logit_bias": {3: 1.0}})
    assert p == SamplingParams(temperature=0.5, top_p=0.9, stop=["\n"], logit_bias={3: 1.0})
    assert SamplingParams.from_dict(dataclasses.asdict(p)) == p
    SamplingParams.from_dict({"top_p": 2.0})  # constructing does not validate ...
    with pytest.raises(ParamError, match="^top_p: "):  # ... validate does
        SamplingParams.from_dict({"top_p": 2.0}).validate(V)
