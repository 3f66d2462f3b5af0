"""Mirostat (Basu et al. 2021), as llama.cpp implements it: a truncation whose width follows a per-request
state ``mu``, updated after every sampled token so that the observed surprise tracks a target ``tau``.

    v1:  estimate the Zipf exponent s from the m = 100 most probable tokens,
             s = sum_i t_i b_i / sum_i t_i^2,   t_i = log((i + 2) / (i + 1)),   b_i = log(p_(i) / p_(i+1)),
         then keep the k most probable tokens,
             k = (eps 2^mu / (1 - V^-eps))^(1 / s),   eps = s - 1      (V: the vocabulary size)
    v2:  keep the tokens whose surprise -log2 p_i is <= mu (always the most probable one)
    both, after drawing token x from the kept tokens renormalised:
             mu <- mu - eta (-log2 p(x) - tau)                      (mu starts at 2 tau)

``mu`` is state, not a parameter: the caller keeps one value per request (``decoding/scheduler.py`` keeps
it per cache slot, next to the penalty counts) and passes it in; ``sample`` returns the updated value.
"""

from __future__ import annotations

import math

import torch

from . import processors as P

M_V1 = 100  # llama.cpp's common sampler creates Mirostat v1 with m = 100
LN2 = math.log(2.0)


def initial_mu(tau: torch.Tensor) -> torch.Tensor:
    return 2.0 * tau.double()


def mirostat(logits: torch.Tensor, mode: torch.Tensor, mu: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Truncate rows with ``mode`` 1 (v1) or 2 (v2) by their ``mu`` [B] (float64); other rows unchanged."""
    out = logits
    v2 = mode == 2
    if bool(v2.any()):
        logp = torch.log_softmax(out, -1).double()
        keep = (logp >= -(mu * LN2).unsqueeze(-1)) | (out == out.amax(-1, keepdim=True))
        out = out.masked_fill(v2.unsqueeze(-1) & ~keep, P.NEG_INF)
    v1 = mode == 1
    if bool(v1.any()):
        k = torch.where(v1, mirostat_v1_k(out, mu, vocab_size), torch.zeros_like(mode))
        out = P.top_k(out, k)
    return out


def mirostat_v1_k(logits: torch.Tensor, mu: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """v1's k per row ([B] long, in [1, V]). b_i = log(p_(i) / p_(i+1)) is a difference of sorted logits;
    pairs involving a removed token (p = 0) are left out (llama.cpp would get s = inf and k = 1 from them)."""
    m = min(M_V1, logits.shape[-1])
    top = P.topk(logits, m)[0].double()  # [B, m] descending
    i = torch.arange(m - 1, device=logits.device, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))
    ok = torch.isfinite(top[:, 1:])
    b = torch.where(ok, top[:, :-1] - top[:, 1:], torch.zeros_like(top[:, 1:]))
    s_hat = (t * b).sum(-1) / (t * t * ok).sum(-1)  # NaN when no pair: one token left, k is 1 anyway
    eps = s_hat - 1
    log_v = math.log(vocab_size)
    # eps / (1 - V^-eps), written with expm1 so that eps -> 0 tends to its limit 1 / log V
    ratio = torch.where(eps.abs() < 1e-12, torch.full_like(eps, 1.0 / log_v), eps / -torch.expm1(-eps * log_v))
    k = (ratio * torch.exp2(mu)).pow(1.0 / s_hat)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(vocab_size), neginf=1.0)
    return k.clamp(1.0, float(vocab_size)).floor().long()


def update_mu(mu: torch.Tensor, logprob: torch.Tensor, tau: torch.Tensor, eta: torch.Tensor,
              active: torch.Tensor) -> torch.Tensor:
    """mu - eta * (surprise - tau) in ``active`` rows, surprise = -log2 p of the drawn token (``logprob``:
    its natural log in the distribution it was drawn from)."""
    surprise = -logprob.double() / LN2
    return torch.where(active, mu - eta * (surprise - tau), mu)
