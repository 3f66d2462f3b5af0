"""Structured output through xgrammar token masks (the pipeline's first stage): across many seeds and
temperatures every output of a tiny random model matches its regex / parses against its JSON schema /
is derived by its grammar / is one of its choices — the constraint guarantees it — with greedy, sampling,
beam search and contrastive decoding; and the tokenizer bridge for byte-level BPE vocabularies."""

from __future__ import annotations

import json
import re

import pytest
import torch

from logitlab.decoding.beam import beam_search
from logitlab.decoding.constraints import (
    Constraint,
    ConstraintSpec,
    allowed_masks,
    apply_allowed,
    bitmask_to_bool,
    constrained_generate,
    spec_from_options,
    tokenizer_info,
)
from logitlab.decoding.contrastive import contrastive_generate
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = (["<eos>"] + list("0123456789abcdefghijklmnopqrstuvwxyz") + list('{}[]":, -+.')
         + ["true", "false", "null", '{"', '":', '",', "yes", "no", "red", "blue", " sky", "12", "ab"])
EOS = [0]
V = len(VOCAB)
INFO = tokenizer_info(VOCAB, stop_token_ids=EOS)

SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "blue sky"]},
    "tags": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 2},
}, "required": ["n", "ok", "color", "tags"], "additionalProperties": False}
REGEX = r"[0-9]{2,3}-(yes|no)"
GRAMMAR = 'root ::= num (("+" | "-") num)?\nnum ::= [1-9] [0-9]?'
CHOICES = ["red", "blue sky", "ab-12"]


def text(ids):
    return "".join(VOCAB[t] for t in ids if t not in EOS)


def check(kind, s):
    if kind == "regex":
        return re.fullmatch(REGEX, s) is not None
    if kind == "json_schema":
        obj = json.loads(s)
        return (set(obj) == {"n", "ok", "color", "tags"} and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99
                and isinstance(obj["ok"], bool) and obj["color"] in ("red", "blue sky")
                and len(obj["tags"]) <= 2 and all(isinstance(t, int) and 1 <= t <= 9 for t in obj["tags"]))
    if kind == "json_object":
        return isinstance(json.loads(s), dict)
    if kind == "grammar":
        return re.fullmatch(r"[1-9][0-9]?([+-][1-9][0-9]?)?", s) is not None
    return s in CHOICES


SPECS = {
    "regex": ConstraintSpec("regex", REGEX),
    "json_schema": spec_from_options(json_schema=SCHEMA),
    "grammar": ConstraintSpec("grammar", GRAMMAR),
    "choice": ConstraintSpec("choice", tuple(CHOICES)),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_sampled_output_matches(kind):
    model = tiny_model(4, vocab_size=V)
    c = Constraint.from_spec(SPECS[kind], INFO)
    seen = set()
    for temperature in (0.0, 0.7, 1.0, 2.0):
        for seed in (1, 2, 3):
            out = constrained_generate(model, [5, 6, 7], c, SamplingParams(temperature=temperature, seed=seed),
                                       max_tokens=90, n=8, eos_token_ids=EOS)
            for ids, reason in zip(out.token_ids, out.finish_reasons, strict=True):
                assert reason == "stop", (kind, temperature, text(ids))
                assert ids[-1] in EOS
                assert check(kind, text(ids)), (kind, text(ids))
                seen.add(text(ids))
    assert len(seen) > 1  # the sampled outputs differ: the mask constrains, it does not dictate


def test_json_object_and_top_k_on_top_of_the_mask():
    model = tiny_model(4, vocab_size=V)
    c = Constraint.json_object(INFO)
    params = SamplingParams(temperature=1.0, top_k=3, seed=5)
    out = constrained_generate(model, [1, 2], c, params, max_tokens=60, n=8, eos_token_ids=EOS)
    for ids, reason in zip(out.token_ids, out.finish_reasons, strict=True):
        if reason == "stop":  # an unbounded grammar may run out of tokens; whatever finished parses
            assert check("json_object", text(ids))
        else:
            assert reason == "length"


def test_beam_search_under_a_constraint():
    model = tiny_model(4, vocab_size=V)
    c = Constraint.from_spec(SPECS["regex"], INFO)
    res = beam_search(model, [5, 6, 7], width=4, n=4, max_tokens=12, length_penalty=1.0, eos_token_ids=EOS,
                      constraint=c)
    assert len(res.hypotheses) == 4
    for h in res.hypotheses:
        assert h.finish_reason == "stop" and check("regex", text(h.token_ids)), text(h.token_ids)
    c = Constraint.from_spec(SPECS["json_schema"], INFO)
    res = beam_search(model, [5, 6, 7], width=3, n=2, max_tokens=90, eos_token_ids=EOS, constraint=c)
    for h in res.hypotheses:
        assert h.finish_reason == "stop" and check("json_schema", text(h.token_ids))


def test_contrastive_under_a_constraint():
    model = tiny_model(4, vocab_size=V)
    c = Constraint.from_spec(SPECS["grammar"], INFO)
    out = contrastive_generate(model, "early-exit:1", [5, 6], alpha=0.1, max_tokens=10, n=3, eos_token_ids=EOS,
                               constraint=c, params=SamplingParams(temperature=1.0, seed=3))
    for ids in out.token_ids:
        assert check("grammar", text(ids))


def test_mask_is_the_first_stage():
    c = Constraint.from_spec(SPECS["choice"], INFO)
    state = c.start()
    allowed = allowed_masks([state, None], V)
    first = {VOCAB[i] for i in allowed[0].nonzero().flatten().tolist()}
    assert first == {"r", "red", "b", "blue", "a", "ab"}
    assert allowed[1].all()  # an unconstrained row
    logits = torch.zeros(2, V)
    masked = apply_allowed(logits, allowed)
    assert torch.isinf(masked[0][~allowed[0]]).all() and torch.isfinite(masked[1]).all()
    # the mask comes before logit bias: a huge bias on a masked token cannot revive it
    from logitlab.decoding.constraints import PipelineRows

    banned = VOCAB.index("z")
    rows = PipelineRows(SamplingParams(temperature=1.0, logit_bias={banned: 100.0}), [1], V, EOS, 1)
    assert rows.logprobs(torch.zeros(1, V), allowed[:1])[0, banned] == float("-inf")
    packed = torch.tensor([[0b101, -(1 << 31)]], dtype=torch.int32)  # bit 31 of word 1 = token 63
    assert bitmask_to_bool(packed, 64)[0].nonzero().flatten().tolist() == [0, 2, 63]


def test_specs_are_validated_with_the_field_named():
    with pytest.raises(ParamError, match="regex"):
        Constraint.from_spec(ConstraintSpec("regex", "[a-"), INFO)
    with pytest.raises(ParamError, match="json_schema"):
        spec_from_options(json_schema="{not json")
    with pytest.raises(ParamError, match="json_schema"):
        Constraint.from_spec(ConstraintSpec("json_schema", '{"type": 3}'), INFO)
    with pytest.raises(ParamError, match="grammar"):
        Constraint.from_spec(ConstraintSpec("grammar", 'root ::= "a" |'), INFO)
    with pytest.raises(ParamError, match="only one"):
        spec_from_options(regex="a", choice=["b"])
    with pytest.raises(ParamError, match="choice"):
        spec_from_options(choice=[""])
    assert spec_from_options() is None


def test_byte_level_bpe_vocabulary_bridge():
    """A byte-level BPE (the SmolLM/GPT-2 kind, 'Ġ' for a space) trained on the spot: tokenizer_info
    detects the vocabulary type, and constrained outputs decode to matching text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the answer is yes", "the answer is no", "red blue green 123 456"] * 20, trainer)
    eos = tok.token_to_id("<|endoftext|>")
    info = tokenizer_info(tok, stop_token_ids=[eos])
    assert info.vocab_type.name == "BYTE_LEVEL"
    model = tiny_model(6, vocab_size=tok.get_vocab_size())
    c = Constraint.regex(r"the answer is (yes|no)\.", info)
    out = constrained_generate(model, [5, 6], c, SamplingParams(temperature=1.0, seed=1), max_tokens=30, n=6,
                               eos_token_ids=[eos])
    for ids, reason in zip(out.token_ids, out.finish_reasons, strict=True):
        assert reason == "stop"
        assert re.fullmatch(r"the answer is (yes|no)\.", tok.decode(ids[:-1])), tok.decode(ids)


@pytest.mark.real_model
def test_real_tokenizer_json_schema_and_regex(real_engine):
    from logitlab.decoding.constraints import compile_constraint

    info = tokenizer_info(real_engine.tokenizer, real_engine.vocab_size)
    assert info.vocab_type.name == "BYTE_LEVEL" and info.vocab_size == real_engine.vocab_size
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    c = compile_constraint(spec_from_options(json_schema=schema), real_engine)
    prompt = real_engine.chat_prompt([{"role": "user", "content": "Give me a JSON object describing a person."}])
    out = constrained_generate(real_engine, prompt, c, SamplingParams(temperature=0.0, max_tokens=40))
    assert out.finish_reasons == ["stop"]
    obj = json.loads(out.texts[0])
    assert isinstance(obj["name"], str) and 0 <= obj["age"] <= 120
    c = compile_constraint(ConstraintSpec("regex", r"[0-9]{1,2} (apples|pears)"), real_engine)
    out = constrained_generate(real_engine, "I bought", c, SamplingParams(temperature=1.0, seed=0, max_tokens=8),
                               n=3)
    for t in out.texts:
        assert re.fullmatch(r"[0-9]{1,2} (apples|pears)", t), t
