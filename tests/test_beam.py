"""Beam search on tiny models whose every sequence can be enumerated: exactness with a wide beam, a case
greedy provably misses, the length penalty choosing the winner as score = logprob / len^alpha says, and
beam logprobs that agree with scoring the finished sequence from scratch (the in-place cache reorder)."""

from __future__ import annotations

import itertools

import pytest
import torch

from logitlab.decoding.beam import beam_search, normalised_score
from logitlab.sampling import SamplingParams

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

V, L = 6, 4


@torch.inference_mode()
def enumerate_sequences(model, prompt, length, eos):
    """Every sequence of at most ``length`` generated tokens: non-EOS tokens, optionally closed by an EOS
    (then it is finished early). Returns {tuple(ids): (sum logprob, finished_by_eos)} from full forwards
    without a cache."""
    body = [t for t in range(model.config.vocab_size) if t not in eos]
    seqs = list(itertools.product(body, repeat=length))
    tokens = torch.tensor([list(prompt) + list(s) for s in seqs])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    lp = torch.log_softmax(model(tokens, positions, logits_at="all"), dim=-1).double()  # [N, P+L, V]
    P = len(prompt)
    out = {}
    for n, s in enumerate(seqs):
        total = 0.0
        for k in range(length + 1):
            if k == length:
                out[tuple(s)] = (total, False)
                break
            for e in eos:  # EOS after k body tokens: a finished sequence of k + 1 tokens
                out.setdefault(tuple(s[:k]) + (e,), (total + float(lp[n, P - 1 + k, e]), True))
            total += float(lp[n, P - 1 + k, s[k]])
    return out


@torch.inference_mode()
def greedy(model, prompt, length):
    ids = list(prompt)
    total = 0.0
    for _ in range(length):
        lp = torch.log_softmax(model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0], -1)
        t = int(lp.argmax())
        total += float(lp[t])
        ids.append(t)
    return ids[len(prompt):], total


def test_wide_beam_finds_the_exact_argmax_where_greedy_provably_misses_it():
    model = tiny_model(3, vocab_size=V)
    misses = 0
    for prompt in ([1, 2], [0, 3], [4, 4], [2, 5], [5, 1], [3, 0]):
        table = enumerate_sequences(model, prompt, L, eos=[])
        best_ids, best_lp = max(table.items(), key=lambda kv: kv[1][0])
        res = beam_search(model, prompt, width=V ** (L - 1), length_penalty=0.0, max_tokens=L, n=3)
        top = res.hypotheses[0]
        assert tuple(top.token_ids) == best_ids
        assert top.logprob == pytest.approx(best_lp[0], abs=1e-4)
        ranked = sorted(table.items(), key=lambda kv: -kv[1][0])[:3]
        assert [tuple(h.token_ids) for h in res.hypotheses] == [k for k, _ in ranked]
        g_ids, g_lp = greedy(model, prompt, L)
        if tuple(g_ids) != best_ids:
            misses += 1
            assert g_lp < best_lp[0] - 1e-6  # greedy's sequence is provably less probable
    assert misses >= 1, "no constructed case where greedy misses the argmax"


def test_width_one_is_greedy():
    model = tiny_model(3, vocab_size=V)
    g_ids, g_lp = greedy(model, [1, 2], 6)
    res = beam_search(model, [1, 2], width=1, length_penalty=0.0, max_tokens=6)
    assert res.hypotheses[0].token_ids == g_ids
    assert res.hypotheses[0].logprob == pytest.approx(g_lp, abs=1e-4)


def test_length_penalty_picks_the_winner_the_formula_picks():
    """(prompt, EOS token) cases of this tiny model where the winner depends on alpha: a short finished
    sequence wins at alpha = 0, a longer one once the length normalisation is strong enough."""
    model = tiny_model(5, vocab_size=V)
    for prompt, eos in (([2, 2], [3]), ([0, 1], [2]), ([1, 2], [2])):
        table = enumerate_sequences(model, prompt, L, eos)
        winners = []
        for alpha in (0.0, 1.0, 3.0):
            best_ids, _ = max(table.items(), key=lambda kv, a=alpha: normalised_score(kv[1][0], len(kv[0]), a))
            res = beam_search(model, prompt, width=(V - 1) ** L, length_penalty=alpha, max_tokens=L,
                              eos_token_ids=eos)
            h = res.hypotheses[0]
            assert tuple(h.token_ids) == best_ids, (prompt, alpha)
            assert h.score == pytest.approx(normalised_score(h.logprob, len(h.token_ids), alpha), abs=1e-9)
            assert h.finish_reason == ("stop" if best_ids[-1] in eos else "length")
            winners.append(best_ids)
        assert len(winners[0]) < len(winners[2])  # alpha = 0 favours short, alpha = 3 long
        assert len(set(winners)) > 1


@torch.inference_mode()
def test_beam_logprobs_match_rescoring_without_cache_and_early_stop_is_exact():
    """Scores of returned beams equal a from-scratch scoring (the reordered cache held the right history),
    and the stopping bound never changes the answer versus running to max length."""
    model = tiny_model(7, vocab_size=11)
    prompt = [3, 1, 4, 1, 5]
    res = beam_search(model, prompt, width=4, length_penalty=1.0, max_tokens=8, n=4, eos_token_ids=[0])
    for h in res.hypotheses:
        ids = prompt + h.token_ids
        lp = torch.log_softmax(model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), logits_at="all")[0],
                               -1)
        ref = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(h.token_ids))
        assert h.logprob == pytest.approx(ref, abs=1e-4)
    scores = [h.score for h in res.hypotheses]
    assert scores == sorted(scores, reverse=True)
    full = beam_search(model, prompt, width=4, length_penalty=1.0, max_tokens=8, n=4, eos_token_ids=[0],
                       early_stop=False)
    assert [h.token_ids for h in full.hypotheses] == [h.token_ids for h in res.hypotheses]
    assert full.forwards >= res.forwards


def test_params_run_through_the_pipeline_and_bad_values_are_named():
    model = tiny_model(3, vocab_size=V)
    res = beam_search(model, [1, 2], width=3, max_tokens=4, n=3,
                      params=SamplingParams(banned_token_ids=[2, 3], temperature=0.0))
    for h in res.hypotheses:
        assert not set(h.token_ids) & {2, 3}
    from logitlab.sampling import ParamError

    with pytest.raises(ParamError, match="n"):
        beam_search(model, [1], width=2, n=3)
    with pytest.raises(ParamError, match="beam_width"):
        beam_search(model, [1], width=0)


@pytest.mark.real_model
def test_real_model_beams_and_cli_path(real_engine):
    from logitlab.classify import continuation_logprobs
    from logitlab.decoding.modes import DriverOptions, generate_with_driver

    prompt = "The capital of France is"
    res, extra = generate_with_driver(real_engine, prompt, SamplingParams(temperature=0.0, max_tokens=6, n=3),
                                 DriverOptions(beam_width=3, length_penalty=1.0))
    assert len(res.choices) == 3 and extra["beam"]["scores"] == sorted(extra["beam"]["scores"], reverse=True)
    rescored = continuation_logprobs(real_engine, prompt, [c.token_ids for c in res.choices])
    for lp, lps in zip(extra["beam"]["logprobs"], rescored, strict=True):
        assert lp == pytest.approx(sum(lps), abs=2e-3)
    assert "Paris" in res.choices[0].text
