"""Exact tests of every processor and of the pipeline on hand-made logits.

Expected values come from the formulas, written out here in numpy (``ref_*``, float64), never from the
code under test. ``test_sampling_stats.py`` reuses these references as its target distributions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from logitlab.sampling import SamplingBatch, SamplingParams, draw, process, sample
from logitlab.sampling import processors as P
from logitlab.sampling.rng import derive_seed, uniforms

INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (painful on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- numpy references (float64, straight from the formulas) -----------------------------------------

def np_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    e = np.zeros_like(x)
    e[finite] = np.exp(x[finite] - x[finite].max())
    return e / e.sum()


def _masked(logits, keep) -> np.ndarray:
    return np.where(keep, np.asarray(logits, dtype=np.float64), -np.inf)


def ref_top_k(logits, k):
    x = np.asarray(logits, dtype=np.float64)
    if k == 0 or k >= len(x):
        return x.copy()
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))  # value descending, then lowest id
    keep = np.zeros(len(x), bool)
    keep[order[:k]] = True
    return _masked(x, keep)


def ref_top_p(logits, p):
    if p >= 1:
        return np.asarray(logits, dtype=np.float64).copy()
    probs = np_softmax(logits)
    total, thr = 0.0, None
    for v in sorted(probs, reverse=True):
        total += v
        if total >= p:
            thr = v
            break
    if thr is None:  # rounding left the total just below p: keep all
        thr = min(v for v in probs if v > 0)
    return _masked(logits, (probs >= thr) & (probs > 0))


def ref_min_p(logits, m):
    if m == 0:
        return np.asarray(logits, dtype=np.float64).copy()
    probs = np_softmax(logits)
    return _masked(logits, probs >= m * probs.max())


def ref_typical(logits, mass):
    """Hugging Face TypicalLogitsWarper, transcribed."""
    x = np.asarray(logits, dtype=np.float64)
    if mass >= 1:
        return x.copy()
    probs = np_softmax(x)
    logp = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), -np.inf)
    ent = -np.sum(probs[probs > 0] * logp[probs > 0])
    dev = np.where(probs > 0, np.abs(-logp - ent), np.inf)
    order = np.argsort(dev, kind="stable")
    cum = np.cumsum(probs[order])
    last = min(int(np.sum(cum < mass)), len(x) - 1)
    return _masked(x, (dev <= dev[order][last]) & (probs > 0))


def ref_epsilon(logits, eps):
    x = np.asarray(logits, dtype=np.float64)
    if eps == 0:
        return x.copy()
    probs = np_softmax(x)
    return _masked(x, (probs >= eps) | (x == x.max()))


def ref_eta(logits, eta):
    x = np.asarray(logits, dtype=np.float64)
    if eta == 0:
        return x.copy()
    probs = np_softmax(x)
    nz = probs[probs > 0]
    ent = -np.sum(nz * np.log(nz))
    thr = min(eta, math.sqrt(eta) * math.exp(-ent))
    return _masked(x, (probs >= thr) | (x == x.max()))


def ref_repetition(logits, seen, r):
    x = np.asarray(logits, dtype=np.float64)
    pen = np.where(x > 0, x / r, x * r)
    return np.where(np.asarray(seen, bool), pen, x)


def ref_freq_presence(logits, counts, f, p):
    c = np.asarray(counts, dtype=np.float64)
    return np.asarray(logits, dtype=np.float64) - f * c - p * (c > 0)


def ref_temperature_penalty(logits, counts, f, p):
    x = np.asarray(logits, dtype=np.float64)
    if f == 0 and p == 0:
        return x.copy()
    c = np.asarray(counts, dtype=np.float64)
    k = 1 + f * c + p * (c > 0)
    finite = np.isfinite(x)
    shifted = x - x[finite].min()
    return np.where(finite, shifted / k, x)


def ref_pipeline(logits, p: SamplingParams, output_counts=None, prompt_counts=None, eos=(), num_generated=0):
    """The documented order, in numpy: final probabilities [V]."""
    x = np.asarray(logits, dtype=np.float64).copy()
    V = len(x)
    out_c = np.zeros(V) if output_counts is None else np.asarray(output_counts, dtype=np.float64)
    pr_c = np.zeros(V) if prompt_counts is None else np.asarray(prompt_counts, dtype=np.float64)
    if p.allowed_token_ids is not None:
        keep = np.zeros(V, bool)
        keep[list(p.allowed_token_ids)] = True
        x[~keep] = -np.inf
    if p.banned_token_ids:
        x[list(p.banned_token_ids)] = -np.inf
    if num_generated < p.min_tokens:
        x[list(eos)] = -np.inf
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    counts = out_c + (pr_c if p.penalize_prompt else 0)
    x = ref_repetition(x, (out_c + pr_c) > 0, p.repetition_penalty)
    x = ref_freq_presence(x, counts, p.frequency_penalty, p.presence_penalty)
    x = ref_temperature_penalty(x, counts, p.temperature_frequency_penalty, p.temperature_presence_penalty)
    if p.temperature == 0:
        onehot = np.zeros(V)
        onehot[int(np.argmax(x))] = 1.0  # np.argmax: first maximal index
        return onehot
    x = x / p.temperature
    x = ref_top_k(x, p.top_k)
    x = ref_top_p(x, p.top_p)
    x = ref_min_p(x, p.min_p)
    x = ref_typical(x, p.typical_p)
    x = ref_epsilon(x, p.epsilon)
    x = ref_eta(x, p.eta)
    return np_softmax(x)


# ---- helpers ------------------------------------------------------------------------------------------

def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def kept(out: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in out]


def np_kept(x) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


def batch_of(*params, vocab, eos=(), seeds=None):
    seeds = list(range(len(params))) if seeds is None else seeds
    return SamplingBatch.build(list(params), seeds, vocab, list(eos))


def probs_of(params, logits, **kw):
    """process() for one row -> probabilities as numpy float64."""
    x = t([logits])
    b = batch_of(params, vocab=x.shape[1], eos=kw.pop("eos", ()))
    return process(x, b, **kw)[0].double().exp().numpy()


# probabilities 0.5, 0.3, 0.15, 0.05 put in a shuffled order, so that sorted order != id order
PROBS4 = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS4 = np.log(PROBS4).tolist()


# ---- top-k --------------------------------------------------------------------------------------------

def test_top_k_keeps_the_k_largest_and_is_exact_with_ties():
    x = t([[1.0, 5.0, 3.0, 5.0, 2.0],  # k=2: the two 5s
           [4.0, 2.0, 2.0, 2.0, 1.0],  # k=3: 4 and two of the three tied 2s -> ids 1, 2 (lowest ids)
           [3.0, 7.0, 7.0, 7.0, 0.0],  # k=1 among three tied maxima -> id 1
           [1.0, 2.0, 3.0, 4.0, 5.0],  # k=5 >= V: everything
           [1.0, 2.0, 3.0, 4.0, 5.0],  # k=0: off
           [1.0, 2.0, 3.0, 4.0, 5.0]])  # k=9 > V
    k = torch.tensor([2, 3, 1, 5, 0, 9])
    out = P.top_k(x, k)
    assert kept(out) == [[1, 3], [0, 1, 2], [1], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    for row, kk in zip(x.tolist(), k.tolist(), strict=True):
        assert np_kept(ref_top_k(row, kk)) == kept(P.top_k(t([row]), torch.tensor([kk])))[0]
    assert torch.equal(out[torch.isfinite(out)], x[torch.isfinite(out)])  # kept values untouched


def test_top_k_with_fewer_finite_tokens_than_k():
    x = t([[-INF, 1.0, -INF, 0.0]])
    assert kept(P.top_k(x, torch.tensor([3]))) == [[1, 3]]


# ---- top-p --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, expected", [
    (1e-9, [1]),           # p tiny: only the most probable token
    (0.4, [1]),            # 0.5 already crosses 0.4
    (0.6, [1, 3]),         # 0.5 < 0.6, 0.5 + 0.3 crosses: the crossing token is kept
    (0.79, [1, 3]),
    (0.81, [0, 1, 3]),
    (0.96, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),   # off
])
def test_top_p_keeps_the_crossing_token(p, expected):
    out = P.top_p(t([LOGITS4]), torch.tensor([p], dtype=torch.float64))
    assert kept(out) == [expected]
    assert np_kept(ref_top_p(LOGITS4, p)) == expected


def test_top_p_ties_with_the_crossing_token_are_all_kept():
    logits = np.log([0.2, 0.4, 0.2, 0.2]).tolist()  # p=0.5 crosses inside the tie group of 0.2s
    out = P.top_p(t([logits]), torch.tensor([0.5], dtype=torch.float64))
    assert kept(out) == [[0, 1, 2, 3]] == [np_kept(ref_top_p(logits, 0.5))]


@pytest.mark.parametrize("scale", [0.01, 0.6, 4.0])  # mass over ~all tokens / thousands / a few
def test_top_p_and_typical_bounded_topk_equals_the_full_sort(scale, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6000, generator=g) * scale
    for mass in (0.2, 0.9, 0.995):
        m = torch.full((2,), mass, dtype=torch.float64)
        fast_p, fast_t = P.top_p(x, m), P.typical(x, m)
        with monkeypatch.context() as mp:
            mp.setattr(P, "PREFIX_GUESSES", ())
            sort_p, sort_t = P.top_p(x, m), P.typical(x, m)
        assert kept(fast_p) == kept(sort_p) and kept(fast_t) == kept(sort_t)
        for i in range(2):
            assert kept(fast_p[i:i + 1])[0] == np_kept(ref_top_p(x[i].tolist(), mass))
            assert kept(fast_t[i:i + 1])[0] == np_kept(ref_typical(x[i].tolist(), mass))


def test_top_p_rows_take_their_own_prefix_guess(monkeypatch):
    """Peaked, spread and flat rows in one batch: each row's kept set is the full sort's (the flat row's mass
    is beyond every bounded prefix, the spread one's beyond the first), as when the row is alone."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6000, generator=g) * torch.tensor([[4.0], [0.6], [0.01]])
    m = torch.tensor([0.9, 0.995, 0.9], dtype=torch.float64)
    calls = []
    topk = P.topk

    def counted(key, k, largest=True):
        calls.append((key.shape[0], k))
        return topk(key, k, largest)

    monkeypatch.setattr(P, "topk", counted)
    fast_p, fast_t = P.top_p(x, m), P.typical(x, m)
    assert (3, 256) in calls and (1, 256) not in calls and any(rows < 3 for rows, k in calls if k > 256)
    monkeypatch.setattr(P, "PREFIX_GUESSES", ())
    assert kept(fast_p) == kept(P.top_p(x, m)) and kept(fast_t) == kept(P.typical(x, m))
    for i in range(3):
        assert kept(fast_p[i:i + 1])[0] == np_kept(ref_top_p(x[i].tolist(), float(m[i])))


# ---- min-p, typical, epsilon, eta ---------------------------------------------------------------------

@pytest.mark.parametrize("m, expected", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 3]), (0.5, [1, 3]), (1.0, [1])])
def test_min_p(m, expected):
    assert kept(P.min_p(t([LOGITS4]), torch.tensor([m], dtype=torch.float64))) == [expected]
    assert np_kept(ref_min_p(LOGITS4, m)) == expected


def test_min_p_one_keeps_all_tied_maxima():
    assert kept(P.min_p(t([[2.0, 5.0, 5.0, 1.0]]), torch.tensor([1.0], dtype=torch.float64))) == [[1, 2]]


def test_typical_prefers_tokens_near_the_entropy():
    # one dominant token and a long flat tail: H = 2.71, |-log 0.4 - H| = 1.80 > |-log 0.02 - H| = 1.20,
    # so the dominant token is LESS typical than the tail ones; the crossing falls inside the tied tail
    logits = np.log([0.4] + [0.02] * 30).tolist()
    out = P.typical(t([logits]), torch.tensor([0.3], dtype=torch.float64))
    assert kept(out) == [np_kept(ref_typical(logits, 0.3))] == [list(range(1, 31))]  # ties all kept
    # with a mass beyond the tail's 0.6 the dominant token joins
    out = P.typical(t([logits]), torch.tensor([0.7], dtype=torch.float64))
    assert kept(out) == [list(range(31))]


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_typical_matches_the_hf_algorithm(mass):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 300, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    out = P.typical(x, torch.full((4,), mass, dtype=torch.float64))
    for i in range(4):
        assert kept(out[i:i + 1])[0] == np_kept(ref_typical(x[i].tolist(), mass))


@pytest.mark.parametrize("eps, expected", [(0.0, [0, 1, 2, 3]), (0.1, [0, 1, 3]), (0.2, [1, 3]), (0.9, [1])])
def test_epsilon(eps, expected):
    assert kept(P.epsilon(t([LOGITS4]), torch.tensor([eps], dtype=torch.float64))) == [expected]
    assert np_kept(ref_epsilon(LOGITS4, eps)) == expected


def test_eta_threshold_is_min_of_eta_and_entropy_term():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, generator=g) * torch.tensor([[0.3], [12.0]])  # high- and low-entropy rows
    for e in (0.0005, 0.002, 0.05, 0.3):
        out = P.eta(x, torch.full((2,), e, dtype=torch.float64))
        for i in range(2):
            assert kept(out[i:i + 1])[0] == np_kept(ref_eta(x[i].tolist(), e))
    # both branches of the min are exercised by these rows
    h = [-(pr * np.log(pr)).sum() for pr in (np_softmax(r.tolist()) for r in x)]
    assert math.sqrt(0.05) * math.exp(-h[0]) < 0.05 < math.sqrt(0.05) * math.exp(-h[1])


def test_eta_and_epsilon_always_keep_the_argmax():
    flat = t([[0.0] * 10])  # every p = 0.1 < eps, all tied at the max: all stay
    assert kept(P.epsilon(flat, torch.tensor([0.5], dtype=torch.float64))) == [list(range(10))]
    x = t([[0.0, 1.0, 2.0, 0.5]])
    assert kept(P.epsilon(x, torch.tensor([0.9], dtype=torch.float64))) == [[2]]
    assert kept(P.eta(x, torch.tensor([0.9], dtype=torch.float64))) == [[2]]
    assert np_kept(ref_eta(x[0].tolist(), 0.9)) == [2]


# ---- penalties, bias, masks, temperature --------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    x = t([[2.0, -2.0, 2.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = P.repetition_penalty(x, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    np.testing.assert_allclose(out[0].numpy(), ref_repetition(x[0].tolist(), seen[0].tolist(), 2.0))


def test_frequency_and_presence_penalties():
    x = t([[1.0, 1.0, 1.0, -1.0]])
    counts = torch.tensor([[0, 1, 3, 2]], dtype=torch.int32)
    out = P.frequency_presence_penalty(x, counts, torch.tensor([0.5]), torch.tensor([1.0]))
    np.testing.assert_allclose(out[0].numpy(), [1.0, -0.5, -1.5, -3.0])
    np.testing.assert_allclose(out[0].numpy(), ref_freq_presence(x[0].tolist(), counts[0].tolist(), 0.5, 1.0))


def test_temperature_penalty_shifts_to_non_negative_then_divides():
    x = t([[-1.0, 2.0, 0.5, -INF, -3.0]])
    counts = torch.tensor([[2, 1, 0, 5, 1]], dtype=torch.int32)
    out = P.temperature_penalty(x, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    # min finite logit is -3: shifted [2, 5, 3.5, -inf, 0]; k = [2.25, 1.75, 1, ., 1.75]
    np.testing.assert_allclose(out[0].numpy(), [2 / 2.25, 5 / 1.75, 3.5, -INF, 0.0], rtol=1e-6)
    ref = ref_temperature_penalty(x[0].tolist(), counts[0].tolist(), 0.5, 0.25)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-6)
    # a penalised token always loses probability relative to an unpenalised one (the reason for the shift)
    before, after = np_softmax(x[0].tolist()), np_softmax(out[0].tolist())
    assert after[0] / after[2] < before[0] / before[2] and after[1] / after[2] < before[1] / before[2]


def test_temperature_penalty_on_all_negative_logits_still_penalises():
    x = t([[-5.0, -1.0, -2.0]])
    counts = torch.tensor([[0, 3, 0]], dtype=torch.int32)
    out = P.temperature_penalty(x, counts, torch.tensor([1.0]), torch.tensor([0.0]))
    p_before, p_after = np_softmax(x[0].tolist()), np_softmax(out[0].tolist())
    assert p_after[1] < p_before[1]
    naive = np_softmax((x[0] / torch.tensor([1.0, 4.0, 1.0])).tolist())  # without the shift: rewarded
    assert naive[1] > p_before[1]


def test_logit_bias_and_masks():
    x = t([[0.0, 1.0, 2.0, 3.0]])
    bias = t([[0.0, 5.0, 0.0, -100.0]])
    assert P.logit_bias(x, bias).tolist() == [[0.0, 6.0, 2.0, -97.0]]
    allowed = torch.tensor([[False, True, True, True]])
    banned = torch.tensor([[False, False, True, False]])
    assert kept(P.mask_tokens(x, allowed, banned)) == [[1, 3]]


def test_temperature_divides_and_never_overflows():
    x = t([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    out = P.temperature(x, torch.tensor([0.5, 1e-30]))
    np.testing.assert_allclose(np_softmax(out[0].tolist()), np_softmax([2.0, 4.0, -2.0]), rtol=1e-6)
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    assert np_softmax(out[1].tolist()).tolist() == [0.0, 1.0, 0.0]


# ---- the pipeline -------------------------------------------------------------------------------------

def test_inputs_are_never_mutated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g)
    x[0, 3] = float("nan")
    x[1, 4] = INF
    counts = torch.randint(0, 3, (3, 50), generator=g, dtype=torch.int32)
    prompt = torch.randint(0, 2, (3, 50), generator=g, dtype=torch.int32)
    keep = (x.clone(), counts.clone(), prompt.clone())
    k, pp = torch.tensor([5, 0, 50]), torch.tensor([0.5, 1.0, 0.9], dtype=torch.float64)
    f, pr = torch.tensor([1.0, 0, 1]), torch.tensor([1.0, 0, 0])
    for fn in (lambda: P.top_k(x, k), lambda: P.top_p(x.nan_to_num(), pp), lambda: P.min_p(x, pp),
               lambda: P.typical(x.nan_to_num(), pp), lambda: P.epsilon(x, pp * 0.01),
               lambda: P.eta(x.nan_to_num(), pp * 0.01), lambda: P.temperature(x, torch.tensor([0.5, 1, 2])),
               lambda: P.repetition_penalty(x, counts > 0, torch.tensor([1.5, 1.0, 0.5])),
               lambda: P.frequency_presence_penalty(x, counts, f, pr),
               lambda: P.temperature_penalty(x, counts, f, pr)):
        fn()
    params = [SamplingParams(top_k=5, top_p=0.9, min_p=0.01, typical_p=0.9, epsilon=1e-3, eta=1e-3,
                             repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5,
                             temperature_frequency_penalty=0.3, logit_bias={1: 3.0}, banned_token_ids=[2],
                             penalize_prompt=True, temperature=0.7),
              SamplingParams(temperature=0), SamplingParams(allowed_token_ids=[1, 2, 3], min_tokens=2)]
    b = batch_of(*params, vocab=50, eos=[0])
    sample(x, b, output_counts=counts, prompt_counts=prompt, num_generated=torch.tensor([0, 1, 0]),
           num_logprobs=3, explain=True)
    process(x, b, output_counts=counts, prompt_counts=prompt)
    for before, after in zip(keep, (x, counts, prompt), strict=True):  # bit for bit, NaN where NaN was
        np.testing.assert_array_equal(after.numpy(), before.numpy())
    assert torch.isnan(x[0, 3]) and torch.isposinf(x[1, 4])


MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.6, top_k=7),
    SamplingParams(top_p=0.7, temperature=1.3),
    SamplingParams(min_p=0.1),
    SamplingParams(typical_p=0.6),
    SamplingParams(epsilon=0.01),
    SamplingParams(eta=0.01),
    SamplingParams(temperature=0),
    SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=-0.4,
                   penalize_prompt=True),
    SamplingParams(temperature_frequency_penalty=0.5, temperature_presence_penalty=0.5, top_k=20),
    SamplingParams(logit_bias={3: 4.0, 5: -100.0}, allowed_token_ids=list(range(30)), banned_token_ids=[4]),
    SamplingParams(top_k=10, top_p=0.8, min_p=0.05, typical_p=0.95, epsilon=1e-3, eta=1e-3, temperature=0.8),
]


def _mixed_inputs(V=40):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(len(MIXED), V, generator=g) * 2
    counts = torch.randint(0, 3, (len(MIXED), V), generator=g, dtype=torch.int32)
    prompt = torch.randint(0, 2, (len(MIXED), V), generator=g, dtype=torch.int32)
    return x, counts, prompt


def test_pipeline_matches_the_numpy_reference_row_by_row():
    x, counts, prompt = _mixed_inputs()
    b = batch_of(*MIXED, vocab=x.shape[1])
    probs = process(x, b, output_counts=counts, prompt_counts=prompt).double().exp().numpy()
    for i, p in enumerate(MIXED):
        ref = ref_pipeline(x[i].tolist(), p, counts[i].tolist(), prompt[i].tolist())
        assert np.flatnonzero(probs[i] > 0).tolist() == np.flatnonzero(ref > 0).tolist(), i
        np.testing.assert_allclose(probs[i], ref, atol=2e-6, err_msg=str(i))


def test_rows_in_a_mixed_batch_equal_the_rows_processed_alone():
    x, counts, prompt = _mixed_inputs()
    seeds = [derive_seed(5, i) for i in range(len(MIXED))]
    b = batch_of(*MIXED, vocab=x.shape[1], seeds=seeds)
    ng = torch.arange(len(MIXED))
    together = process(x, b, output_counts=counts, prompt_counts=prompt, num_generated=ng)
    out = sample(x, b, output_counts=counts, prompt_counts=prompt, num_generated=ng)
    for i, p in enumerate(MIXED):
        bi = batch_of(p, vocab=x.shape[1], seeds=[seeds[i]])
        kw = dict(output_counts=counts[i:i + 1], prompt_counts=prompt[i:i + 1], num_generated=ng[i:i + 1])
        alone = process(x[i:i + 1], bi, **kw)
        assert torch.equal(torch.isfinite(alone[0]), torch.isfinite(together[i]))
        np.testing.assert_allclose(alone[0].numpy(), together[i].numpy(), atol=1e-6, rtol=1e-6)
        assert sample(x[i:i + 1], bi, **kw).tokens.item() == out.tokens[i].item()


COMPACT = [  # every sampled row uses top-k: the pipeline works on [B, K] candidate columns
    SamplingParams(top_k=7, temperature=0.6),
    SamplingParams(top_k=20, top_p=0.7, temperature=1.3, logprobs_mode="processed"),
    SamplingParams(top_k=15, min_p=0.1, typical_p=0.8, repetition_penalty=1.3, frequency_penalty=0.4),
    SamplingParams(top_k=25, epsilon=0.02, eta=0.02, logit_bias={3: 4.0}, banned_token_ids=[4]),
    SamplingParams(temperature=0, logprobs_mode="processed"),
    SamplingParams(top_k=1, temperature=0.3),
]


def test_compact_top_k_path_equals_the_full_path():
    x, counts, prompt = _mixed_inputs()
    x, counts, prompt = (v[: len(COMPACT)] for v in (x, counts, prompt))
    b = batch_of(*COMPACT, vocab=x.shape[1])
    assert b.compact_k == 25
    full = dataclasses.replace(b, compact_k=0)
    kw = dict(output_counts=counts, prompt_counts=prompt)
    fast, slow = process(x, b, **kw), process(x, full, **kw)
    assert kept(fast) == kept(slow)
    np.testing.assert_allclose(fast.exp().numpy(), slow.exp().numpy(), atol=1e-6)
    for i, p in enumerate(COMPACT):
        ref = ref_pipeline(x[i].tolist(), p, counts[i].tolist(), prompt[i].tolist())
        np.testing.assert_allclose(fast[i].double().exp().numpy(), ref, atol=2e-6)
    # the same uniform picks the same token on both paths (candidates are kept in token-id order)
    for u in torch.linspace(0.0, 0.999, 37, dtype=torch.float64):
        uu = u.expand(len(COMPACT))
        a = sample(x, b, **kw, uniforms=uu, num_logprobs=4)
        c = sample(x, full, **kw, uniforms=uu, num_logprobs=4)
        assert a.tokens.tolist() == c.tokens.tolist()
        np.testing.assert_allclose(a.processed_logprobs.numpy(), c.processed_logprobs.numpy(), atol=1e-6)
        assert torch.equal(a.top_ids, c.top_ids)
        np.testing.assert_allclose(a.top_logprobs.numpy(), c.top_logprobs.numpy(), atol=1e-6)


def test_compact_path_ties_and_greedy():
    # row 0: top-k=2 with a tie at the boundary -> exact rule (lowest ids); row 1: greedy with 4 tied
    # maxima, more than the batch's K: the lowest id all the same
    x = t([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0], [0.0, 5.0, 1.0, 5.0, 5.0, 5.0]])
    b = batch_of(SamplingParams(top_k=2), SamplingParams(temperature=0), vocab=6)
    assert b.compact_k == 2
    assert kept(process(x, b)) == [[1, 3], [1]]
    x2 = t([[1.0, 3.0, 2.0, 2.5, 3.5, 0.0], [0.0, 5.0, 1.0, 5.0, 5.0, 5.0]])  # no tie: compact path
    out = sample(x2, b, num_logprobs=2, uniforms=torch.tensor([0.99, 0.5], dtype=torch.float64))
    assert kept(process(x2, b)) == [[1, 4], [1]] and out.tokens.tolist() == [4, 1]
    assert out.processed_logprobs[1].item() == 0.0
    # many ties (torch.topk does not return them in id order here): still the k lowest ids
    g = torch.Generator().manual_seed(0)
    x3 = torch.randint(0, 3, (2, 3000), generator=g).float()
    b3 = batch_of(SamplingParams(top_k=500), SamplingParams(top_k=40, top_p=0.5), vocab=3000)
    assert b3.compact_k == 500
    twos = [(r == 2).nonzero().flatten().tolist() for r in x3]
    assert kept(process(x3, b3)) == [twos[0][:500], twos[1][:40]]
    assert kept(P.top_k(x3, torch.tensor([500, 40]))) == [twos[0][:500], twos[1][:40]]


def test_greedy_is_the_argmax_of_the_processed_logits_with_ties_to_the_lowest_id():
    x = t([[1.0, 3.0, 3.0, 2.0]])
    out = sample(x, batch_of(SamplingParams(temperature=0), vocab=4))
    assert out.tokens.tolist() == [1] and out.processed_logprobs.tolist() == [0.0]
    assert process(x, batch_of(SamplingParams(temperature=0), vocab=4)).exp().tolist() == [[0, 1, 0, 0]]
    # penalties act before greedy: token 1 was generated, so 2 wins
    counts = torch.tensor([[0, 1, 0, 0]], dtype=torch.int32)
    b = batch_of(SamplingParams(temperature=0, presence_penalty=0.5), vocab=4)
    out = sample(x, b, output_counts=counts)
    assert out.tokens.tolist() == [2]
    # truncation knobs are irrelevant for greedy rows; many seeds, always the same token
    b = batch_of(*[SamplingParams(temperature=0, top_p=0.1, top_k=3)] * 50, vocab=4, seeds=list(range(50)))
    assert sample(x.expand(50, 4), b).tokens.unique().tolist() == [1]


def test_min_tokens_masks_eos_then_unmasks():
    x = t([[5.0, 0.0, 0.0]] * 3)  # EOS (id 0) is by far the most likely
    b = batch_of(*[SamplingParams(temperature=0, min_tokens=2)] * 3, vocab=3, eos=[0])
    out = sample(x, b, num_generated=torch.tensor([0, 1, 2]))
    assert out.tokens.tolist() == [1, 1, 0]
    lp = process(x, batch_of(*[SamplingParams(min_tokens=2)] * 3, vocab=3, eos=[0]),
                 num_generated=torch.tensor([0, 1, 2]))
    assert kept(lp) == [[1, 2], [1, 2], [0, 1, 2]]


def test_allowed_banned_and_bias_through_the_pipeline():
    p = SamplingParams(allowed_token_ids=[1, 2, 3], banned_token_ids=[2], logit_bias={3: 2.0, 0: 50.0})
    pr = probs_of(p, [0.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(pr, ref_pipeline([0.0] * 5, p), atol=1e-7)
    assert np.flatnonzero(pr).tolist() == [1, 3]  # bias on a disallowed token does not revive it


def test_everything_masked_or_nan_fails_with_a_valid_token():
    x = t([[0.0, 1.0, 2.0], [float("nan")] * 3, [-INF] * 3, [0.5, float("nan"), 0.1]])
    params = [SamplingParams(allowed_token_ids=[0], banned_token_ids=[0, 1]),  # validate() would refuse
              SamplingParams(), SamplingParams(top_p=0.5, temperature=0.5), SamplingParams()]
    b = batch_of(*params, vocab=3)
    out = sample(x, b, num_logprobs=2, explain=True)
    assert out.failed.tolist() == [True, True, True, False]
    assert ((out.tokens >= 0) & (out.tokens < 3)).all()
    for v in (out.logprobs, out.raw_logprobs, out.processed_logprobs, out.top_logprobs):
        assert not torch.isnan(v).any()
    lp = process(x, b)
    assert torch.isneginf(lp[:3]).all() and not torch.isnan(lp).any()
    assert out.tokens[3].item() in (0, 2) and torch.isneginf(lp[3, 1])  # NaN counts as -inf
    assert draw(lp[:3], torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)).tolist() == [0, 0, 0]


def test_positive_infinity_keeps_only_those_tokens_without_nan():
    x = t([[0.0, INF, 3.0, INF], [1.0, INF, 2.0, 0.0]])
    params = [SamplingParams(temperature=0.5, top_p=0.9, repetition_penalty=1.5,
                             temperature_frequency_penalty=1),
              SamplingParams(banned_token_ids=[1])]
    b = batch_of(*params, vocab=4)
    counts = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    lp = process(x, b, output_counts=counts)
    assert not torch.isnan(lp).any()
    np.testing.assert_allclose(lp[0].exp().numpy(), [0, 0.5, 0, 0.5], atol=1e-6)
    np.testing.assert_allclose(lp[1].exp().numpy(), np_softmax([1.0, -INF, 2.0, 0.0]), atol=1e-6)
    out = sample(x, b, output_counts=counts, num_logprobs=2)
    assert not out.failed.any() and out.tokens[0].item() in (1, 3) and out.tokens[1].item() != 1
    assert not torch.isnan(out.raw_logprobs).any()


def test_draw_is_the_inverse_cdf_and_never_picks_a_zero_probability_token():
    lp = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0]] * 6, dtype=torch.float64).log()
    u = torch.tensor([0.0, 0.1999, 0.2, 0.69, 0.71, 1 - 2**-53], dtype=torch.float64)
    assert draw(lp, u).tolist() == [0, 0, 2, 2, 3, 3]
    # unnormalised and trailing zero-probability tokens
    lp = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64).log()
    assert draw(lp, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [1]


def test_draw_matches_a_flat_inverse_cdf_in_numpy():
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(400, 1000, generator=g) * 2  # 1000 is not a multiple of the draw's block size
    lp[::3, 200:900] = -INF  # whole blocks without mass
    lp[1::5, :990] = -INF  # mass only at the very end
    lp = torch.log_softmax(lp, -1)
    u = torch.rand(400, generator=g, dtype=torch.float64)
    u[:20] = 1 - 2**-53
    got = draw(lp, u).numpy()
    probs = torch.softmax(lp, -1).double().numpy()
    cdf = np.cumsum(probs, axis=1)
    want = [int(np.searchsorted(c, ui * c[-1], side="right")) for c, ui in zip(cdf, u.numpy(), strict=True)]
    want = [w if w < 1000 else int(np.flatnonzero(pr)[-1]) for w, pr in zip(want, probs, strict=True)]
    assert got.tolist() == want
    assert (probs[np.arange(400), got] > 0).all()


def test_logprobs_raw_and_processed():
    x = t([LOGITS4 + [-2.0], LOGITS4 + [-2.0]])
    params = [SamplingParams(top_k=2, logprobs=3),
              SamplingParams(top_k=2, logprobs=3, logprobs_mode="processed")]
    b = batch_of(*params, vocab=5)
    u = torch.tensor([0.99, 0.99], dtype=torch.float64)  # -> the second most probable kept token: id 3
    out = sample(x, b, num_logprobs=3, uniforms=u)
    raw = np.log(np_softmax(x[0].tolist()))
    with np.errstate(divide="ignore"):
        proc = np.log(ref_pipeline(x[0].tolist(), params[0]))
    assert out.tokens.tolist() == [3, 3]
    np.testing.assert_allclose(out.raw_logprobs.numpy(), [raw[3]] * 2, rtol=1e-5)
    np.testing.assert_allclose(out.processed_logprobs.numpy(), [proc[3]] * 2, rtol=1e-5)
    np.testing.assert_allclose(out.logprobs.numpy(), [raw[3], proc[3]], rtol=1e-5)
    assert out.top_ids.tolist() == [[1, 3, 0], [1, 3, out.top_ids[1, 2].item()]]
    np.testing.assert_allclose(out.top_logprobs[0].numpy(), raw[[1, 3, 0]], rtol=1e-5)
    np.testing.assert_allclose(out.top_logprobs[1, :2].numpy(), proc[[1, 3]], rtol=1e-5)
    assert torch.isneginf(out.top_logprobs[1, 2])


def test_trace_reports_kept_and_removed_mass_per_stage():
    x = t([LOGITS4])
    p = SamplingParams(top_k=3, top_p=0.6, explain=True)
    out = sample(x, batch_of(p, vocab=4), explain=True, uniforms=torch.tensor([0.0], dtype=torch.float64))
    stages = {s["stage"]: s for s in out.trace[0] if "stage" in s}
    assert stages["top_k"]["kept"] == 3
    assert stages["top_k"]["mass_removed"] == pytest.approx(0.05, abs=1e-6)
    # after top-k the distribution is renormalised: {0.5, 0.3, 0.15} / 0.95; top-p 0.6 removes 0.15 / 0.95
    assert stages["top_p"]["kept"] == 2
    assert stages["top_p"]["mass_removed"] == pytest.approx(0.15 / 0.95, abs=1e-6)
    final = out.trace[0][-1]
    assert final["token"] == 1 and final["rank"] == 1 and final["prob"] == pytest.approx(0.625, abs=1e-6)
    assert final["entropy"] == pytest.approx(-(0.625 * math.log(0.625) + 0.375 * math.log(0.375)), abs=1e-6)


# ---- seeds --------------------------------------------------------------------------------------------

def _run_steps(params, seeds, logits, steps=20):
    """Tokens of ``steps`` consecutive draws for each row (counts updated like a scheduler does)."""
    B, V = logits.shape
    b = batch_of(*params, vocab=V, seeds=seeds)
    counts = torch.zeros(B, V, dtype=torch.int32)
    toks = []
    for step in range(steps):
        out = sample(logits, b, output_counts=counts, num_generated=torch.full((B,), step))
        counts[torch.arange(B), out.tokens] += 1
        toks.append(out.tokens)
    return torch.stack(toks, 1).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    V = 64
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.2, top_p=0.95, frequency_penalty=0.3)
    alone = _run_steps([p], [1234], row)[0]
    other = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams(min_p=0.2)]
    g = torch.Generator().manual_seed(9)
    for pos in range(4):
        params = other[:pos] + [p] + other[pos:]
        seeds = [77, 78, 79][:pos] + [1234] + [80, 81, 82][pos:]
        logits = torch.randn(4, V, generator=g)
        logits[pos] = row[0]
        assert _run_steps(params, seeds, logits)[pos] == alone
    assert _run_steps([p], [1235], row)[0] != alone
    assert _run_steps([p], [derive_seed(1234, 1)], row)[0] != _run_steps([p], [derive_seed(1234, 0)], row)[0]


def test_same_seed_same_tokens_on_the_compact_and_the_full_path():
    V = 300
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(4)) * 2
    p = SamplingParams(top_k=40, top_p=0.9, temperature=0.9, presence_penalty=0.5)
    alone = _run_steps([p], [99], row, steps=30)[0]  # compact path (every sampled row uses top-k)
    assert batch_of(p, vocab=V).compact_k == 40
    for other in (SamplingParams(), SamplingParams(top_k=250), SamplingParams(temperature=0)):
        for pos in (0, 1):
            params, seeds = [other, other], [5, 6]
            params[pos], seeds[pos] = p, 99
            logits = torch.randn(2, V, generator=torch.Generator().manual_seed(pos))
            logits[pos] = row[0]
            assert _run_steps(params, seeds, logits, steps=30)[pos] == alone


def test_uniforms_match_a_scalar_splitmix64():
    M = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    def ref(seed, counter, stream):
        key = mix((seed + 0x9E3779B97F4A7C15 * (stream + 1)) & M)
        return (mix((key + counter * 0x9E3779B97F4A7C15) & M) >> 11) * 2.0**-53

    seeds = [0, 1, 2**62 + 12345, 2**63 - 1, 987654321]
    counters = [0, 1, 7, 2**40 + 3, 123456]
    for stream in (0, 1, 13):
        got = uniforms(torch.tensor(seeds), torch.tensor(counters), stream=stream).tolist()
        assert got == [ref(s, c, stream) for s, c in zip(seeds, counters, strict=True)]


@pytest.mark.parametrize("vocab", [257, 1000, 49152, 50001])
def test_first_argmax_is_torch_argmax_first_index_on_ties(vocab):
    """The two-level argmax the greedy path uses: the first index of each row's maximum, like torch's argmax,
    on tie-heavy rows (a few integer values), continuous rows, rows whose maximum sits in the padded last
    block, and rows without a finite logit."""
    from logitlab.sampling.sampler import first_argmax

    g = torch.Generator().manual_seed(vocab)
    ties = torch.randint(0, 4, (6, vocab), generator=g).float()
    smooth = torch.randn(6, vocab, generator=g)
    tail = torch.randn(2, vocab, generator=g)
    tail[:, -1] = 10.0  # in the last, padded block
    empty = torch.full((1, vocab), float("-inf"))
    for x in (ties, smooth, tail):
        assert torch.equal(first_argmax(x), x.argmax(-1))
    assert first_argmax(empty).tolist() == [0]


def test_greedy_batch_over_a_large_vocabulary_keeps_raw_logprobs_and_alternatives():
    """An all-greedy batch takes the one-column path: the lowest id among tied maxima, processed logprob 0,
    raw logprob and top alternatives those of log_softmax of the logits (penalties applied before)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=g) * 2
    x[0, [70, 4000]] = 9.0  # a tie: 70 wins
    x[1, 4999] = 9.0
    counts = torch.zeros(3, 5000, dtype=torch.int32)
    counts[2, x[2].argmax()] = 1
    b = batch_of(SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0, logprobs=3),
                 SamplingParams(temperature=0, logprobs=3, presence_penalty=50.0), vocab=5000)
    out = sample(x, b, num_logprobs=3, output_counts=counts)
    second = x[2].clone()
    second[x[2].argmax()] -= 50.0
    assert out.tokens.tolist() == [70, 4999, int(second.argmax())]
    assert out.processed_logprobs.tolist() == [0.0, 0.0, 0.0]
    ref = torch.log_softmax(x.double(), -1)
    torch.testing.assert_close(out.raw_logprobs.double(), ref.gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1),
                               rtol=0, atol=1e-5)
    top_v, top_i = ref.topk(3, -1)
    assert out.top_ids[1].tolist() == top_i[1].tolist()
    torch.testing.assert_close(out.top_logprobs.double(), top_v, rtol=0, atol=1e-5)
    lp = process(x, b, output_counts=counts)
    assert lp.exp().sum(-1).tolist() == [1.0, 1.0, 1.0] and lp[0, 70] == 0 and lp[2, out.tokens[2]] == 0
