"""The fused native sampler (``native.sample_top_p``, used by ``sample`` for rows that only use
temperature and top-p): exact on hand-made logits, the pipeline's draw on real-looking ones, distributed as
the exact top-p target (chi-square, with a power check), the same token alone or beside any neighbour, and
the edge cases (no finite logit, +inf, NaN, a nucleus wider than every bounded prefix)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_sampling_stats import ACCEPT, REJECT, pooled_chisquare

from logitlab.model import native
from logitlab.sampling import SamplingBatch, SamplingParams, sample
from logitlab.sampling.rng import derive_seed

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels are not built")


def batch(params, V, seeds=None):
    return SamplingBatch.build(params, seeds or list(range(len(params))), V, [0])


def pipeline(logits, b, **kw):
    """The tensor pipeline alone (the fused rows unmarked)."""
    return sample(logits, dataclasses.replace(b, fused=None), **kw)


def test_rows_are_marked_fused_only_for_temperature_and_top_p():
    V = 100
    fused = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(), SamplingParams(top_k=V)]
    other = [SamplingParams(temperature=0), SamplingParams(top_k=5), SamplingParams(min_p=0.1),
             SamplingParams(presence_penalty=0.5), SamplingParams(logit_bias={3: 1.0}), SamplingParams(mirostat=2),
             SamplingParams(min_tokens=2), SamplingParams(explain=True), SamplingParams(typical_p=0.9)]
    b = batch(fused + other, V)
    assert b.fused.tolist() == [True] * len(fused) + [False] * len(other)


def test_hand_made_top_p_draws_by_inverse_cdf_in_id_order():
    """p = (0.15, 0.5, 0.05, 0.3), top-p 0.6 keeps ids 1 and 3 (0.5 + 0.3 >= 0.6): renormalised 0.625 and
    0.375, drawn in id order, so u < 0.625 gives 1, else 3; logprobs exact."""
    x = torch.tensor([[math.log(0.15), math.log(0.5), math.log(0.05), math.log(0.3)]] * 4)
    b = batch([SamplingParams(top_p=0.6)] * 4, 4)
    assert b.fused.all()
    out = sample(x, b, uniforms=torch.tensor([0.0, 0.6249, 0.6251, 0.999], dtype=torch.float64))
    assert out.tokens.tolist() == [1, 1, 3, 3]
    np.testing.assert_allclose(out.raw_logprobs.numpy(), np.log([0.5, 0.5, 0.3, 0.3]), rtol=1e-5)
    np.testing.assert_allclose(out.processed_logprobs.numpy(), np.log([0.625, 0.625, 0.375, 0.375]), rtol=1e-5)
    # a tie with the crossing token is kept: p = (0.4, 0.2, 0.2, 0.2), top-p 0.5 crosses inside the 0.2s
    x = torch.tensor([[math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2)]])
    out = sample(x, batch([SamplingParams(top_p=0.5)], 4), uniforms=torch.tensor([0.999], dtype=torch.float64))
    assert out.tokens.tolist() == [3]


@pytest.mark.parametrize("scale,T,top_p", [(3.0, 0.8, 0.95), (6.0, 0.5, 0.5), (3.0, 1.3, 1.0), (2.0, 1.0, 0.9)])
def test_fused_rows_draw_what_the_pipeline_draws(scale, T, top_p):
    """Peaked rows of a 49,152-token vocabulary: the same tokens as the tensor pipeline for 64 seeded rows
    (a boundary case between float sums of different order is possible but not at these odds), raw and
    processed logprobs within float32 rounding."""
    g = torch.Generator().manual_seed(int(scale * 10 + T * 100))
    V = 49152
    x = torch.randn(64, V, generator=g) * scale
    b = batch([SamplingParams(temperature=T, top_p=top_p)] * 64, V, [derive_seed(7, i) for i in range(64)])
    ng = torch.full((64,), 3)
    got, ref = sample(x, b, num_generated=ng), pipeline(x, b, num_generated=ng)
    assert got.tokens.tolist() == ref.tokens.tolist()
    torch.testing.assert_close(got.raw_logprobs, ref.raw_logprobs, rtol=0, atol=5e-5)
    torch.testing.assert_close(got.processed_logprobs, ref.processed_logprobs, rtol=0, atol=5e-5)


@pytest.mark.parametrize("T,top_p", [(1.0, 0.8), (0.6, 0.95), (1.5, 1.0)])
def test_fused_draws_follow_the_exact_top_p_distribution(T, top_p):
    """20,000 seeded rows over 40 tokens against softmax(x / T) truncated by top-p (computed here in
    float64 from the definition); a target with the nucleus one token shorter is rejected (power)."""
    V, n = 40, 20000
    x = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    p = torch.softmax(x.double() / T, -1)
    order = p.argsort(descending=True)
    cum = p[order].cumsum(0)
    c = int((cum < top_p - 1e-12).sum()) if top_p < 1 else V - 1
    keep = p >= p[order[c]]
    target = torch.where(keep, p, 0.0)
    b = batch([SamplingParams(temperature=T, top_p=top_p)] * n, V, [derive_seed(11, i) for i in range(n)])
    out = sample(x.expand(n, V).contiguous(), b)
    counts = np.bincount(out.tokens.numpy(), minlength=V)
    assert counts[~keep.numpy()].sum() == 0
    assert pooled_chisquare(counts, target.numpy()) > ACCEPT
    if top_p < 1:
        shorter = target.clone()
        shorter[order[c]] = 0.0
        assert pooled_chisquare(counts, shorter.numpy() + 1e-12) < REJECT


def test_a_fused_row_gives_the_same_token_alone_and_beside_any_neighbour():
    """A fused row's draw does not depend on the batch: beside rows with penalties, top-k, greedy or logprobs
    (which take the pipeline), its token is the one it draws alone."""
    V = 3000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, V, generator=g) * 0.4  # flat: thousands of tokens in the nucleus
    counts = torch.randint(0, 2, (4, V), generator=g, dtype=torch.int32)
    mine = SamplingParams(temperature=0.9, top_p=0.97)
    for neighbour in (SamplingParams(presence_penalty=0.7), SamplingParams(top_k=20), SamplingParams(temperature=0),
                      SamplingParams(logprobs=3)):
        for seed in range(30):
            alone = sample(x[:1], batch([mine], V, [seed]), output_counts=counts[:1])
            both = sample(x[:2], batch([mine, neighbour], V, [seed, 99]), output_counts=counts[:2],
                          num_logprobs=neighbour.logprobs or 0)
            assert both.tokens[0] == alone.tokens[0]
            assert both.raw_logprobs[0] == alone.raw_logprobs[0]


def test_edge_rows_no_finite_logit_nan_and_plus_inf():
    V = 300
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    x[0] = float("-inf")  # nothing left: failed, token 0, -inf
    x[1, :150] = float("nan")  # NaN counts as -inf (the pipeline's rule): never drawn
    b = batch([SamplingParams(temperature=0.8, top_p=0.9)] * 4, V)
    out = sample(x, b)
    assert out.failed.tolist() == [True, False, False, False] and out.tokens[0] == 0
    assert math.isinf(out.raw_logprobs[0]) and out.tokens[1] >= 150
    ref = pipeline(x, b)
    assert out.tokens.tolist() == ref.tokens.tolist()
    tokens = native.sample_top_p(x, b.temperature, b.top_p, torch.full((4,), 0.5, dtype=torch.float64))
    assert tokens is None  # the kernel leaves NaN (and +inf) rows to the pipeline
    fine = native.sample_top_p(x[[0, 2, 3]], b.temperature[:3], b.top_p[:3], torch.full((3,), 0.5, dtype=torch.float64))
    assert fine[3].tolist() == [True, False, False]
    x[2, 7] = float("inf")  # +inf: the pipeline's rule (only the +inf tokens are left)
    out = sample(x, b)
    assert out.tokens[2] == 7 and out.tokens.tolist() == pipeline(x, b).tokens.tolist()


def test_a_nucleus_wider_than_every_bounded_prefix():
    """A flat row of 49,152 logits whose 0.99 nucleus holds tens of thousands of tokens (past the 256 and 4096
    candidates: the whole-row sort): the kept set's processed logprob is the pipeline's."""
    V = 49152
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(9)) * 0.05
    b = batch([SamplingParams(top_p=0.99)] * 3, V, [1, 2, 3])
    got, ref = sample(x, b), pipeline(x, b)
    torch.testing.assert_close(got.processed_logprobs, ref.processed_logprobs, rtol=0, atol=1e-4)
    kept_mass = (got.raw_logprobs - got.processed_logprobs).exp()  # p / (p / kept) for the drawn token
    assert ((kept_mass >= 0.99 - 1e-5) & (kept_mass < 0.995)).all(), kept_mass
