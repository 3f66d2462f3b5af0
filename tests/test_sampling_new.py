"""The samplers of llama.cpp / text-generation-webui / transformers: top-n-sigma, XTC, DRY, Mirostat v1 and
v2, dynamic temperature and no_repeat_ngram_size -- as stages of the one pipeline.

Exact tests on hand-made logits and histories: every expected value is either written out by hand or
computed by the ``ref_*`` functions below, which transcribe the published algorithms (llama.cpp's
``llama-sampling.cpp``, text-generation-webui's ``DRYLogitsProcessor``, transformers'
``NoRepeatNGramLogitsProcessor``) in plain Python / numpy, never by the code under test. The stochastic
parts (XTC's coin, the draws of Mirostat and dynamic temperature) are checked by chi-square tests against
the exact target, each with a deliberately wrong target that must be rejected (power).
Then the plumbing: validation, Mirostat's state in the scheduler, the CLI flags and the HTTP fields.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_sampling_processors import np_softmax, ref_freq_presence, ref_top_k
from test_sampling_stats import ACCEPT, REJECT, pooled_chisquare

from logitlab.sampling import ParamError, SamplingBatch, SamplingParams, process, sample
from logitlab.sampling import history as H
from logitlab.sampling import mirostat as M
from logitlab.sampling import processors as P
from logitlab.sampling.rng import derive_seed

INF = float("inf")
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- references (plain Python / numpy, float64, from the published algorithms) -------------------------

def ref_top_n_sigma(logits, n):
    x = np.asarray(logits, dtype=np.float64)
    if n == 0:
        return x.copy()
    finite = x[np.isfinite(x)]
    return np.where(x >= finite.max() - n * finite.std(), x, -np.inf)  # np.std: population (ddof=0)


def ref_xtc_fired(logits, threshold):
    """llama.cpp's llama_sampler_xtc_apply once the coin says 'apply': sort by p, remove the tokens before
    the last one with p >= threshold (only if there are at least two such tokens)."""
    x = np.asarray(logits, dtype=np.float64)
    p = np_softmax(x)
    top = [i for i in sorted(range(len(x)), key=lambda i: -p[i]) if p[i] >= threshold and p[i] > 0]
    if len(top) < 2:
        return x.copy()
    least = min(p[i] for i in top)
    out = x.copy()
    out[[i for i in top if p[i] > least]] = -np.inf
    return out


def ref_dynatemp(logits, T, r, e):
    """llama.cpp's llama_sampler_temp_ext_apply (delta = r, exponent = e) over the finite tokens."""
    x = np.asarray(logits, dtype=np.float64)
    n = int(np.isfinite(x).sum())
    if r == 0 or n <= 1:
        return x / T
    p = np_softmax(x)
    ent = -sum(v * math.log(v) for v in p if v > 0)
    lo, hi = max(0.0, T - r), T + r
    t_dyn = lo + (hi - lo) * (ent / math.log(n)) ** e
    return x / t_dyn


def ref_mirostat_v2(logits, mu):
    """Keep the sorted prefix of tokens whose surprise -log2 p is <= mu (at least the first), renormalise."""
    x = np.asarray(logits, dtype=np.float64)
    p = np_softmax(x)
    keep = np.array([-math.log2(v) <= mu if v > 0 else False for v in p])
    if not keep.any():
        keep[int(np.argmax(p))] = True
    return np.where(keep, x, -np.inf)


def ref_mirostat_v1_k(logits, mu, n_vocab, m=100):
    """llama.cpp's llama_sampler_mirostat_apply: the k it truncates to."""
    p = np.sort(np_softmax(logits))[::-1]
    num = den = 0.0
    for i in range(min(m - 1, len(p) - 1)):
        t_i = math.log((i + 2) / (i + 1))
        b_i = math.log(p[i] / p[i + 1])
        num += t_i * b_i
        den += t_i * t_i
    s_hat = num / den
    eps = s_hat - 1
    k = ((eps * 2.0**mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
    return k, max(int(k), 1)


def ref_dry(ids, V, mult, base, allowed, last_n, breakers=()):
    """text-generation-webui's DRYLogitsProcessor for one row, transcribed; the webui's cap of 50 on the
    match length is replaced by llama.cpp's clamp of the exponent (what logitlab follows). Returns the
    penalty per token."""
    pen = np.zeros(V)
    if mult == 0 or last_n == 0 or not ids:
        return pen
    ids = list(ids[-last_n:]) if last_n > 0 else list(ids)
    last = ids[-1]
    if last in breakers:
        return pen
    match_lengths = {}
    for i, val in enumerate(ids[:-1]):
        if val != last:
            continue
        nxt = ids[i + 1]
        if nxt in breakers:
            continue
        n = 1
        while True:
            j = i - n
            if j < 0:
                break
            prev = ids[-(n + 1)]
            if ids[j] != prev or prev in breakers:
                break
            n += 1
        match_lengths[nxt] = max(n, match_lengths.get(nxt, 0))
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    for tok, n in match_lengths.items():
        if n >= allowed:
            e = n - allowed
            if max_exp > 0:
                e = min(e, max_exp)
            pen[tok] = mult * base**e
    return pen


def ref_no_repeat(ids, n):
    """transformers' _get_ngrams + _calc_banned_ngram_tokens for one row: the banned token ids."""
    if n == 0 or len(ids) + 1 < n:
        return set()
    ngrams = {}
    for ng in zip(*[ids[i:] for i in range(n)], strict=False):
        ngrams.setdefault(tuple(ng[:-1]), []).append(ng[-1])
    return set(ngrams.get(tuple(ids[len(ids) + 1 - n:]), []))


# ---- helpers -------------------------------------------------------------------------------------------

def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def kept(out: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in out]


def np_kept(x) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


def history_tensor(rows) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    h = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        h[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return h


def probs_of(p: SamplingParams, logits, **kw) -> np.ndarray:
    x = t([logits])
    b = SamplingBatch.build([p], [0], x.shape[1], [], token_texts=kw.pop("token_texts", None))
    return process(x, b, **kw)[0].double().exp().numpy()


# ---- top-n-sigma -----------------------------------------------------------------------------------------

def test_top_n_sigma_keeps_logits_within_n_std_of_the_max():
    # finite logits 4, 3, 1, 0, 2: mean 2, population variance (4+1+1+4+0)/5 = 2, sigma = 1.41421
    x = t([[4.0, 3.0, 1.0, 0.0, -INF, 2.0]] * 4)
    n = torch.tensor([1.0, 1.5, 3.0, 0.0], dtype=F64)
    out = P.top_n_sigma(x, n)
    # n=1: 4 - 1.414 = 2.586 -> {4, 3}; n=1.5: 4 - 2.121 = 1.879 -> {4, 3, 2}; n=3: 4 - 4.243 < 0 -> all
    assert kept(out) == [[0, 1], [0, 1, 5], [0, 1, 2, 3, 5], [0, 1, 2, 3, 5]]
    for i in range(4):
        assert kept(out[i:i + 1])[0] == np_kept(ref_top_n_sigma(x[i].tolist(), float(n[i])))
    assert torch.equal(out[3], x[3])  # off: bit for bit
    # scaling a row (any temperature) scales max and sigma alike: the same tokens stay
    assert kept(P.top_n_sigma(x / 0.37, n)) == kept(out)


def test_top_n_sigma_on_the_compact_top_k_path_equals_the_reference():
    g = np.random.default_rng(3)
    x = g.normal(0, 2, 300)
    p = SamplingParams(top_k=40, top_n_sigma=1.2, temperature=0.7)
    assert SamplingBatch.build([p], [0], 300, []).compact_k == 40  # the compact path is the one taken
    want = np_softmax(ref_top_k(ref_top_n_sigma(x / 0.7, 1.2), 40))
    assert (want > 0).sum() < 40  # top-n-sigma does cut inside the top 40
    np.testing.assert_allclose(probs_of(p, x.tolist()), want, rtol=1e-5, atol=1e-12)


# ---- XTC ----------------------------------------------------------------------------------------------

XTC_PROBS = np.array([0.05, 0.35, 0.1, 0.3, 0.2])
XTC_LOGITS = np.log(XTC_PROBS).tolist()


def test_xtc_removes_every_top_choice_but_the_least_probable():
    x = t([XTC_LOGITS] * 4)
    fire = torch.tensor([True, False, True, True])
    thr = torch.tensor([0.15, 0.15, 0.32, 0.6], dtype=F64)
    out = P.xtc(x, fire, thr)
    # 0.35, 0.3, 0.2 reach 0.15: 0.35 and 0.3 go, 0.2 (id 4) stays with the tokens below the threshold
    assert kept(out) == [[0, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert np_kept(ref_xtc_fired(XTC_LOGITS, 0.15)) == [0, 2, 4]
    assert torch.equal(out[1:], x[1:])  # coin not fired / a single top choice / nothing reaches 0.6
    np.testing.assert_allclose(np_softmax(out[0].tolist()), [0.05 / 0.35, 0, 0.1 / 0.35, 0, 0.2 / 0.35],
                               rtol=1e-6)


def test_xtc_keeps_every_token_tied_at_the_least_top_probability():
    x = t([np.log([0.3, 0.3, 0.4]).tolist(), np.log([0.45, 0.45, 0.1]).tolist()])
    out = P.xtc(x, torch.tensor([True, True]), torch.tensor([0.25, 0.25], dtype=F64))
    assert kept(out) == [[0, 1], [0, 1, 2]]  # 0.4 goes; two tied top choices are both the least: none go


def test_xtc_fires_as_often_as_its_probability_says():
    """Chi-square: N rows with distinct seeds draw from the mixture q * p_fired + (1 - q) * p."""
    q, n = 0.4, 30_000
    p = SamplingParams(xtc_probability=q, xtc_threshold=0.15)
    fired = np_softmax(ref_xtc_fired(XTC_LOGITS, 0.15))
    plain = np_softmax(XTC_LOGITS)
    counts = draw(p, XTC_LOGITS, n, base_seed=31)
    right = q * fired + (1 - q) * plain
    assert pooled_chisquare(counts, right) > ACCEPT
    for wrong in (fired, plain, 0.5 * fired + 0.5 * plain):
        assert pooled_chisquare(counts, wrong) < REJECT


# ---- dynamic temperature -----------------------------------------------------------------------------

def test_dynatemp_scales_the_temperature_by_the_normalised_entropy():
    x = [2.0, 1.0, 0.5, -1.0, -INF, 0.0]
    for T, r, e in [(0.8, 0.5, 1.0), (0.8, 0.5, 2.0), (1.0, 1.5, 0.5), (1.3, 0.2, 1.0)]:
        p = SamplingParams(temperature=T, dynatemp_range=r, dynatemp_exponent=e)
        np.testing.assert_allclose(probs_of(p, x), np_softmax(ref_dynatemp(x, T, r, e)), rtol=2e-5, atol=1e-9)
    # by hand for one case: 5 finite tokens, H / log 5 = h; T_dyn = 0.3 + 1.0 * h (T = 0.8, r = 0.5, e = 1)
    pr = np_softmax(x)
    h = -sum(v * math.log(v) for v in pr if v > 0) / math.log(5)
    t_dyn = 0.3 + 1.0 * h
    assert abs(t_dyn - 0.8) > 0.05  # the dynamic temperature really differs from T here
    np.testing.assert_allclose(probs_of(SamplingParams(temperature=0.8, dynatemp_range=0.5), x),
                               np_softmax(np.array(x) / t_dyn), rtol=2e-5, atol=1e-9)
    # range 0: the plain temperature; T = 0: greedy whatever the range
    np.testing.assert_allclose(probs_of(SamplingParams(temperature=0.8), x), np_softmax(np.array(x) / 0.8),
                               rtol=1e-5)
    assert probs_of(SamplingParams(temperature=0, dynatemp_range=1.0), x).tolist() == [1, 0, 0, 0, 0, 0]


def test_dynatemp_draws_follow_the_dynamic_temperature():
    x = np.random.default_rng(5).normal(0, 1.5, 40)
    p = SamplingParams(temperature=0.9, dynatemp_range=0.6, dynatemp_exponent=1.0)
    counts = draw(p, x.tolist(), 30_000, base_seed=41)
    assert pooled_chisquare(counts, np_softmax(ref_dynatemp(x, 0.9, 0.6, 1.0))) > ACCEPT
    for wrong_t in (0.9, 1.5, 0.3):  # plain T, T + r, T - r
        assert pooled_chisquare(counts, np_softmax(x / wrong_t)) < REJECT


# ---- Mirostat ---------------------------------------------------------------------------------------------

MIRO_PROBS = np.array([0.0625, 0.5, 0.125, 0.25, 0.0625])  # surprises 4, 1, 3, 2, 4 bits
MIRO_LOGITS = np.log(MIRO_PROBS).tolist()


@pytest.mark.parametrize("mu, expected", [(0.5, [1]), (1.5, [1]), (2.5, [1, 3]), (3.5, [1, 2, 3]),
                                          (4.5, [0, 1, 2, 3, 4])])
def test_mirostat_v2_keeps_the_tokens_whose_surprise_is_at_most_mu(mu, expected):
    out = M.mirostat(t([MIRO_LOGITS]), torch.tensor([2]), torch.tensor([mu], dtype=F64), 5)
    assert kept(out) == [expected]
    assert np_kept(ref_mirostat_v2(MIRO_LOGITS, mu)) == expected


def zipf_logits(V=300, s=1.1, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = -s * np.log(np.arange(1, V + 1)) + g.normal(0, 0.05, V)
    return x[g.permutation(V)]


@pytest.mark.parametrize("mu", [4.0, 6.5, 8.5])
def test_mirostat_v1_truncates_to_llama_cpps_k(mu):
    x = zipf_logits()
    k_float, k = ref_mirostat_v1_k(x, mu, 300)
    assert 2 <= k < 300 and abs(k_float - round(k_float)) > 1e-3  # not on a rounding edge
    got = M.mirostat_v1_k(t([x.tolist()]), torch.tensor([mu], dtype=F64), 300)
    assert got.tolist() == [k]
    p = SamplingParams(mirostat=1)
    probs = probs_of(p, x.tolist(), mirostat_mu=torch.tensor([mu], dtype=F64))
    np.testing.assert_allclose(probs, np_softmax(ref_top_k(x, k)), rtol=1e-5, atol=1e-12)


def test_mirostat_replaces_the_truncation_knobs_but_keeps_temperature():
    x = zipf_logits(V=40, seed=2)
    miro = SamplingParams(mirostat=2, temperature=0.7)
    both = dataclasses.replace(miro, top_k=1, top_p=0.2, min_p=0.5, typical_p=0.3, epsilon=0.2, eta=0.2,
                               top_n_sigma=0.1, xtc_probability=1.0, dynatemp_range=0.5)
    mu = torch.tensor([4.2], dtype=F64)
    want = np_softmax(ref_mirostat_v2(x / 0.7, 4.2))
    assert 1 < (want > 0).sum() < 40
    np.testing.assert_allclose(probs_of(miro, x.tolist(), mirostat_mu=mu), want, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(probs_of(both, x.tolist(), mirostat_mu=mu), want, rtol=1e-5, atol=1e-12)
    # without a state the first step's mu = 2 tau is used
    np.testing.assert_allclose(probs_of(SamplingParams(mirostat=2, mirostat_tau=2.1), x.tolist()),
                               np_softmax(ref_mirostat_v2(x, 4.2)), rtol=1e-5, atol=1e-12)


def test_mirostat_updates_mu_from_the_surprise_of_the_drawn_token():
    x = zipf_logits(V=120, seed=4)
    rows = [SamplingParams(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.1, temperature=0.8),
            SamplingParams(mirostat=1, mirostat_tau=5.0, mirostat_eta=0.3),
            SamplingParams(top_k=5),  # not Mirostat: mu passes through unchanged
            SamplingParams(mirostat=2, temperature=0)]  # greedy: Mirostat off, mu unchanged
    mu = torch.tensor([5.5, 7.0, 1.25, 3.0], dtype=F64)
    B = len(rows)
    batch = SamplingBatch.build(rows, [11, 12, 13, 14], 120, [])
    out = sample(t([x.tolist()] * B), batch, mirostat_mu=mu, num_generated=torch.full((B,), 2))
    tok = out.tokens.tolist()
    p0 = np_softmax(ref_mirostat_v2(x / 0.8, 5.5))
    _, k1 = ref_mirostat_v1_k(x, 7.0, 120)
    p1 = np_softmax(ref_top_k(x, k1))
    want0 = 5.5 - 0.1 * (-math.log2(p0[tok[0]]) - 3.0)
    want1 = 7.0 - 0.3 * (-math.log2(p1[tok[1]]) - 5.0)
    np.testing.assert_allclose(out.mirostat_mu.numpy(), [want0, want1, 1.25, 3.0], rtol=1e-6)
    assert mu.tolist() == [5.5, 7.0, 1.25, 3.0]  # the input state is not modified


@pytest.mark.parametrize("mode, mu", [(2, 5.0), (1, 5.0)])
def test_mirostat_draws_follow_the_truncated_distribution(mode, mu):
    x = zipf_logits(V=40, s=1.3, seed=6)
    p = SamplingParams(mirostat=mode)
    counts = draw(p, x.tolist(), 30_000, base_seed=50 + mode, mirostat_mu=mu)
    want = np_softmax(ref_mirostat_v2(x, mu) if mode == 2 else ref_top_k(x, ref_mirostat_v1_k(x, mu, 40)[1]))
    assert 2 < (want > 0).sum() < 30
    assert counts[want == 0].sum() == 0
    assert pooled_chisquare(counts, want) > ACCEPT
    assert pooled_chisquare(counts, np_softmax(x)) < REJECT  # untruncated


# ---- DRY ----------------------------------------------------------------------------------------------

def test_dry_on_llama_cpps_example():
    # llama.cpp's comment: "a b c c b c y a b c" -> repeat counts 0 0 3 1 0 2 0 ...: emitting c would extend
    # `a b c` (3), b would extend `c` (1), y would extend `b c` (2)
    a, b, c, y = 0, 1, 2, 3
    ids = [a, b, c, c, b, c, y, a, b, c]
    m = H.dry_match_lengths(H.right_align(history_tensor([ids])), None, torch.tensor([100]))
    assert m[0].tolist() == [0, 0, 3, 1, 0, 2, 0, 0, 0]
    x = torch.zeros(1, 5)
    out = H.dry(x, history_tensor([ids]), None, torch.tensor([0.8], dtype=F64), torch.tensor([1.75], dtype=F64),
                torch.tensor([1]), torch.tensor([-1]))
    # multiplier 0.8, base 1.75, allowed length 1: 0.8 * 1.75^(n - 1)
    np.testing.assert_allclose(out[0].numpy(), [0, -0.8, -0.8 * 1.75**2, -0.8 * 1.75, 0], rtol=1e-6)
    np.testing.assert_allclose(-out[0].numpy(), ref_dry(ids, 5, 0.8, 1.75, 1, -1), rtol=1e-6)


def test_dry_sequence_breakers_window_and_allowed_length():
    a, b, c, brk = 0, 1, 2, 3
    x = torch.zeros(6, 5)
    rows = [[a, b, c, brk, a, b],      # breaker between: `a b` repeats -> c penalised, n = 2
            [a, b, brk, a, b, brk],    # the last token is a breaker: nothing
            [a, b, c, a, b],           # allowed length 3 > n = 2: nothing
            [a, b, c, a, b, a, b],     # only the last 4 tokens `a b a b` count: see below
            [brk, a, b, brk, a, b],    # the breaker would follow `a b`: never penalised
            [brk, a, b, c, brk, a, b]]  # `brk a b` repeats, but the match stops at the breaker: n = 2
    mult = torch.ones(6, dtype=F64)
    base = torch.full((6,), 2.0, dtype=F64)
    allowed = torch.tensor([2, 1, 3, 1, 1, 1])
    last_n = torch.tensor([-1, -1, -1, 4, -1, -1])
    out = H.dry(x, history_tensor(rows), torch.tensor([[False, False, False, True, False]] * 6), mult, base,
                allowed, last_n)
    # row 3: only the window `a b a b` counts; its last `b` repeats the `a b` at its start (n = 2: the window
    # ends the match), which `a` followed: 2^(2 - 1) = 2. (Over the whole row `a b` was also followed by c.)
    assert out.tolist() == [[0, 0, -1.0, 0, 0], [0] * 5, [0] * 5, [-2.0, 0, 0, 0, 0], [0] * 5, [0, 0, -2.0, 0, 0]]
    for i, ids in enumerate(rows):
        want = ref_dry(ids, 5, 1.0, 2.0, int(allowed[i]), int(last_n[i]), breakers={brk})
        np.testing.assert_allclose(-out[i].numpy(), want)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_dry_matches_the_webui_algorithm_on_random_histories(monkeypatch, chunk):
    monkeypatch.setattr(H, "CHUNK", chunk)  # the match search's step must not change any result
    g = np.random.default_rng(11)
    V, B = 7, 400
    rows, params = [], []
    for _ in range(B):
        n = int(g.integers(0, 45))
        rows.append(g.choice(V, size=n, p=[0.3, 0.22, 0.16, 0.1, 0.06, 0.04, 0.12]).tolist())
        params.append((float(g.choice([0.5, 1.3])), float(g.choice([1.0, 1.75, 3.0])), int(g.integers(1, 4)),
                       int(g.choice([-1, 0, 5, 12]))))
    breakers = torch.zeros(B, V, dtype=torch.bool)
    breakers[::2, 6] = True  # every other row treats token 6 as a sequence breaker
    mult, base = (torch.tensor([q[j] for q in params], dtype=F64) for j in (0, 1))
    allowed, last_n = (torch.tensor([q[j] for q in params]) for j in (2, 3))
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(0))
    out = H.dry(x, history_tensor(rows), breakers, mult, base, allowed, last_n)
    penalised = 0
    for i in range(B):
        want = ref_dry(rows[i], V, *params[i], breakers={6} if i % 2 == 0 else set())
        np.testing.assert_allclose((x[i].double() - out[i].double()).numpy(), want, rtol=1e-5, atol=1e-5)
        penalised += int((want > 0).any())
    assert penalised > B // 8  # the histories do repeat (last_n = 0 and a final breaker penalise nothing)


def test_dry_exponent_is_clamped_like_llama_cpp():
    ids = [1, 2] * 100  # a 199-token repeat
    x = torch.zeros(1, 4)
    out = H.dry(x, history_tensor([ids]), None, torch.tensor([0.5], dtype=F64), torch.tensor([3.0], dtype=F64),
                torch.tensor([2]), torch.tensor([-1]))
    max_exp = int(88.7228391 / math.log(3.0))  # 80
    assert out[0, 1].item() == pytest.approx(-0.5 * 3.0**max_exp, rel=1e-6)
    assert math.isfinite(out[0, 1].item()) and out[0, [0, 2, 3]].tolist() == [0, 0, 0]
    assert -out[0, 1].item() == pytest.approx(ref_dry(ids, 4, 0.5, 3.0, 2, -1)[1], rel=1e-6)


def test_dry_breakers_are_the_tokens_whose_text_holds_a_breaker_string():
    texts = H.TokenTexts(["a", "b\n", ":", "c", "d:e", "\"q", "*", "x"])
    assert texts.breaker_ids(("\n", ":")) == (1, 2, 4)
    assert texts.breaker_ids(tuple(SamplingParams().dry_sequence_breakers)) == (1, 2, 4, 5, 6)
    # through the pipeline: `2 0 3` repeats `2 0 3` (followed by 7 then), but token 2 (":") is a breaker:
    # the match stops after it at length 2 < allowed length 3, so nothing is penalised
    ids = [2, 0, 3, 7, 1, 2, 0, 3]
    p = SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=3, temperature=1.0)
    x = [0.0] * 8
    with_brk = probs_of(p, x, token_texts=list(texts.texts), history=history_tensor([ids]))
    no_brk = probs_of(dataclasses.replace(p, dry_sequence_breakers=[]), x, token_texts=list(texts.texts),
                      history=history_tensor([ids]))
    np.testing.assert_allclose(with_brk, np_softmax(x), rtol=1e-6)
    np.testing.assert_allclose(no_brk, np_softmax(-ref_dry(ids, 8, 1.0, 2.0, 3, -1)), rtol=1e-6)
    assert no_brk[7] < no_brk[0]  # `2 0 3` was followed by 7 before: penalised without the breaker


# ---- no_repeat_ngram_size --------------------------------------------------------------------------------

def test_no_repeat_ngram_bans_tokens_completing_a_seen_ngram():
    x = torch.zeros(4, 8)
    rows = [[0, 1, 2, 2, 1, 2, 6, 0, 1, 2],  # n=2, last token 2: bigrams 2-2, 2-1, 2-6 seen
            [3, 4, 3, 4, 3],                 # n=3, last `4 3`: trigram 4-3-4 seen
            [5, 1, 5],                       # n=1: every seen token
            [1, 2]]                          # n=4: fewer than 3 tokens before... 2 < 3: nothing
    out = H.no_repeat_ngram(x, history_tensor(rows), torch.tensor([2, 3, 1, 4]))
    assert [np.flatnonzero(np.isneginf(r.numpy())).tolist() for r in out] == [[1, 2, 6], [4], [1, 5], []]
    for i, r in enumerate(rows):
        assert set(np.flatnonzero(np.isneginf(out[i].numpy())).tolist()) == ref_no_repeat(r, [2, 3, 1, 4][i])


def test_no_repeat_ngram_matches_transformers_on_random_histories():
    g = np.random.default_rng(12)
    V, B = 6, 300
    rows = [g.integers(0, V, int(g.integers(0, 30))).tolist() for _ in range(B)]
    sizes = g.integers(0, 5, B)
    out = H.no_repeat_ngram(torch.zeros(B, V), history_tensor(rows), torch.tensor(sizes))
    banned_any = 0
    for i in range(B):
        got = set(np.flatnonzero(np.isneginf(out[i].numpy())).tolist())
        assert got == ref_no_repeat(rows[i], int(sizes[i])), (rows[i], sizes[i])
        banned_any += bool(got)
    assert banned_any > B // 3


# ---- the whole pipeline -----------------------------------------------------------------------------------

def test_pipeline_order_penalties_dry_ngram_temperature_truncation_xtc():
    g = np.random.default_rng(21)
    V = 30
    x = g.normal(0, 2, V)
    ids = g.integers(0, 8, 25).tolist()
    counts = np.bincount(ids, minlength=V)
    p = SamplingParams(frequency_penalty=0.3, penalize_prompt=True, dry_multiplier=0.7, dry_base=1.5,
                       dry_allowed_length=1, no_repeat_ngram_size=2, temperature=0.8, dynatemp_range=0.3,
                       top_n_sigma=2.0, top_k=12, min_p=0.02, xtc_probability=1.0, xtc_threshold=0.08)
    y = ref_freq_presence(x, counts, 0.3, 0.0)
    y = y - ref_dry(ids, V, 0.7, 1.5, 1, -1)
    y[list(ref_no_repeat(ids, 2))] = -np.inf
    y = ref_dynatemp(y, 0.8, 0.3, 1.0)
    y = ref_top_n_sigma(y, 2.0)
    y = ref_top_k(y, 12)
    pr = np_softmax(y)
    y = np.where(pr >= 0.02 * pr.max(), y, -np.inf)
    y = ref_xtc_fired(y, 0.08)
    want = np_softmax(y)
    assert 1 < (want > 0).sum() < 12
    got = probs_of(p, x.tolist(), prompt_counts=torch.tensor(counts, dtype=torch.int32)[None],
                   history=history_tensor([ids]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)


def test_rows_with_the_new_samplers_in_a_mixed_batch_equal_the_rows_alone():
    g = torch.Generator().manual_seed(8)
    V = 50
    rows = [SamplingParams(top_n_sigma=1.0), SamplingParams(xtc_probability=0.5, xtc_threshold=0.05),
            SamplingParams(dry_multiplier=0.8, dry_allowed_length=1), SamplingParams(no_repeat_ngram_size=2),
            SamplingParams(mirostat=2, mirostat_tau=3.0), SamplingParams(mirostat=1),
            SamplingParams(dynatemp_range=0.5, temperature=0.9), SamplingParams(top_k=5), SamplingParams(temperature=0)]
    B = len(rows)
    logits = torch.randn(B, V, generator=g) * 2
    hist = history_tensor([torch.randint(0, 10, (int(n),), generator=g).tolist() for n in range(5, 5 + B)])
    mu = torch.linspace(3.0, 8.0, B, dtype=F64)
    num = torch.arange(B)
    seeds = [derive_seed(1, i) for i in range(B)]
    together = sample(logits, SamplingBatch.build(rows, seeds, V, []), history=hist, mirostat_mu=mu,
                      num_generated=num)
    for i in range(B):
        alone = sample(logits[i:i + 1], SamplingBatch.build([rows[i]], [seeds[i]], V, []), history=hist[i:i + 1],
                       mirostat_mu=mu[i:i + 1], num_generated=num[i:i + 1])
        assert alone.tokens.item() == together.tokens[i].item()
        assert alone.processed_logprobs.item() == pytest.approx(together.processed_logprobs[i].item(), abs=1e-5)
        assert alone.mirostat_mu.item() == pytest.approx(together.mirostat_mu[i].item(), abs=1e-9)


def test_trace_names_the_new_stages():
    p = SamplingParams(dry_multiplier=0.5, no_repeat_ngram_size=3, top_n_sigma=2.0, xtc_probability=1.0,
                       explain=True)
    b = SamplingBatch.build([p, SamplingParams(mirostat=2)], [0, 1], 20, [])
    out = sample(torch.randn(2, 20, generator=torch.Generator().manual_seed(1)), b,
                 history=history_tensor([[1, 2, 3, 1, 2], [4]]), explain=True)
    assert [s["stage"] for s in out.trace[0][:-1]] == ["dry", "no_repeat_ngram", "top_n_sigma", "xtc", "mirostat"]
    assert out.trace[0][1]["kept"] == 19  # `1 2 3` seen: after `1 2`, 3 is banned


# ---- statistical helper --------------------------------------------------------------------------------

def draw(p: SamplingParams, logits, n: int, base_seed: int, mirostat_mu: float | None = None) -> np.ndarray:
    """Token counts of ``n`` rows with the same logits and distinct seeds, drawn in ONE ``sample`` call."""
    V = len(logits)
    seeds = [derive_seed(base_seed, i) for i in range(n)]
    batch = SamplingBatch.build([p] * n, seeds, V, [])
    mu = None if mirostat_mu is None else torch.full((n,), mirostat_mu, dtype=F64)
    out = sample(t([logits]).expand(n, V), batch, num_generated=torch.full((n,), 3), mirostat_mu=mu)
    return np.bincount(out.tokens.numpy(), minlength=V)


# ---- validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, kw", [
    ("top_n_sigma", dict(top_n_sigma=-1.0)), ("top_n_sigma", dict(top_n_sigma=float("nan"))),
    ("xtc_probability", dict(xtc_probability=1.5)), ("xtc_threshold", dict(xtc_threshold=-0.1)),
    ("dry_multiplier", dict(dry_multiplier=-0.5)), ("dry_base", dict(dry_base=0.9)),
    ("dry_allowed_length", dict(dry_allowed_length=0)), ("dry_allowed_length", dict(dry_allowed_length=1.5)),
    ("dry_penalty_last_n", dict(dry_penalty_last_n=-2)), ("dry_sequence_breakers", dict(dry_sequence_breakers="\n")),
    ("dry_sequence_breakers", dict(dry_sequence_breakers=[""])),
    ("dry_sequence_breakers", dict(dry_sequence_breakers=["x" * 41])),
    ("dry_sequence_breakers", dict(dry_sequence_breakers=["a"] * 33)),
    ("mirostat", dict(mirostat=3)), ("mirostat", dict(mirostat=True)), ("mirostat_tau", dict(mirostat_tau=-1.0)),
    ("mirostat_eta", dict(mirostat_eta=1.5)), ("dynatemp_range", dict(dynatemp_range=-0.1)),
    ("dynatemp_exponent", dict(dynatemp_exponent=float("inf"))),
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=-1)),
])
def test_bad_values_name_the_field(field, kw):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw).validate(100)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_defaults_are_off_and_match_llama_cpp():
    p = SamplingParams().validate(100)
    assert (p.top_n_sigma, p.xtc_probability, p.xtc_threshold, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
            p.dry_penalty_last_n, p.mirostat, p.mirostat_tau, p.mirostat_eta, p.dynatemp_range,
            p.dynatemp_exponent, p.no_repeat_ngram_size) == (0, 0, 0.1, 0, 1.75, 2, -1, 0, 5.0, 0.1, 0, 1.0, 0)
    assert p.dry_sequence_breakers == ["\n", ":", "\"", "*"]
    assert SamplingBatch.build([p], [0], 100, []).uses == frozenset()  # nothing new runs by default


EDGES = {
    "top_n_sigma": [0.0, 5e-324, 0.5, 1e300, -1.0, float("nan")],
    "xtc_probability": [0.0, 1.0, 0.5, 1.0000001], "xtc_threshold": [0.0, 0.5, 0.50001, 1.0],
    "dry_multiplier": [0.0, 5e-324, 100.0, 100.5], "dry_base": [1.0, 1.0000005, 100.0, 0.99],
    "dry_allowed_length": [1, 2**31 - 1, 2**31, 0], "dry_penalty_last_n": [-1, 0, 1, 2**31 - 1, -2],
    "dry_sequence_breakers": [[], ["\n"], ["a" * 40], [""]], "mirostat": [0, 1, 2, 3],
    "mirostat_tau": [0.0, 5e-324, 100.0, 101.0], "mirostat_eta": [0.0, 1.0, 1.5],
    "dynatemp_range": [0.0, 100.0, 101.0], "dynatemp_exponent": [0.0, 100.0, 5e-324],
    "no_repeat_ngram_size": [0, 1, 2, 2**31 - 1, -1], "temperature": [0.0, 1e-30, 1.0, 5.0],
}


def test_extreme_values_are_rejected_by_name_or_sampled_without_nan():
    """Edge values of every new field, combined at random: validate raises ParamError, or one batched
    ``sample`` of all the valid ones yields valid tokens, finite (or -inf) logprobs and a finite mu."""
    g = np.random.default_rng(99)
    V, valid, rejected = 12, [], 0
    for _ in range(600):
        kw = {k: v[int(g.integers(len(v)))] for k, v in EDGES.items() if g.random() < 0.4}
        try:
            valid.append(SamplingParams(**kw).validate(V))
        except ParamError as e:
            rejected += 1
            assert e.field in kw
    assert rejected > 50 and len(valid) > 50
    B = len(valid)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=gen) * 4
    logits[torch.rand(B, V, generator=gen) < 0.2] = -INF
    hist = history_tensor([torch.randint(0, 4, (int(n),), generator=gen).tolist() for n in torch.randint(0, 30, (B,))])
    texts = [str(i) if i % 5 else "\n" for i in range(V)]
    batch = SamplingBatch.build(valid, list(range(B)), V, [], token_texts=texts)
    out = sample(logits, batch, history=hist, mirostat_mu=M.initial_mu(batch.mirostat_tau),
                 num_generated=torch.arange(B), num_logprobs=3, explain=True)
    assert ((out.tokens >= 0) & (out.tokens < V)).all()
    ok = ~out.failed
    assert not torch.isnan(out.processed_logprobs).any() and (out.processed_logprobs[ok] > -INF).all()
    assert torch.isfinite(out.mirostat_mu).all()
    assert ok.sum() > B // 2


# ---- the scheduler, the CLI and the server ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine(real_tokenizer):
    from logitlab.engine import Engine

    from tiny import tiny_model

    model = tiny_model(seed=0, vocab_size=real_tokenizer.vocab_size, context_length=256)
    return Engine(model, real_tokenizer, name="tiny", max_batch=8, max_len=256)


def test_mirostat_mu_persists_across_steps_and_slot_moves(tiny_engine):
    """Each step's processed logprob is the Mirostat-2 distribution at that step's mu, mu following the
    recursion from the tokens actually drawn -- while a shorter request before it finishes (its slot moves)."""
    tau, eta, T = 3.0, 0.5, 1.0
    p = SamplingParams(max_tokens=10, mirostat=2, mirostat_tau=tau, mirostat_eta=eta, temperature=T, seed=5,
                       ignore_eos=True, logprobs_mode="processed", logprobs=0)
    short = SamplingParams(max_tokens=2, seed=1, ignore_eos=True)
    res = tiny_engine.generate(["x y", "Once upon a time"], [short, p])
    choice = res[1].choices[0]
    prompt = tiny_engine.encode_prompt("Once upon a time")
    mu, mus_seen, fixed_mu_lps = 2 * tau, [], []
    for step, (tok, lp) in enumerate(zip(choice.token_ids, choice.token_logprobs, strict=True)):
        x = tiny_engine.next_token_logits(prompt + choice.token_ids[:step]).double().numpy() / T
        want = np_softmax(ref_mirostat_v2(x, mu))
        assert lp == pytest.approx(math.log(want[tok]), abs=2e-3), step
        fixed_mu_lps.append(np_softmax(ref_mirostat_v2(x, 2 * tau))[tok])
        mus_seen.append(mu)
        mu -= eta * (-math.log2(want[tok]) - tau)
    assert len(set(np.round(mus_seen, 6))) > 3  # mu really moved
    lps = np.exp(choice.token_logprobs)
    assert not np.allclose(lps, fixed_mu_lps, atol=1e-3)  # a state reset every step would be visible


def test_no_repeat_ngram_and_dry_through_the_engine(tiny_engine):
    prompt = tiny_engine.encode_prompt("the cat the cat the")
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = tiny_engine.generate(prompt, greedy)[0].choices[0].token_ids
    seq = prompt + tiny_engine.generate(prompt, dataclasses.replace(greedy, no_repeat_ngram_size=2))[0].choices[
        0].token_ids[:]
    out = seq[len(prompt):]
    bigrams = [tuple(seq[i:i + 2]) for i in range(len(prompt) - 1, len(seq) - 1)]
    earlier = {tuple(seq[i:i + 2]) for i in range(len(prompt) - 1)}
    assert len(set(bigrams)) == len(bigrams) and not (set(bigrams) & earlier), out
    plain_seq = prompt + plain
    assert len({tuple(plain_seq[i:i + 2]) for i in range(len(plain_seq) - 1)}) < len(plain_seq) - 1  # it loops
    dry = tiny_engine.generate(prompt, dataclasses.replace(greedy, dry_multiplier=2.0))[0].choices[0].token_ids
    assert dry != plain


def test_cli_flags_map_to_the_fields(monkeypatch, capsys, tiny_engine):
    from logitlab import cli

    a = cli.build_parser().parse_args([
        "generate", "x", "--top-nsigma", "1.5", "--xtc-probability", "0.5", "--xtc-threshold", "0.2",
        "--dry-multiplier", "0.8", "--dry-base", "2", "--dry-allowed-length", "3", "--dry-penalty-last-n", "64",
        "--dry-sequence-breaker", "\\n", "--dry-sequence-breaker", "###", "--mirostat", "2", "--mirostat-ent", "4",
        "--mirostat-lr", "0.2", "--dynatemp-range", "0.3", "--dynatemp-exp", "2", "--no-repeat-ngram-size", "3"])
    p = cli._params(a)
    assert (p.top_n_sigma, p.xtc_probability, p.xtc_threshold, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
            p.dry_penalty_last_n, p.dry_sequence_breakers, p.mirostat, p.mirostat_tau, p.mirostat_eta,
            p.dynatemp_range, p.dynatemp_exponent, p.no_repeat_ngram_size) == (
        1.5, 0.5, 0.2, 0.8, 2.0, 3, 64, ["\n", "###"], 2, 4.0, 0.2, 0.3, 2.0, 3)
    assert cli._params(cli.build_parser().parse_args(["generate", "x"])) == SamplingParams(max_tokens=64)
    none = cli._params(cli.build_parser().parse_args(["generate", "x", "--dry-sequence-breaker", "none"]))
    assert none.dry_sequence_breakers == []
    monkeypatch.setattr(cli, "_engine", lambda a, **kw: tiny_engine)
    for argv, field in [(["--mirostat", "3"], "mirostat"), (["--dry-base", "0.5"], "dry_base"),
                        (["--xtc-probability", "2"], "xtc_probability")]:
        assert cli.main(["generate", "x", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {field}: "), err


def test_cli_dist_applies_the_history_samplers(monkeypatch, capsys, tiny_engine):
    import json

    from logitlab import cli

    monkeypatch.setattr(cli, "_engine", lambda a, **kw: tiny_engine)
    assert cli.main(["dist", "the cat the cat the", "--no-repeat-ngram-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["final"]["kept"] == tiny_engine.vocab_size - 1  # " cat" after " the" is banned


def test_server_passes_the_fields_through(real_tokenizer):
    import httpx
    from server_harness import tiny_server

    srv = tiny_server(real_tokenizer)
    body = dict(model="tiny", prompt="hello", max_tokens=4, seed=3, top_n_sigma=1.0, xtc_probability=0.5,
                xtc_threshold=0.1, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=-1,
                dry_sequence_breakers=["\n"], mirostat=2, mirostat_tau=5.0, mirostat_eta=0.1, dynatemp_range=0.2,
                dynatemp_exponent=1.0, no_repeat_ngram_size=2)
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["token_ids"]) == 4
    bad = httpx.post(srv.url + "/v1/completions", json={**body, "mirostat": 5}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mirostat"
    ids = real_tokenizer.encode("the cat the cat the")
    d = httpx.post(srv.url + "/v1/distribution", json=dict(prompt=ids, top=5, no_repeat_ngram_size=2, mirostat=0),
                   timeout=60).json()
    cat = real_tokenizer.encode(" cat", add_special_tokens=False)[0]
    assert all(row["id"] != cat or row["p_after"] == 0 for row in d["tokens"])
    plain = httpx.post(srv.url + "/v1/distribution", json=dict(prompt=ids, top=50), timeout=60).json()
    assert d["kept"] == plain["kept"] - 1  # exactly " cat" is banned after "... the"
