"""Exact choice among strings (full-sequence logprob, one prefill + one batched forward) and the few-shot
classifier's prompt and label probabilities, on a tiny model with a character-level tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from logitlab.classify import FewShotClassifier, choose, classify, continuation_logprobs, parse_example
from logitlab.sampling import ParamError

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    eos_token_ids = {0}
    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def engine():
    return SimpleNamespace(model=tiny_model(9, vocab_size=128), tokenizer=CharTokenizer())


@torch.inference_mode()
def rescore(model, prefix, cont):
    ids = prefix + cont
    lp = torch.log_softmax(model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), logits_at="all")[0], -1)
    return [float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont)]


def test_continuations_are_scored_exactly():
    e = engine()
    prefix = "The answer is"
    conts = [" yes", " no", " maybe not", "!"]
    got = continuation_logprobs(e, prefix, conts)
    for c, lps in zip(conts, got, strict=True):
        ref = rescore(e.model, [ord(x) for x in prefix], [ord(x) for x in c])
        assert lps == pytest.approx(ref, abs=1e-4)


def test_choice_uses_the_whole_sequence_not_the_first_token():
    e = engine()
    prompt = "Pick: "
    # choices sharing a first token tie on it; only the full sequence tells them apart
    choices = ["ab", "ac", "ad", "ae"]
    res = choose(e, prompt, choices)
    full = [sum(rescore(e.model, [ord(x) for x in prompt], [ord(x) for x in c])) for c in choices]
    assert res.logprobs == pytest.approx(full, abs=1e-4)
    assert res.index == max(range(4), key=lambda i: full[i])
    assert res.choice == choices[res.index]
    assert sum(res.probs) == pytest.approx(1.0)
    assert res.num_tokens == [2, 2, 2, 2]
    picks = {choose(e, prompt, choices, temperature=100.0, seed=s).index for s in range(40)}
    assert len(picks) > 1  # sampled choices vary with the seed
    with pytest.raises(ParamError, match="choice"):
        choose(e, prompt, [])


def test_few_shot_prompt_and_label_probabilities():
    e = engine()
    examples = [("I loved the movie", "Positive"), ("It was way too long", "Negative")]
    clf = FewShotClassifier(examples)
    p = clf.prompt("The leading actress did a wonderful job.")
    assert p == ("I loved the movie : Positive\nIt was way too long : Negative\n"
                 "The leading actress did a wonderful job. :")
    res = classify(e, ["I loved the movie=Positive", "It was way too long=Negative"], ["Great fun", "Dull"])
    assert [r.input for r in res] == ["Great fun", "Dull"]
    for r in res:
        assert set(r.probs) == {"Positive", "Negative"}
        assert sum(r.probs.values()) == pytest.approx(1.0)
        ref = choose(e, clf.prompt(r.input), [" Positive", " Negative"])
        assert r.label == ["Positive", "Negative"][ref.index]
        assert r.probs["Positive"] == pytest.approx(ref.probs[0])


def test_bad_examples_are_named():
    assert parse_example("a = b = c=Label") == ("a = b = c", "Label")
    for bad in ("no label", "=x", "text="):
        with pytest.raises(ParamError, match="example"):
            parse_example(bad)
    with pytest.raises(ParamError, match="labels"):
        FewShotClassifier([("a", "X"), ("b", "X")])


def test_driver_options_from_cli_flags_and_request_fields():
    import argparse

    from logitlab.cli_drivers import add_driver_commands, add_driver_flags
    from logitlab.decoding.modes import DriverOptions

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate")
    g.add_argument("prompt")
    add_driver_flags(g)
    add_driver_commands(sub)
    a = p.parse_args(["generate", "hi", "--beam-width", "3", "--length-penalty", "0.5", "--regex", "[0-9]+"])
    o = DriverOptions.from_args(a)
    assert o.requested() and o.beam_width == 3 and o.length_penalty == 0.5 and o.spec().kind == "regex"
    a = p.parse_args(["generate", "hi", "--choice", "yes", "--choice", "no"])
    assert DriverOptions.from_args(a).choice == ["yes", "no"]
    assert not DriverOptions.from_args(p.parse_args(["generate", "hi"])).requested()
    a = p.parse_args(["classify", "--example", "a=X", "--example", "b=Y", "c", "d"])
    assert a.inputs == ["c", "d"] and a.example == ["a=X", "b=Y"]
    a = p.parse_args(["demo", "beam", "--plot", "x.png"])
    assert a.name == "beam" and a.plot == "x.png"

    o = DriverOptions.from_request({"speculative": {"draft": "ngram", "num_tokens": 3},
                                    "response_format": {"type": "json_object"}})
    assert o.speculative == "ngram" and o.num_speculative_tokens == 3 and o.spec().kind == "json_object"
    with pytest.raises(ParamError, match="speculative"):
        o.validate()  # a draft cannot run under a grammar
    o = DriverOptions.from_request({"response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert o.spec().kind == "json_schema"
    o = DriverOptions.from_request({"guided_choice": ["a", "b"], "beam_width": 2})
    with pytest.raises(ParamError, match="choice"):
        o.validate()
    with pytest.raises(ParamError, match="guided_choice"):
        DriverOptions.from_request({"guided_choice": "a"})
    with pytest.raises(ParamError, match="response_format"):
        DriverOptions.from_request({"response_format": {"type": "xml"}})


@pytest.mark.real_model
def test_real_model_few_shot_sentiment_and_exact_scores(real_engine):
    from logitlab.demos import SENTIMENT

    res = classify(real_engine, SENTIMENT, ["The leading actress did a wonderful job.", "I want my money back."])
    assert [r.label for r in res] == ["Positive", "Negative"]
    assert res[0].probs["Positive"] > 0.7 and res[1].probs["Negative"] > 0.6
    # the batched continuation scores equal the engine's own scoring of the same text
    got = continuation_logprobs(real_engine, "The capital of France is", [" Paris", " the city of Rome"])
    for text, lps in zip([" Paris", " the city of Rome"], got, strict=True):
        ref = real_engine.score(text, context="The capital of France is")
        assert lps == pytest.approx(ref.token_logprobs, abs=2e-3)
