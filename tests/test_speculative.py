"""Speculative decoding: greedy output identical to plain greedy for every kind of draft (so the caches stay
consistent after rejections), and sampled output distributed exactly like plain sampling (chi-square over
the first two tokens against the target's exact two-token distribution, with a power check)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from logitlab.decoding.speculative import (
    NgramDraft,
    benchmark_speculative,
    make_draft,
    plain_generate,
    speculative_generate,
)
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

V = 8


@torch.inference_mode()
def naive_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("draft", ["other", "early-exit:1", "early-exit:2", "int8", "ngram"])
def test_greedy_speculative_equals_plain_greedy(draft):
    target = tiny_model(1, vocab_size=61)
    spec = tiny_model(2, vocab_size=61) if draft == "other" else draft
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for prompt in ([7], [1, 2, 3, 1, 2, 3, 1]):
        ref = naive_greedy(target, prompt, 20)
        plain = plain_generate(target, prompt, params)
        assert plain.token_ids[0] == ref
        for gamma in (1, 4):
            out = speculative_generate(target, spec, prompt, params, num_speculative_tokens=gamma)
            assert out.token_ids[0] == ref, (draft, prompt, gamma)
            s = out.stats
            assert s.generated == 20 and 0 <= s.accepted <= s.drafted
            assert s.rounds <= 20


def test_greedy_rows_with_eos_stop_independently():
    target = tiny_model(1, vocab_size=61)
    ref = naive_greedy(target, [5, 9, 2], 12)
    eos = ref[6]  # a token greedy produces: the row must stop there
    params = SamplingParams(temperature=0.0, max_tokens=12)
    out = speculative_generate(target, "early-exit:1", [5, 9, 2], params, num_speculative_tokens=4,
                               eos_token_ids=[eos])
    assert out.token_ids[0] == ref[: ref.index(eos) + 1]
    assert out.finish_reasons == ["stop"]


@torch.inference_mode()
def exact_two_token_distribution(model, prompt, params):
    """P(t1, t2) = p(t1) p(t2 | t1) through the same pipeline (temperature, truncation) as generation."""
    from logitlab.decoding.constraints import PipelineRows

    rows = PipelineRows(params, prompt, V, [], 1)
    p1 = rows.logprobs(model(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0))).exp()[0]
    seqs = torch.tensor([prompt + [t] for t in range(V)])
    logits = model(seqs, torch.arange(len(prompt) + 1).expand(V, -1))
    rows = PipelineRows(params, prompt, V, [], V)
    rows.append(torch.arange(V))
    p2 = rows.logprobs(logits).exp()  # [V (t1), V (t2)]
    return (p1.unsqueeze(1) * p2).double()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    exp = probs.flatten() * n
    obs = counts.flatten().double()
    keep = exp >= 5  # pool the rare cells into one
    obs_k = torch.cat([obs[keep], obs[~keep].sum().view(1)])
    exp_k = torch.cat([exp[keep], exp[~keep].sum().view(1)])
    if exp_k[-1] < 1e-9:
        obs_k, exp_k = obs_k[:-1], exp_k[:-1]
    exp_k = exp_k * obs_k.sum() / exp_k.sum()
    return float(chisquare(obs_k.numpy(), exp_k.numpy()).pvalue)


@pytest.mark.parametrize("draft,params", [
    ("other", SamplingParams(temperature=1.0)),
    ("early-exit:1", SamplingParams(temperature=0.8, top_k=5)),
    ("ngram", SamplingParams(temperature=1.0)),
])
def test_sampled_speculative_follows_the_target_distribution(draft, params):
    target = tiny_model(11, vocab_size=V)
    other = tiny_model(12, vocab_size=V)
    spec = other if draft == "other" else draft
    prompt = [1, 2, 3, 1, 2]
    N = 3000
    out = speculative_generate(target, spec, prompt, params, num_speculative_tokens=3, max_tokens=2,
                               seeds=list(range(1000, 1000 + N)))
    counts = torch.zeros(V, V)
    for ids in out.token_ids:
        counts[ids[0], ids[1]] += 1
    exact = exact_two_token_distribution(target, prompt, params)
    assert chi2_pvalue(counts, exact) > 1e-3
    # power: the same counts are far from what the draft alone would produce
    if draft == "other":
        assert out.stats.acceptance_rate < 0.95
        wrong = exact_two_token_distribution(other, prompt, params)
        assert chi2_pvalue(counts, wrong) < 1e-6


def test_ngram_lookup_and_bad_specs():
    d = NgramDraft(3)
    assert d.lookup([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]
    assert d.lookup([1, 2, 3, 4, 5, 2], 3) == [3, 4, 5]
    assert d.lookup([1, 2, 3, 4, 1, 2], 5) == [3, 4, 1, 2]  # only what is there
    assert d.lookup([9, 8, 7], 2) == []  # no match: nothing proposed, a plain decode step
    target = tiny_model(1, vocab_size=61)
    for bad in ("early-exit:0", "early-exit:3", "early-exit:x", "ngram:0", "whatever"):
        with pytest.raises(ParamError, match="speculative"):
            make_draft(bad, target)
    with pytest.raises(ParamError, match="vocabulary"):
        make_draft(tiny_model(2, vocab_size=60), target)
    with pytest.raises(ParamError, match="num_speculative_tokens"):
        speculative_generate(target, "ngram", [1, 2], SamplingParams(), num_speculative_tokens=0)


def test_benchmark_reports_acceptance_and_speedup():
    target = tiny_model(1, vocab_size=61)
    rows = benchmark_speculative(target, drafts=("ngram", "early-exit:2"), prompt=[1, 2, 3, 1, 2, 3],
                                 max_tokens=12, num_speculative_tokens=3)
    assert [r["draft"] for r in rows] == ["ngram", "early-exit:2"]
    for r in rows:
        assert r["same_as_plain"] and 0 <= r["acceptance_rate"] <= 1 and r["speedup"] > 0


@pytest.mark.real_model
@pytest.mark.parametrize("draft", ["ngram", "early-exit:20", "int8"])
def test_real_model_greedy_speculative_equals_the_engine(real_engine, draft):
    prompt = "Yesterday I went to the gym and I was"
    ref = real_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0].choices[0].token_ids
    out = speculative_generate(real_engine, draft, prompt, SamplingParams(temperature=0.0, max_tokens=24),
                               num_speculative_tokens=4)
    assert out.token_ids[0] == ref
    assert out.stats.generated == len(ref) and out.stats.rounds < len(ref)  # some drafts were accepted


def test_a_model_drafts_kv_memory_grows_with_its_tokens():
    """The draft's paged pool holds blocks for the positions it has run, not max_len for every row."""
    target = tiny_model(1, vocab_size=61)
    draft = make_draft("early-exit:1", target)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    out = speculative_generate(target, draft, [1, 2, 3], params, num_speculative_tokens=4)
    assert out.token_ids[0] == naive_greedy(target, [1, 2, 3], 20)
    assert sum(len(t) for t in draft.tables) == -(-(3 + 20 + 4 - 1) // draft.BLOCK)  # prompt, tokens, drafts
    draft.start([[1, 2, 3], [4, 5]], 2048)
    with torch.inference_mode():
        draft._feed([[1, 2, 3], [4, 5]])
    assert [len(t) for t in draft.tables] == [1, 1] and draft.cache.capacity >= 2 * 2048 // draft.BLOCK
    assert draft.cache.allocated_blocks <= 4  # the scratch block and the two held (the pool grows as needed)


def test_gguf_draft_needs_a_float_target_read_from_a_gguf_file():
    target = tiny_model(1, vocab_size=61)
    with pytest.raises(ParamError, match="GGUF file"):
        make_draft("gguf", target)


@pytest.mark.real_model
def test_gguf_draft_of_the_real_model_is_accepted_almost_always(real_engine, real_weights, monkeypatch):
    """The float32 target's own GGUF file on its blocks (int8x2 activations) as draft: plain greedy's text,
    nearly every draft accepted (the same weights, logits within ~1e-3 nats), one copy for every request;
    a gguf target is refused."""
    model = real_engine.model
    monkeypatch.setattr(model, "gguf_source", real_weights.source, raising=False)
    prompt = "Yesterday I went to the gym and I was"
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ref = real_engine.generate(prompt, params)[0].choices[0].token_ids
    try:
        out = speculative_generate(real_engine, "gguf", prompt, params, num_speculative_tokens=4)
        assert out.token_ids[0] == ref
        assert out.stats.acceptance_rate > 0.9 and out.stats.rounds <= len(ref) // 4 + 1
        draft = make_draft("gguf", model)
        assert draft.model is make_draft("gguf", model).model  # made once, kept with the target
        with pytest.raises(ParamError, match="already computes"):
            make_draft("gguf", draft.model)
    finally:
        model.__dict__.pop("_gguf_draft", None)
