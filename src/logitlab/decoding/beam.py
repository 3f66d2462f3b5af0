"""Beam search with length normalisation (seed 003).

Keep the ``B`` best partial hypotheses ("beams"). At every step all beams run in ONE batched forward
(cache slots ``0..B-1``), each beam's next-token log-probabilities come from the sampling pipeline
(constraint mask, logit bias, penalties, ... with temperature 0 read as 1: beam search needs the
distribution, not its argmax), and the ``B * V`` extensions are ranked by their summed log-probability
``s = sum_i log p(x_i | x_<i)``. The ``B`` best extensions that are not end-of-sequence become the new
beams; the KV cache is reordered in place (``KVCache.reorder``) so slot ``j`` holds the history of new
beam ``j``. Extensions ending in EOS are finished hypotheses, kept aside with the length-normalised score

    score(x) = s(x) / |x| ** alpha            (|x| counts generated tokens, EOS included; alpha = length_penalty)

alpha = 0 ranks by probability (favours short outputs), alpha = 1 by mean log-probability per token.

Stopping: at ``max_tokens`` (live beams are finished with reason "length"), or as soon as ``B``
hypotheses are finished and no live beam can still beat the ``B``-th best of them. Log-probabilities
are <= 0, so a live beam's sum only falls; its best reachable score is ``s / max_tokens ** alpha`` for
alpha > 0 (a longer divisor helps a negative sum), and ``s / |x| ** alpha`` for alpha <= 0. This bound is
exact, not a heuristic: stopping never changes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.cache import KVCache
from ..sampling import ParamError, SamplingParams
from .constraints import Constraint, PipelineRows, allowed_masks, resolve_model


@dataclass
class Hypothesis:
    token_ids: list[int]
    logprob: float  # sum of the (pipeline) log-probabilities of the generated tokens
    score: float  # logprob / len ** length_penalty
    finish_reason: str  # "stop" (EOS or grammar complete) | "length"
    text: str | None = None


@dataclass
class BeamResult:
    hypotheses: list[Hypothesis]  # the n best, best first
    steps: list[dict] = field(default_factory=list)  # per-step walk-through (trace=True)
    forwards: int = 0


def normalised_score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(1, length) ** length_penalty


def _best_reachable(logprob: torch.Tensor, length: int, max_tokens: int, alpha: float) -> torch.Tensor:
    """Upper bound of the final normalised score of live beams with summed logprob ``logprob``."""
    return logprob / (max_tokens ** alpha if alpha > 0 else max(1, length) ** alpha)


@torch.inference_mode()
def beam_search(
    model_or_engine,
    prompt,
    width: int = 4,
    length_penalty: float = 1.0,
    max_tokens: int = 32,
    n: int = 1,
    eos_token_ids=None,
    params: SamplingParams | None = None,
    constraint: Constraint | None = None,
    trace: bool = False,
    early_stop: bool = True,
) -> BeamResult:
    """The ``n`` best sequences after ``prompt`` (text with an Engine, or token ids) by length-normalised
    log-probability. ``params`` (optional) runs the beams' log-probabilities through the sampling
    pipeline (bias, penalties, banned/allowed tokens, truncation); without it they are the model's raw
    log-probabilities. ``constraint`` (xgrammar) masks each beam's next tokens as the pipeline's first
    stage; each beam keeps its own parse state. ``early_stop=False`` runs to ``max_tokens`` (same result,
    more work: for tests and demos)."""
    model, tokenizer, prompt_ids, eos = resolve_model(model_or_engine, prompt, eos_token_ids)
    if not isinstance(width, int) or width < 1:
        raise ParamError("beam_width", f"must be an integer >= 1, got {width!r}")
    if not isinstance(n, int) or not 1 <= n <= width:
        raise ParamError("n", f"must be between 1 and beam_width ({width}), got {n!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ParamError("max_tokens", f"must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ParamError("length_penalty", f"must be a number, got {length_penalty!r}")
    cfg = model.config
    P = len(prompt_ids)
    if P + max_tokens > cfg.context_length:
        raise ParamError("max_tokens", f"prompt ({P}) + max_tokens ({max_tokens}) exceeds the context "
                         f"length {cfg.context_length}")
    V, W, alpha = cfg.vocab_size, width, float(length_penalty)
    eos_set = set(int(e) for e in eos)

    rows = PipelineRows(params if params is not None else SamplingParams(), prompt_ids, V, sorted(eos_set),
                        count=1, distribution=True)
    cache = KVCache(cfg, W, P + max_tokens, dtype=model.dtype)
    logits = model(torch.tensor([prompt_ids]), torch.arange(P).unsqueeze(0), cache, rows=slice(0, 1))
    forwards = 1
    seqs: list[list[int]] = [[]]
    sums = torch.zeros(1, dtype=torch.float64)
    states = [constraint.start()] if constraint is not None else None
    finished: list[Hypothesis] = []
    steps: list[dict] = []

    for step in range(max_tokens):
        L = step + 1  # length of every extension made in this step
        allowed = allowed_masks(states, V) if states is not None else None
        lp = rows.logprobs(logits, allowed).double()  # [R, V]
        cand = (sums.unsqueeze(1) + lp).view(-1)  # [R * V]
        R = len(seqs)
        k = min(cand.numel(), W + R * len(eos_set))  # enough to hold W live ones after every EOS one
        vals, idx = cand.topk(k)
        parents: list[int] = []
        tokens: list[int] = []
        new_sums: list[float] = []
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            if v == float("-inf"):
                break
            parent, tok = divmod(i, V)
            if tok in eos_set:  # (a complete grammar allows only EOS, so this also ends constrained beams)
                ids = seqs[parent] + [tok]
                finished.append(Hypothesis(ids, v, normalised_score(v, L, alpha), "stop"))
            elif len(parents) < W:
                parents.append(parent)
                tokens.append(tok)
                new_sums.append(v)
        if trace:
            steps.append(_trace_step(step, seqs, sums, lp, W, parents, tokens, new_sums, finished, tokenizer))
        finished.sort(key=lambda h: -h.score)
        del finished[max(W, n):]  # only the best W can matter for the result or the stopping rule
        if not parents:  # no live extension left (every token masked or -inf)
            seqs, sums = [], sums[:0]
            break
        seqs = [seqs[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        sums = torch.tensor(new_sums, dtype=torch.float64)
        if L == max_tokens:
            break
        if early_stop and len(finished) >= W:
            best_live = float(_best_reachable(sums, L, max_tokens, alpha).max())
            if best_live <= finished[W - 1].score:
                seqs, sums = [], sums[:0]
                break
        # Reorder: slot j takes its parent's history (rows beyond the new count keep their own).
        span = max(len(parents), R)
        order = torch.tensor(parents + list(range(len(parents), span)), dtype=torch.long)
        cache.reorder(slice(0, span), order, P + step)
        rows.reorder(torch.tensor(parents, dtype=torch.long), torch.tensor(tokens, dtype=torch.long))
        if states is not None:
            new_states = []
            for p, t in zip(parents, tokens, strict=True):
                s = states[p].fork()
                s.accept(t)
                new_states.append(s)
            states = new_states
        B = len(parents)
        logits = model(torch.tensor(tokens).view(B, 1), torch.full((B, 1), P + step), cache, rows=slice(0, B))
        forwards += 1

    # beams still alive at the end are finished by length
    for s, v in zip(seqs, sums.tolist(), strict=True):
        finished.append(Hypothesis(s, v, normalised_score(v, len(s), alpha), "length"))
    finished.sort(key=lambda h: -h.score)
    best = finished[:n]
    if tokenizer is not None:
        for h in best:
            h.text = tokenizer.decode([t for t in h.token_ids if t not in eos_set])
    return BeamResult(best, steps, forwards)


def _trace_step(step, seqs, sums, lp, W, parents, tokens, new_sums, finished, tokenizer) -> dict:
    """The slide's walk-through: each beam's best W extensions ("current beam candidates", with the
    probability of the whole prefix), the refreshed beam, and the finished hypotheses so far."""

    def show(ids):
        return tokenizer.decode(ids) if tokenizer is not None else ids

    candidates = []
    vals, ids = lp.topk(min(W, lp.shape[-1]), dim=-1)
    for r in range(len(seqs)):
        for v, t in zip(vals[r].tolist(), ids[r].tolist(), strict=True):
            if v > float("-inf"):
                total = float(sums[r]) + v
                candidates.append({"text": show(seqs[r] + [t]), "parent": r, "token_prob": math.exp(v),
                                   "logprob": total, "prob": math.exp(total)})
    return {
        "step": step,
        "candidates": candidates,
        "beams": [{"text": show(seqs[p] + [t]), "logprob": v, "prob": math.exp(v), "parent": p}
                  for p, t, v in zip(parents, tokens, new_sums, strict=True)],
        "finished": [{"text": show(h.token_ids), "logprob": h.logprob, "score": h.score} for h in finished],
    }
