"""One small pure function per logits processor.

Conventions shared by every function here:

* ``logits`` is a ``[B, V]`` float32 tensor; the per-row parameters are ``[B]`` tensors (one value per
  row, so rows with different settings share one call). A row whose knob is "off" passes through
  unchanged, bit for bit.
* The input is never modified: every function returns a NEW tensor (or the input itself when no row
  uses the knob).
* Truncation processors remove tokens by setting them to ``-inf``; they always keep at least one token
  of a row that had one. Each one looks at the distribution the previous steps left, renormalised
  (``p = softmax(l)``), as Hugging Face's warpers and vLLM's sampler do.
* ``+inf`` and NaN are resolved by the pipeline before these run (see ``sampler.py``); ``-inf`` is an
  ordinary "removed" entry everywhere.

Ties (equal probabilities) are resolved so that the result never depends on how a sort orders equal
values: top-k keeps exactly k tokens, the lower token ids first among equals; top-p, typical, min-p,
epsilon and eta keep every token tied with the last one kept (so they may keep more than the minimal
set, never fewer), which is also what Hugging Face's typical / epsilon / eta warpers do.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

# A full sort of a 49k vocabulary costs ~30x a bounded topk(50) (PERF_NOTES). Top-p and typical first try
# the best ``K`` candidates for these K (exact whenever they already hold the required mass, which they
# nearly always do), and sort the whole row only when they do not.
PREFIX_GUESSES = (256, 4096)
_FLT_MAX = torch.finfo(torch.float32).max


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-1)


NATIVE_TOPK_MAX = 1024  # above this, the native kernel's selections cost more than torch's one topk


def native_topk(x: torch.Tensor, k: int) -> bool:
    """Whether ``topk(x, k)`` runs the native kernel: CPU float32 [B, V], 0 < k <= NATIVE_TOPK_MAX."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and 0 < k <= min(NATIVE_TOPK_MAX, x.shape[-1])):
        return False
    from ..model import native

    return native.available()


def topk(x: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, -1, largest)`` of ``x [B, V]`` (no NaN), values sorted, ties to the lowest id. On the CPU
    (``native_topk``) the native kernel (``native.topk_rows``): ~40 us for k = 257 of 49,152 logits where
    torch's topk spends ~190 us at any k, a good part of a 4 ms decode step; elsewhere torch's."""
    if native_topk(x, k):
        from ..model import native

        if largest:
            return native.topk_rows(x.contiguous(), k)
        vals, ids = native.topk_rows(x.neg(), k)
        return vals.neg_(), ids
    return x.topk(k, dim=-1, largest=largest)


def _truncate(logits: torch.Tensor, active: torch.Tensor, keep_fn, *params: torch.Tensor) -> torch.Tensor:
    """Run ``keep_fn(rows_logits, *rows_params) -> keep mask`` on the active rows only and set the other
    entries of those rows to -inf. Inactive rows are not even looked at (no sort is spent on them)."""
    if not bool(active.any()):
        return logits
    if bool(active.all()):
        return logits.masked_fill(~keep_fn(logits, *params), NEG_INF)
    rows = active.nonzero().squeeze(-1)
    keep_rows = keep_fn(logits.index_select(0, rows), *(p.index_select(0, rows) for p in params))
    remove = torch.zeros_like(logits, dtype=torch.bool)
    remove[rows] = ~keep_rows
    return logits.masked_fill(remove, NEG_INF)


def _crossing_key(key: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor, largest: bool,
                  guesses: tuple[int, ...] | None = None) -> torch.Tensor:
    """Order each row's tokens by ``key`` (decreasing if ``largest``) and accumulate their ``probs``: the
    key of the token at which the cumulative mass first reaches ``mass`` ([b, 1]). Mass is summed in
    float64. Uses topk(K) for K in ``guesses`` when a row's first K tokens already hold the mass (then the
    result is exactly the full sort's), else a full sort; each row takes the first guess that holds its
    mass, so one flat row does not send the whole batch to the larger ones."""
    target = _col(mass.double())
    guesses = PREFIX_GUESSES if guesses is None else guesses
    k = next((k for k in guesses if k < key.shape[-1]), None)
    if k is None:
        sk, idx = key.sort(dim=-1, descending=largest)
        cum = probs.gather(-1, idx).double().cumsum(-1)
    else:
        sk, idx = topk(key, k, largest=largest)
        cum = probs.gather(-1, idx).double().cumsum(-1)
        held = (cum[:, -1:] >= target).squeeze(-1)
        if not bool(held.all()):  # the rows whose mass is spread further: the next guess, on them alone
            rest = (~held).nonzero().squeeze(-1)
            out = _crossing_at(sk, cum, target)
            out[rest] = _crossing_key(key[rest], probs[rest], mass[rest], largest, guesses[guesses.index(k) + 1:])
            return out
    return _crossing_at(sk, cum, target)


def _crossing_at(sk: torch.Tensor, cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The key at the first position whose cumulative mass reaches ``target`` (rows whose prefix holds it)."""
    before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass strictly before each position
    c = ((before < target).sum(-1, keepdim=True) - 1).clamp(max=cum.shape[-1] - 1)  # crossing position (0-based)
    return sk.gather(-1, c)


def _entropy(probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i log p_i per row ([b, 1]); 0 log 0 = 0 (clamping -inf to -FLT_MAX makes it 0 * x)."""
    return -(probs * logp.clamp(min=-_FLT_MAX)).sum(-1, keepdim=True)


# ---- masks ---------------------------------------------------------------------------------------

def mask_tokens(logits: torch.Tensor, allowed: torch.Tensor | None, banned: torch.Tensor | None):
    """l_i = -inf where ``allowed[b, i]`` is False or ``banned[b, i]`` is True ([B, V] boolean masks,
    None = no constraint)."""
    out = logits
    if allowed is not None:
        out = out.masked_fill(~allowed, NEG_INF)
    if banned is not None:
        out = out.masked_fill(banned, NEG_INF)
    return out


def mask_eos(logits: torch.Tensor, eos_mask: torch.Tensor, num_generated: torch.Tensor,
             min_tokens: torch.Tensor):
    """min_tokens: l_eos = -inf in rows with ``num_generated < min_tokens`` (``eos_mask`` [V] boolean)."""
    active = num_generated < min_tokens
    if not bool(active.any()) or not bool(eos_mask.any()):
        return logits
    return logits.masked_fill(_col(active) & eos_mask.unsqueeze(0), NEG_INF)


# ---- additive / multiplicative adjustments ------------------------------------------------------

def logit_bias(logits: torch.Tensor, bias: torch.Tensor):
    """l_i += bias[b, i] (dense [B, V] bias, zero where unset: those entries are unchanged)."""
    return logits + bias


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor):
    """CTRL (Keskar et al. 2019) as in Hugging Face / vLLM: for every token seen before (``seen`` [B, V]),
    l_i -> l_i / r if l_i > 0 else l_i * r. With r > 1 the token always becomes less likely."""
    r = _col(penalty)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen & _col(penalty != 1.0), penalised, logits)


def frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                               presence: torch.Tensor):
    """OpenAI: l_i -> l_i - f * count_i - p * [count_i > 0] (``counts`` [B, V] integers)."""
    c = counts.to(logits.dtype)
    return logits - _col(frequency) * c - _col(presence) * (c > 0).to(logits.dtype)


def temperature_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                        presence: torch.Tensor):
    """Seed 000 (frequency/presence penalties as a per-token temperature):

        k_i = 1 + f * count_i + p * [count_i > 0]        l_i -> (l_i - min_j l_j) / k_i

    Dividing pushes a logit towards 0, which penalises only non-negative logits, so each active row is
    first shifted so that its smallest finite logit is 0 (a shift alone leaves softmax unchanged).
    ``-inf`` entries stay ``-inf``. Rows with f = p = 0 pass through unchanged."""
    active = (frequency != 0) | (presence != 0)
    if not bool(active.any()):
        return logits
    c = counts.to(logits.dtype)
    k = 1.0 + _col(frequency) * c + _col(presence) * (c > 0).to(logits.dtype)
    finite = torch.isfinite(logits)
    row_min = torch.where(finite, logits, torch.full_like(logits, float("inf"))).amin(-1, keepdim=True)
    row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
    shifted = (logits - row_min) / k
    return torch.where(_col(active) & finite, shifted, logits)


def temperature(logits: torch.Tensor, t: torch.Tensor):
    """q = softmax(l / T). Computed as (l - max_j l_j) / T, the same distribution, so that a tiny T
    cannot overflow to +inf (every entry is <= 0 and the maximum is exactly 0). Rows with T = 0 (greedy,
    see ``greedy``) and T = 1 pass through unchanged."""
    active = (t > 0) & (t != 1)
    if not bool(active.any()):
        return logits
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    if bool(active.all()):
        return (logits - row_max) / _col(t)
    safe_t = torch.where(active, t, torch.ones_like(t))
    return torch.where(_col(active), (logits - row_max) / _col(safe_t), logits)


def greedy(logits: torch.Tensor):
    """Temperature 0: log-probabilities one-hot at argmax_i l_i (0 there, -inf elsewhere). Among equal
    maxima the lowest token id wins (torch.argmax returns the first maximal index)."""
    return torch.full_like(logits, NEG_INF).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)


# ---- truncation ---------------------------------------------------------------------------------

def top_k(logits: torch.Tensor, k: torch.Tensor):
    """Keep the k largest logits of each row (k = 0: off; k >= V keeps everything).

    Exactly k tokens stay even when several are tied with the k-th largest value: the tied ones with the
    lowest token ids are kept. (torch.topk does not document how it orders ties, so the choice is made
    explicitly: all tokens strictly above the k-th value, then tied ones in index order.) Uses one
    ``topk`` with the batch's largest k; no sort."""
    V = logits.shape[-1]
    active = (k > 0) & (k < V)
    if not bool(active.any()):
        return logits
    kmax = int(k[active].max())
    vals = topk(logits, kmax + 1)[0]  # [B, kmax + 1], descending (kmax < V)
    kk = _col(torch.where(active, k, torch.ones_like(k)))
    kth, nxt = vals.gather(-1, kk - 1), vals.gather(-1, kk)
    kth = torch.where(_col(active), kth, torch.full_like(kth, NEG_INF))  # inactive rows: remove nothing
    tie = active & (nxt == kth).squeeze(-1) & torch.isfinite(kth).squeeze(-1)
    if not bool(tie.any()):  # the k-th and (k+1)-th values differ: "l >= kth" is exactly k tokens
        return logits.masked_fill(logits < kth, NEG_INF)
    above = logits > kth
    tied = (logits == kth) & _col(active)
    keep = above | (tied & (tied.cumsum(-1) <= _col(k) - above.sum(-1, keepdim=True)))
    return logits.masked_fill(_col(active) & ~keep, NEG_INF)


def top_p(logits: torch.Tensor, p: torch.Tensor):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most probable tokens whose mass
    reaches p, INCLUDING the token that crosses p. With p_(1) >= p_(2) >= ... the sorted probabilities,
    the crossing rank is c = min{j : p_(1) + ... + p_(j) >= p}, and token i is kept iff p_i >= p_(c)
    (tokens tied with the crossing one are kept too). p = 1: off. Only rows with p < 1 are looked at,
    and through a bounded topk unless the mass is spread over more than PREFIX_GUESSES[-1] tokens."""
    return _truncate(logits, p < 1.0, _top_p_keep, p)


def _top_p_keep(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return probs >= _crossing_key(probs, probs, p, largest=True)  # -inf entries stay -inf anyway


def min_p(logits: torch.Tensor, m: torch.Tensor):
    """Min-p (Nguyen et al. 2024): keep p_i >= m * max_j p_j, i.e. l_i - max_j l_j >= log m (no softmax
    or sort needed). m = 0: off; m = 1 keeps the tokens tied at the maximum."""
    active = m > 0
    if not bool(active.any()):
        return logits
    log_m = torch.where(active, m, torch.ones_like(m)).double().log()
    thresh = logits.amax(-1, keepdim=True).double() + _col(torch.where(active, log_m, float("-inf")))
    return logits.masked_fill(logits.double() < thresh, NEG_INF)


def typical(logits: torch.Tensor, mass: torch.Tensor):
    """Locally typical sampling (Meister et al. 2023), as Hugging Face's TypicalLogitsWarper: with
    H = -sum p log p and d_i = |-log p_i - H|, order tokens by increasing d_i and keep them until their
    cumulative mass reaches ``mass``, including the crossing token; every token whose d_i is <= the
    crossing token's stays. mass = 1: off."""
    return _truncate(logits, mass < 1.0, _typical_keep, mass)


def _typical_keep(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    dev = (-logp - _entropy(probs, logp)).abs()  # +inf for removed tokens
    return dev <= _crossing_key(dev, probs, mass, largest=False)


def epsilon(logits: torch.Tensor, eps: torch.Tensor):
    """Epsilon sampling (Hewitt et al. 2022): keep p_i >= eps; the most probable token(s) always stay.
    eps = 0: off."""
    active = eps > 0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = (probs < _col(eps)) & (logits < logits.amax(-1, keepdim=True))  # eps = 0 removes nothing
    return logits.masked_fill(remove, NEG_INF)


def eta(logits: torch.Tensor, eta_: torch.Tensor):
    """Eta sampling (Hewitt et al. 2022): keep p_i >= min(eta, sqrt(eta) * exp(-H)) with H the entropy of
    the current distribution; the most probable token(s) always stay. eta = 0: off."""
    active = eta_ > 0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    ent = _entropy(probs, torch.log_softmax(logits, dim=-1))
    e = _col(eta_)
    thresh = torch.minimum(e, e.sqrt() * torch.exp(-ent))  # eta = 0 -> 0: removes nothing
    remove = (probs < thresh) & (logits < logits.amax(-1, keepdim=True))
    return logits.masked_fill(remove, NEG_INF)


# ---- the samplers of llama.cpp / text-generation-webui ------------------------------------------

def dynamic_temperature(logits: torch.Tensor, t: torch.Tensor, spread: torch.Tensor, exponent: torch.Tensor):
    """Dynamic temperature (llama.cpp's ``temp_ext``, "entropy-scaled range"): with N the number of tokens
    still possible (finite logits), H the entropy of softmax(l) and H / log N in [0, 1],

        T_dyn = T_min + (T_max - T_min) * (H / log N)^exponent,  T_min = max(0, T - r), T_max = T + r

    then l / T_dyn as ``temperature`` does. Rows with r = 0 use the plain ``t`` (rows with t = 0 are
    greedy and pass through); rows with N <= 1 pass through (llama.cpp: nothing to scale). llama.cpp counts
    its candidate list, which in its default order has already been truncated; here truncation comes after
    temperature, so N is every token not removed by masks / bias / penalties."""
    active = (spread > 0) & (t > 0)
    if not bool(active.any()):
        return temperature(logits, t)
    finite = torch.isfinite(logits)
    n = finite.sum(-1)
    probs = torch.softmax(logits, -1)
    ent = _entropy(probs, torch.log_softmax(logits, -1)).squeeze(-1)
    norm = (ent / n.clamp(min=2).to(ent.dtype).log()).clamp(0.0, 1.0)
    lo, hi = (t - spread).clamp(min=0.0), t + spread
    t_dyn = lo + (hi - lo) * norm.pow(exponent)
    # T_dyn = 0 only when the row is already one-hot (H = 0), where any positive T gives the same result
    t_dyn = torch.where(active & (n > 1), t_dyn.clamp(min=1e-6), t)
    return temperature(logits, t_dyn)


def top_n_sigma(logits: torch.Tensor, n: torch.Tensor):
    """Top-nσ (Tang et al. 2024, llama.cpp ``top_n_sigma``): keep l_i >= max_j l_j - n * sigma, sigma the
    population standard deviation of the row's finite logits (removed tokens do not count). Scaling the row
    scales max and sigma alike, so the kept set does not depend on the temperature. n = 0: off."""
    active = n > 0
    if not bool(active.any()):
        return logits
    finite = torch.isfinite(logits)
    x = torch.where(finite, logits, torch.zeros_like(logits)).double()
    count = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = x.sum(-1, keepdim=True) / count
    var = (torch.where(finite, x - mean, torch.zeros_like(x)) ** 2).sum(-1, keepdim=True) / count
    thresh = logits.amax(-1, keepdim=True).double() - _col(n) * var.sqrt()
    remove = _col(active) & (logits.double() < thresh)
    return logits.masked_fill(remove, NEG_INF)


def xtc(logits: torch.Tensor, fire: torch.Tensor, threshold: torch.Tensor):
    """XTC, "exclude top choices" (text-generation-webui / llama.cpp): in rows where ``fire`` is True (the
    pipeline draws it with probability ``xtc_probability``), every token with p_i >= threshold is removed
    EXCEPT the least probable of them -- and only when at least two tokens reach the threshold, so a row
    keeps at least one of its good choices. Among tokens tied at that least probability all stay (llama.cpp
    keeps one of them, whichever its sort put last)."""
    if not bool(fire.any()):
        return logits
    probs = torch.softmax(logits, -1).double()
    above = (probs >= _col(threshold)) & (probs > 0) & _col(fire)
    least = torch.where(above, probs, torch.full_like(probs, 2.0)).amin(-1, keepdim=True)
    remove = above & (probs > least) & (above.sum(-1, keepdim=True) >= 2)
    return logits.masked_fill(remove, NEG_INF)
