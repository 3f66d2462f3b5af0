"""Statistical tests: the tokens ``sample`` draws follow the exact target distribution of every sampler.

For each setting, N rows of the same logits with distinct seeds go through ONE batched ``sample`` call;
the token counts are compared with the target distribution computed independently in numpy (the
``ref_*`` formulas of test_sampling_processors.py) by a chi-square test, cells with small expectation
pooled. Each test also checks its own power: a deliberately wrong target (no truncation, another
temperature, the crossing token excluded, ...) must be rejected. Tokens the target removes must never
be drawn. Fixed seeds, so the outcome is deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats
from test_sampling_processors import (
    np_softmax,
    ref_epsilon,
    ref_pipeline,
    ref_top_k,
    ref_top_p,
)

from logitlab.sampling import SamplingBatch, SamplingParams, sample
from logitlab.sampling.rng import derive_seed, uniforms

N = 30_000
ACCEPT = 1e-3  # the right target must not be rejected at this level
REJECT = 1e-6  # a wrong target must be rejected at this level
V = 40
LOGITS = np.random.default_rng(2024).normal(0.0, 1.5, V)
_cnt = np.random.default_rng(7)
OUTPUT_COUNTS = _cnt.integers(0, 4, V) * (_cnt.random(V) < 0.3)
PROMPT_COUNTS = _cnt.integers(0, 3, V) * (_cnt.random(V) < 0.3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pooled_chisquare(counts, target) -> float:
    """p-value of a chi-square goodness-of-fit test of ``counts`` against probabilities ``target``; cells
    are pooled in order of increasing expectation until each pooled cell expects >= 5 draws."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(target, dtype=np.float64) / np.sum(target) * counts.sum()
    obs_b, exp_b, acc_o, acc_e = [], [], 0.0, 0.0
    for i in np.argsort(expected, kind="stable"):
        acc_o, acc_e = acc_o + counts[i], acc_e + expected[i]
        if acc_e >= 5:
            obs_b.append(acc_o)
            exp_b.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_o or acc_e:
        obs_b[-1] += acc_o
        exp_b[-1] += acc_e
    assert len(obs_b) >= 2, "degenerate target: nothing to test"
    return float(stats.chisquare(obs_b, exp_b).pvalue)


def draw_counts(rows: list[SamplingParams], base_seed: int, n_per_row: int = N) -> list[np.ndarray]:
    """Token counts per distinct params in ``rows``, drawn in ONE ``sample`` call whose rows cycle
    through ``rows`` (so several settings share the batch), each row with its own seed."""
    params = [rows[i % len(rows)] for i in range(n_per_row * len(rows))]
    B = len(params)
    seeds = [derive_seed(base_seed, i) for i in range(B)]
    batch = SamplingBatch.build(params, seeds, V, eos_token_ids=[0])
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(B, V)
    out_c = torch.tensor(OUTPUT_COUNTS, dtype=torch.int32).expand(B, V)
    pr_c = torch.tensor(PROMPT_COUNTS, dtype=torch.int32).expand(B, V)
    out = sample(logits, batch, output_counts=out_c, prompt_counts=pr_c,
                 num_generated=torch.full((B,), 3, dtype=torch.long))
    assert not out.failed.any()
    toks = out.tokens.numpy()
    return [np.bincount(toks[j::len(rows)], minlength=V) for j in range(len(rows))]


def target(p: SamplingParams) -> np.ndarray:
    return ref_pipeline(LOGITS, p, OUTPUT_COUNTS, PROMPT_COUNTS, eos=[0], num_generated=3)


def check(counts: np.ndarray, p: SamplingParams, *wrong: np.ndarray) -> None:
    right = target(p)
    assert counts[right == 0].sum() == 0, "a removed token was drawn"
    p_right = pooled_chisquare(counts, right)
    p_wrong = [pooled_chisquare(counts, w) for w in wrong]
    print(f"p-value of the right target {p_right:.3g}; of the wrong ones {[f'{x:.2g}' for x in p_wrong]}")
    assert p_right > ACCEPT
    for w, pw in zip(wrong, p_wrong, strict=True):
        assert not np.allclose(w, right)
        assert pw < REJECT


def without(p: SamplingParams, **changes) -> np.ndarray:
    """The target of ``p`` with some knobs changed (a deliberately wrong target)."""
    return target(dataclasses.replace(p, **changes))


TRUNC_OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon=0.0, eta=0.0)


def test_temperature():
    p = SamplingParams(temperature=0.7)
    (c,) = draw_counts([p], 1)
    check(c, p, without(p, temperature=0.8), without(p, temperature=0.62))


def test_top_k():
    p = SamplingParams(top_k=8)
    (c,) = draw_counts([p], 2)
    assert (c > 0).sum() == 8
    check(c, p, without(p, top_k=0), without(p, top_k=9))


def test_top_p():
    p = SamplingParams(top_p=0.6)
    (c,) = draw_counts([p], 3)
    # wrong: the token crossing p excluded (keep only tokens whose mass BEFORE and including them < p)
    pr = np_softmax(LOGITS)
    order = np.argsort(-pr)
    excl = np.zeros(V)
    excl[order[np.cumsum(pr[order]) < 0.6]] = 1
    check(c, p, without(p, top_p=1.0), np_softmax(np.where(excl > 0, LOGITS, -np.inf)))


def test_min_p():
    p = SamplingParams(min_p=0.1)
    (c,) = draw_counts([p], 4)
    check(c, p, without(p, min_p=0.0), without(p, min_p=0.2))


def test_typical():
    # (not 0.5: ordering by DEcreasing |-log p - H| would then keep the very same set)
    p = SamplingParams(typical_p=0.7)
    (c,) = draw_counts([p], 5)
    check(c, p, without(p, typical_p=1.0), np_softmax(ref_top_p(LOGITS, 0.7)))


def test_epsilon():
    p = SamplingParams(epsilon=0.02)
    (c,) = draw_counts([p], 6)
    check(c, p, without(p, epsilon=0.0), without(p, epsilon=0.04))


def test_eta():
    p = SamplingParams(eta=0.1)
    (c,) = draw_counts([p], 7)
    # eta's threshold min(eta, sqrt(eta) exp(-H)) is well below eta here: plain epsilon=eta is wrong
    check(c, p, without(p, eta=0.0), np_softmax(ref_epsilon(LOGITS, 0.1)))


def test_top_k_top_p_temperature():
    p = SamplingParams(top_k=12, top_p=0.8, temperature=0.8)
    (c,) = draw_counts([p], 8)
    # wrong: truncation decided on the untempered distribution, then tempered
    check(c, p, without(p, temperature=1.0), np_softmax(ref_top_p(ref_top_k(LOGITS, 12), 0.8) / 0.8))


def test_penalties_and_temperature():
    p = SamplingParams(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
                       temperature_frequency_penalty=0.3, temperature_presence_penalty=0.2,
                       penalize_prompt=True)
    (c,) = draw_counts([p], 9)
    check(c, p, without(p, penalize_prompt=False), without(p, repetition_penalty=1.0),
          without(p, temperature_frequency_penalty=0.0, temperature_presence_penalty=0.0))


def test_logit_bias():
    p = SamplingParams(logit_bias={3: 2.0, 7: -1.5, 12: 3.0, 20: -100.0})
    (c,) = draw_counts([p], 10)
    assert c[20] == 0
    check(c, p, without(p, logit_bias=None), without(p, logit_bias={3: 2.0, 7: -1.5, 12: 2.5, 20: -100.0}))


def test_allowed_banned_min_tokens():
    p = SamplingParams(allowed_token_ids=list(range(0, 30)), banned_token_ids=[5, 6], min_tokens=5)
    (c,) = draw_counts([p], 11)
    assert c[[0, 5, 6]].sum() == 0 and c[30:].sum() == 0  # EOS (0) masked: 3 < min_tokens
    check(c, p, without(p, min_tokens=0), without(p, banned_token_ids=None))


def test_mixed_settings_in_one_batch():
    rows = [SamplingParams(top_k=5, temperature=1.5), SamplingParams(top_p=0.5, temperature=0.5),
            SamplingParams(min_p=0.05, typical_p=0.9, epsilon=0.005, eta=0.005),
            SamplingParams(temperature=0)]
    counts = draw_counts(rows, 12, n_per_row=10_000)
    for c, p in zip(counts[:3], rows[:3], strict=True):
        check(c, p, without(p, **TRUNC_OFF))
    assert counts[3][int(np.argmax(LOGITS))] == 10_000


# ---- the random numbers themselves ------------------------------------------------------------------

M = 200_000


def test_uniforms_are_uniform():
    u_counter = uniforms(torch.full((M,), 12345), torch.arange(M)).numpy()
    u_seed = uniforms(torch.arange(M), torch.zeros(M, dtype=torch.long)).numpy()  # consecutive seeds
    u_stream = uniforms(torch.full((M,), 7), torch.arange(M), stream=13).numpy()
    for u in (u_counter, u_seed, u_stream):
        assert u.min() >= 0.0 and u.max() < 1.0
        assert stats.kstest(u, "uniform").pvalue > ACCEPT
        assert stats.kstest(u**1.02, "uniform").pvalue < REJECT  # the test has power
    assert len(np.unique(u_counter)) == M


def _pairs_pvalue(a: np.ndarray, b: np.ndarray, bins: int = 16) -> float:
    h = np.histogram2d(a, b, bins=bins, range=[[0, 1], [0, 1]])[0].ravel()
    return float(stats.chisquare(h).pvalue)


def test_uniforms_are_independent_across_counters_seeds_and_streams():
    seeds, counters = torch.arange(M) * 3 + 5, torch.arange(M) % 1000
    base = uniforms(seeds, counters).numpy()
    next_counter = uniforms(seeds, counters + 1).numpy()
    next_seed = uniforms(seeds + 1, counters).numpy()
    other_stream = uniforms(seeds, counters, stream=1).numpy()
    derived = torch.tensor([derive_seed(s, 1) for s in range(M)])
    derived0 = torch.tensor([derive_seed(s, 0) for s in range(M)])
    zeros = torch.zeros(M, dtype=torch.long)
    pairs = [(base, next_counter), (base, next_seed), (base, other_stream),
             (uniforms(derived0, zeros).numpy(), uniforms(derived, zeros).numpy())]
    for a, b in pairs:
        assert _pairs_pvalue(a, b) > ACCEPT
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    assert _pairs_pvalue(base, np.clip(base + 0.02 * next_seed, 0, 0.999999)) < REJECT  # power


def test_uniforms_small_batches_hash_the_same_numbers_as_the_tensor_path():
    """Up to SMALL_BATCH rows the hash runs on Python integers; both paths give the SplitMix64 numbers the
    module's docstring defines (written out here from it), bit for bit, negative seeds included."""
    from logitlab.sampling import rng

    m64 = (1 << 64) - 1

    def mix(z):
        z &= m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    g = torch.Generator().manual_seed(5)
    seeds = torch.randint(-2**63, 2**63 - 1, (20,), generator=g, dtype=torch.long)
    counters = torch.randint(0, 2**40, (20,), generator=g, dtype=torch.long)
    for stream in (0, 3):
        ref = [(mix(mix(s + 0x9E3779B97F4A7C15 * (stream + 1)) + c * 0x9E3779B97F4A7C15) >> 11) / 2.0**53
               for s, c in zip(seeds.tolist(), counters.tolist(), strict=True)]
        assert 20 > rng.SMALL_BATCH
        assert uniforms(seeds, counters, stream).tolist() == ref  # the tensor path
        small = [uniforms(seeds[i: i + 2], counters[i: i + 2], stream) for i in range(0, 20, 2)]
        assert torch.cat(small).tolist() == ref
