"""One small pure function per logits processor.

Each takes logits ``[B, V]`` (float32) and per-row parameters ``[B]``, and returns a NEW tensor; rows
whose knob is off pass through unchanged. Truncation processors set removed entries to ``-inf`` and
always keep at least one token. Each truncation sees the distribution renormalised after the previous
steps (as Hugging Face's warpers and vLLM's sampler do).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _rows(active: torch.Tensor) -> torch.Tensor:
    return active.unsqueeze(-1)


def mask_tokens(logits, allowed: torch.Tensor | None, banned: torch.Tensor | None):
    """l_i = -inf where token i is not allowed or is banned ([B, V] boolean masks)."""
    out = logits
    if allowed is not None:
        out = out.masked_fill(~allowed, NEG_INF)
    if banned is not None:
        out = out.masked_fill(banned, NEG_INF)
    return out


def mask_eos_before_min_tokens(logits, eos_ids: torch.Tensor, num_generated, min_tokens):
    """End-of-sequence ids get -inf in rows that have generated fewer than ``min_tokens`` tokens."""
    active = num_generated < min_tokens
    if not bool(active.any()) or eos_ids.numel() == 0:
        return logits
    out = logits.clone()
    cols = out[:, eos_ids]
    out[:, eos_ids] = torch.where(_rows(active), torch.full_like(cols, NEG_INF), cols)
    return out


def logit_bias(logits, bias: torch.Tensor):
    """l_i += bias_i (bias [B, V], zero where unset)."""
    return logits + bias


def repetition_penalty(logits, seen: torch.Tensor, penalty):
    """CTRL/HF: for tokens already seen, l > 0 -> l / r, l <= 0 -> l * r (r > 1 discourages them)."""
    r = _rows(penalty)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen & _rows(penalty != 1.0), penalised, logits)


def frequency_presence_penalty(logits, counts: torch.Tensor, frequency, presence):
    """OpenAI: l_i -= f * count_i + p * [count_i > 0]."""
    c = counts.to(logits.dtype)
    return logits - _rows(frequency) * c - _rows(presence) * (c > 0).to(logits.dtype)


def temperature_penalty(logits, counts: torch.Tensor, frequency, presence):
    """Seed 000: a per-token temperature k_i = 1 + f * count_i + p * [count_i > 0], applied as l_i / k_i.
    Dividing only pushes a logit towards 0, which penalises only if logits are positive, so each row is
    first shifted so that its smallest finite logit is 0 (a shift leaves the softmax unchanged)."""
    active = (frequency != 0) | (presence != 0)
    c = counts.to(logits.dtype)
    k = 1.0 + _rows(frequency) * c + _rows(presence) * (c > 0).to(logits.dtype)
    finite = torch.isfinite(logits)
    row_min = torch.where(finite, logits, torch.full_like(logits, float("inf"))).amin(-1, keepdim=True)
    shifted = (logits - row_min.clamp(max=torch.finfo(logits.dtype).max)) / k
    return torch.where(_rows(active) & finite, shifted, logits)


def temperature(logits, t):
    """l / T for rows with T > 0 (T = 0 rows are greedy and handled by the sampler)."""
    safe = torch.where(t > 0, t, torch.ones_like(t))
    return logits / _rows(safe)


def top_k(logits, k):
    """Keep the k largest logits (k = 0: off; k >= V keeps all). Like Hugging Face, tokens tied with
    the k-th value are kept too, so the result never depends on how a sort breaks ties."""
    V = logits.shape[-1]
    active = (k > 0) & (k < V)
    if not bool(active.any()):
        return logits
    kmax = int(k[active].max())
    vals = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
    idx = (k.clamp(1, kmax) - 1).unsqueeze(-1)
    kth = vals.gather(-1, idx)
    return torch.where(_rows(active) & (logits < kth), NEG_INF, logits)


def _sorted_probs(logits):
    probs = torch.softmax(logits, dim=-1)
    sp, order = probs.sort(dim=-1, descending=True, stable=True)
    return probs, sp, order


def top_p(logits, p):
    """Nucleus: keep the smallest set of most probable tokens whose mass reaches p, including the
    token that crosses p (a token is removed when the mass strictly before it is already >= p)."""
    active = p < 1.0
    if not bool(active.any()):
        return logits
    _, sp, order = _sorted_probs(logits)
    before = sp.double().cumsum(-1) - sp.double()
    remove_sorted = before >= _rows(p).double()
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return torch.where(_rows(active) & remove, NEG_INF, logits)


def min_p(logits, m):
    """Keep tokens with p_i >= m * max_j p_j."""
    active = m > 0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    thresh = _rows(m) * probs.amax(-1, keepdim=True)
    return torch.where(_rows(active) & (probs < thresh), NEG_INF, logits)


def _entropy(logits):
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return logp, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1, keepdim=True)


def typical(logits, mass):
    """Locally typical sampling (Meister et al. 2022): order tokens by |-log p_i - H| and keep the
    closest ones until their mass reaches ``mass`` (including the crossing one)."""
    active = mass < 1.0
    if not bool(active.any()):
        return logits
    logp, ent = _entropy(logits)
    dev = torch.where(torch.isfinite(logp), (-logp - ent).abs(), torch.full_like(logp, float("inf")))
    order = dev.argsort(dim=-1, stable=True)
    sp = logp.exp().gather(-1, order).double()
    before = sp.cumsum(-1) - sp
    remove_sorted = before >= _rows(mass).double()
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return torch.where(_rows(active) & remove, NEG_INF, logits)


def _keep_argmax(logits, remove):
    top = logits.argmax(-1, keepdim=True)
    return remove.scatter(-1, top, False)


def epsilon(logits, eps):
    """Epsilon sampling (Hewitt et al. 2022): remove tokens with p_i < eps; the most probable stays."""
    active = eps > 0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = _keep_argmax(logits, probs < _rows(eps))
    return torch.where(_rows(active) & remove, NEG_INF, logits)


def eta(logits, eta_):
    """Eta sampling (Hewitt et al. 2022): remove p_i < min(eta, sqrt(eta) * exp(-H)); argmax stays."""
    active = eta_ > 0
    if not bool(active.any()):
        return logits
    logp, ent = _entropy(logits)
    e = _rows(eta_)
    thresh = torch.minimum(e, e.sqrt() * torch.exp(-ent))
    remove = _keep_argmax(logits, logp.exp() < thresh)
    return torch.where(_rows(active) & remove, NEG_INF, logits)
