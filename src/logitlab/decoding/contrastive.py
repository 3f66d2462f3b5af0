"""Contrastive decoding (seed 003; Li et al. 2023): shift the distribution away from an "amateur".

    head(x)  = { v : p_exp(v | x) >= alpha * max_w p_exp(w | x) }          the expert's plausible tokens
    score(v) = log p_exp(v | x) - log p_ama(v | x)   for v in head(x),   -inf otherwise

What a strong model and a weak model both find likely (generic continuations, repetition loops) scores
low; what only the expert expects scores high. The plausibility head keeps the amateur from promoting
tokens the expert itself finds implausible. The scores are then handed to the ONE sampling pipeline as
its logits: temperature 0 takes their argmax (greedy contrastive decoding), otherwise the pipeline
samples from softmax(score / T) with whatever truncation and penalties the parameters ask for.

The amateur is any model with the same tokenizer, or the expert's own first ``k`` layers (early exit
through the final norm and LM head, ``early-exit:K``). Expert and amateur each keep their own KV cache.
A constraint mask (structured output) is applied to both models' logits first, so the head is taken
among the allowed tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..model.cache import KVCache
from ..sampling import ParamError, SamplingParams, draw
from .constraints import (
    Constraint,
    PipelineRows,
    allowed_masks,
    apply_allowed,
    resolve_model,
    sample_seeds,
    stop_token_set,
)
from .yield_point import yield_point


def contrastive_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1,
                       amateur_temperature: float = 1.0) -> torch.Tensor:
    """[B, V] contrastive scores (-inf outside the expert's plausible head). ``amateur_temperature``
    softens (> 1) or sharpens (< 1) the amateur before the subtraction (the paper's tau)."""
    lp_e = torch.log_softmax(expert_logits.float(), dim=-1)
    lp_a = torch.log_softmax(amateur_logits.float() / amateur_temperature, dim=-1)
    # p_e >= alpha * max p_e  <=>  log p_e >= log alpha + max log p_e
    head = lp_e >= lp_e.max(dim=-1, keepdim=True).values + math.log(alpha)
    score = lp_e - lp_a
    return score.masked_fill(~head, float("-inf")).masked_fill(head & torch.isnan(score), float("-inf"))


def parse_amateur(spec, expert, load=None):
    """-> (amateur model, num_layers or None). ``early-exit:K`` uses the expert's first K layers; a model
    name is loaded with ``load`` (e.g. ``Engine.load``); a Transformer or Engine is used as it is."""
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("early-exit"):
            try:
                k = int(s.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ParamError("contrastive_amateur", f"expected early-exit:K, got {spec!r}") from None
            if not 1 <= k < expert.config.num_layers:
                raise ParamError("contrastive_amateur",
                                 f"early-exit:K needs 1 <= K < {expert.config.num_layers}, got {k}")
            return expert, k
        if load is None:
            raise ParamError("contrastive_amateur", f"unknown amateur {spec!r} (early-exit:K or a model)")
        spec = load(s)
    model = spec.model if hasattr(spec, "tokenizer") else spec
    if model.config.vocab_size != expert.config.vocab_size:
        raise ParamError("contrastive_amateur", f"the amateur's vocabulary ({model.config.vocab_size}) differs "
                         f"from the expert's ({expert.config.vocab_size}): it needs the same tokenizer")
    return model, None


@dataclass
class ContrastiveOutput:
    token_ids: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    trace: list[list[dict]] | None = None  # per row, per step: the top tokens by score (trace=True)


@torch.inference_mode()
def contrastive_generate(
    expert,
    amateur,
    prompt,
    alpha: float = 0.1,
    params: SamplingParams | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    seed: int | None = None,
    amateur_temperature: float = 1.0,
    eos_token_ids=None,
    constraint: Constraint | None = None,
    trace: bool = False,
) -> ContrastiveOutput:
    """Generate ``n`` rows (default ``params.n``) with contrastive decoding. ``expert``: Engine or
    Transformer; ``amateur``: ``early-exit:K``, a model name (needs an Engine expert), a Transformer or an
    Engine. ``params`` go through the sampling pipeline applied to the contrastive scores
    (``temperature=0``: greedy)."""
    params = params or SamplingParams(temperature=0.0)
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ParamError("contrastive_alpha", f"must be in (0, 1], got {alpha!r}")
    if not amateur_temperature > 0:
        raise ParamError("amateur_temperature", f"must be > 0, got {amateur_temperature!r}")
    model, tokenizer, prompt_ids, eos = resolve_model(expert, prompt, eos_token_ids)
    load = (lambda name: type(expert).load(name)) if hasattr(expert, "tokenizer") else None
    ama, ama_layers = parse_amateur(amateur, model, load)
    max_tokens = params.max_tokens if max_tokens is None else max_tokens
    n = params.n if n is None else n
    seeds = sample_seeds(params, n, seed)
    P, V = len(prompt_ids), model.config.vocab_size
    ctx = min(model.config.context_length, ama.config.context_length)
    cache_len = min(ctx, P + max_tokens)
    if P >= cache_len:
        raise ParamError("prompt", f"has {P} tokens; the context holds {ctx}")
    ama_cfg = replace(ama.config, num_layers=ama_layers) if ama_layers else ama.config
    cache_e = KVCache(model.config, n, cache_len, dtype=model.dtype)
    cache_a = KVCache(ama_cfg, n, cache_len, dtype=ama.dtype)
    tokens = torch.tensor([prompt_ids])
    pos = torch.arange(P).unsqueeze(0)
    le = model(tokens, pos, cache_e, rows=slice(0, 1))
    la = ama(tokens, pos, cache_a, rows=slice(0, 1), num_layers=ama_layers)
    for b in range(1, n):
        cache_e.copy_slot(0, b, P)
        cache_a.copy_slot(0, b, P)
    le, la = le.expand(n, -1), la.expand(n, -1)
    rows = PipelineRows(params, prompt_ids, V, eos, n, seeds=seeds)
    states = [constraint.start() for _ in range(n)] if constraint is not None else None
    stop_ids = stop_token_set(params, eos)
    out: list[list[int]] = [[] for _ in range(n)]
    done, reasons = [False] * n, ["length"] * n
    traces: list[list[dict]] = [[] for _ in range(n)]
    while True:
        yield_point()  # on the server: let the scheduler step between two tokens
        allowed = allowed_masks(states, V) if states is not None else None
        scores = contrastive_scores(apply_allowed(le, allowed), apply_allowed(la, allowed), alpha,
                                    amateur_temperature)
        lp = rows.logprobs(scores)  # the pipeline over the contrastive scores
        tok = draw(lp, rows.uniforms(rows.num_generated.clone(), 0))
        active = torch.tensor([not x for x in done])
        rows.append(tok, active=active)
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            if trace:
                traces[b].append(_trace(le[b], la[b], scores[b], t, tokenizer))
            out[b].append(t)
            if states is not None:
                states[b].accept(t)
            if t in stop_ids or (states is not None and states[b].terminated):
                done[b], reasons[b] = True, "stop"
            elif len(out[b]) >= max_tokens or P + len(out[b]) >= cache_len:
                done[b] = True
        if all(done):
            break
        positions = torch.tensor([min(P + len(o) - 1, cache_len - 1) for o in out]).view(n, 1)
        step = tok.view(n, 1)
        le = model(step, positions, cache_e, rows=slice(0, n))
        la = ama(step, positions, cache_a, rows=slice(0, n), num_layers=ama_layers)
    texts = [tokenizer.decode([t for t in o if t not in stop_ids]) for o in out] if tokenizer else None
    return ContrastiveOutput(out, reasons, texts, traces if trace else None)


def _trace(le, la, scores, chosen, tokenizer, top: int = 5) -> dict:
    lp_e, lp_a = torch.log_softmax(le.float(), -1), torch.log_softmax(la.float(), -1)
    k = min(top, int(torch.isfinite(scores).sum()))
    vals, ids = scores.topk(max(k, 1))

    def name(i):
        return tokenizer.decode([i]) if tokenizer is not None else i

    return {"chosen": name(chosen), "expert_top": name(int(lp_e.argmax())),
            "candidates": [{"token": name(i), "score": v, "expert_logprob": float(lp_e[i]),
                            "amateur_logprob": float(lp_a[i])} for v, i in zip(vals.tolist(), ids.tolist(),
                                                                                strict=True)]}
