"""Engine + scheduler: batching, seeds, n, stops, logprobs, echo, streaming, cache vs no cache."""

from __future__ import annotations

import pytest
import torch

from logitlab.engine import Engine
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_engine(real_tokenizer):
    """A tiny random model over the real tokenizer's vocabulary: fast, and its distribution is flat
    enough that sampling differences show."""
    model = tiny_model(seed=0, vocab_size=real_tokenizer.vocab_size, context_length=256)
    return Engine(model, real_tokenizer, name="tiny", max_batch=16, max_len=256)


def _texts(results):
    return [[c.token_ids for c in r.choices] for r in results]


def test_seeded_output_does_not_depend_on_batch_neighbours(tiny_engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    alone = tiny_engine.generate("hello there", p)[0].choices[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.7, seed=n, ignore_eos=True) for n in (3, 20, 7)]
    batch = tiny_engine.generate(["a b c", "zzz", "hello there", "x"], [others[0], others[1], p, others[2]])
    assert batch[2].choices[0].token_ids == alone
    # and a different seed gives a different sample
    other = tiny_engine.generate("hello there", SamplingParams(max_tokens=12, seed=124, ignore_eos=True))
    assert other[0].choices[0].token_ids != alone


def test_n_samples_share_prefill_and_match_separate_runs(tiny_engine):
    p = SamplingParams(max_tokens=8, seed=7, n=3, ignore_eos=True)
    res = tiny_engine.generate("The cat", p)[0]
    assert len(res.choices) == 3 and len({tuple(c.token_ids) for c in res.choices}) == 3
    again = tiny_engine.generate(["The cat", "The cat"], [p, p])
    assert [c.token_ids for c in again[0].choices] == [c.token_ids for c in res.choices]
    assert [c.token_ids for c in again[1].choices] == [c.token_ids for c in res.choices]


@torch.inference_mode()
def test_greedy_equals_argmax_loop(tiny_engine):
    ids = tiny_engine.tokenizer.encode("Once upon")
    res = tiny_engine.generate(ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    seq = list(ids)
    for _ in range(10):
        logits = tiny_engine.model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0))[0]
        seq.append(int(logits.argmax()))
    assert res[0].choices[0].token_ids == seq[len(ids):]


def test_no_kv_cache_gives_the_same_tokens(tiny_engine):
    nc = Engine(tiny_engine.model, tiny_engine.tokenizer, max_batch=4, max_len=256, use_cache=False)
    for p in [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)]:
        prompts = ["one two", "three four five six"]
        assert _texts(nc.generate(prompts, p)) == _texts(tiny_engine.generate(prompts, p))


def test_finish_reasons_and_stop_token(tiny_engine):
    r = tiny_engine.generate("abc", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0].choices[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    third = r.token_ids[2]
    s = tiny_engine.generate("abc", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[third]))[0].choices[0]
    assert s.finish_reason == "stop" and s.token_ids == r.token_ids[: r.token_ids.index(third) + 1]


def test_stop_string_across_token_boundary(tiny_engine):
    tok = tiny_engine.tokenizer
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = tiny_engine.generate("Hi", p)[0].choices[0]
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # a stop string made of the last 2 characters of token 4 and the first 2 of token 5
    a, b = pieces[4], pieces[5]
    assert len(a) - len(pieces[3]) >= 2 and len(b) - len(a) >= 2, "test needs multi-char tokens"
    stop = a[-2:] + b[len(a): len(a) + 2]
    expected = full.text[: full.text.find(stop)]
    got = tiny_engine.generate("Hi", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                    stop=[stop]))[0].choices[0]
    assert got.finish_reason == "stop" and got.text == expected and stop not in got.text


def test_streaming_text_equals_generated_text(tiny_engine):
    p = SamplingParams(max_tokens=15, seed=3, ignore_eos=True, stop=["e t"])
    streamed = "".join(ev.text for ev in tiny_engine.stream("Stream me", p))
    assert streamed == tiny_engine.generate("Stream me", p)[0].choices[0].text


def test_raw_logprobs_and_top_alternatives(tiny_engine):
    p = SamplingParams(max_tokens=1, temperature=0.7, seed=1, logprobs=5, ignore_eos=True)
    c = tiny_engine.generate("Tell me", p)[0].choices[0]
    expected = torch.log_softmax(tiny_engine.next_token_logits("Tell me"), -1)
    assert c.token_logprobs[0] == pytest.approx(float(expected[c.token_ids[0]]), abs=1e-4)
    top = c.top_logprobs[0]
    want = expected.topk(5)
    assert [t for t, _ in top] == want.indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_echo_prompt_logprobs_equal_score(tiny_engine):
    text = "The quick brown fox"
    c = tiny_engine.generate(text, SamplingParams(max_tokens=1, echo=True, logprobs=0))[0].choices[0]
    ids = tiny_engine.tokenizer.encode(text)
    # the prompt's first token has no logprob (nothing before it); score the rest given that token
    s = tiny_engine.score(tiny_engine.tokenizer.decode(ids[1:]), context=ids[:1])
    assert c.prompt_logprobs[0] is None and len(s.token_logprobs) == len(ids) - 1
    assert c.prompt_logprobs[1:] == pytest.approx(s.token_logprobs, abs=1e-4)


@torch.inference_mode()
def test_score_with_context_matches_a_manual_forward(tiny_engine):
    tok = tiny_engine.tokenizer
    ctx, text = "Paris is the capital of", " France"
    res = tiny_engine.score(text, context=ctx)
    ids = tok.encode(ctx) + tok.encode(text, add_special_tokens=False)
    logits = tiny_engine.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), logits_at="all")[0]
    lp = torch.log_softmax(logits, -1)
    n = len(res.tokens)
    manual = [float(lp[len(ids) - n - 1 + i, ids[len(ids) - n + i]]) for i in range(n)]
    assert res.token_logprobs == pytest.approx(manual, abs=1e-4)
    assert res.perplexity == pytest.approx(float(torch.tensor(manual).mean().neg().exp()), rel=1e-5)


def test_sliding_window_scoring_of_a_long_text(real_tokenizer):
    model = tiny_model(seed=1, vocab_size=real_tokenizer.vocab_size, context_length=64)
    small = Engine(model, real_tokenizer, max_batch=1, max_len=32)
    text = " ".join(f"word{i}" for i in range(60))
    res = small.score(text)
    assert len(res.token_logprobs) == len(res.tokens) > 32
    assert all(lp <= 0 for lp in res.token_logprobs)


def test_validation_reaches_the_caller(tiny_engine):
    with pytest.raises(ParamError, match="max_tokens"):
        tiny_engine.generate("x", SamplingParams(max_tokens=10_000))
    with pytest.raises(ParamError, match="prompt"):
        tiny_engine.generate([10**9], SamplingParams())
    with pytest.raises(ParamError, match="top_p"):
        tiny_engine.generate("x", SamplingParams(top_p=0))


def test_abandoned_stream_frees_its_slot(tiny_engine):
    it = tiny_engine.stream("abandon", SamplingParams(max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert not tiny_engine.scheduler.running and not tiny_engine.scheduler.waiting


def test_continuous_batching_admits_while_running(tiny_engine):
    sched = tiny_engine.scheduler
    p_long = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    p_short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    long_req = tiny_engine.make_requests("long one", p_long)
    sched.add(long_req)
    for _ in range(5):
        sched.step()
    short_req = tiny_engine.make_requests("short", p_short)
    sched.add(short_req)
    sched.step()
    assert len(sched.running) == 2  # joined the running batch mid-flight
    while sched.has_work():
        sched.step()
    alone_long = tiny_engine.generate("long one", p_long)[0].choices[0].token_ids
    alone_short = tiny_engine.generate("short", p_short)[0].choices[0].token_ids
    assert long_req[0].output_ids == alone_long and short_req[0].output_ids == alone_short


def test_grammar_constraint_in_the_continuous_batch(tiny_engine):
    """A regex constraint runs as the pipeline's first stage inside the scheduler: every sample matches,
    streaming gives the same text, and an unconstrained neighbour in the same batch is unaffected."""
    import re

    from logitlab.decoding.constraints import ConstraintSpec, compile_constraint

    constraint = compile_constraint(ConstraintSpec("regex", r"(yes|no), [0-9]{2}"), tiny_engine)
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=4)
    res = tiny_engine.generate("Answer:", p, constraint=constraint)[0]
    for c in res.choices:
        assert re.fullmatch(r"(yes|no), [0-9]{2}", c.text), c.text
        assert c.finish_reason == "stop"
    streamed = "".join(ev.text for ev in tiny_engine.stream("Answer:", SamplingParams(max_tokens=12, seed=11),
                                                            constraint=constraint))
    alone = tiny_engine.generate("Answer:", SamplingParams(max_tokens=12, seed=11), constraint=constraint)
    assert streamed == alone[0].choices[0].text
    free = SamplingParams(max_tokens=6, seed=5, ignore_eos=True)
    sched = tiny_engine.scheduler
    constrained = tiny_engine.make_requests("Answer:", p, constraint)
    unconstrained = tiny_engine.make_requests("free text", free)
    sched.add(constrained)
    sched.add(unconstrained)
    while sched.has_work():
        sched.step()
    assert [r.output_ids for r in constrained] == [c.token_ids for c in res.choices]
    assert unconstrained[0].output_ids == tiny_engine.generate("free text", free)[0].choices[0].token_ids
