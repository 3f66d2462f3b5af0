"""Contrastive decoding (seed 003; Li et al. 2023): shift the distribution away from an "amateur".

    head(x)  = { v : p_exp(v | x) >= alpha * max_w p_exp(w | x) }          the expert's plausible tokens
    score(v) = log p_exp(v | x) - log p_ama(v | x)   for v in head(x),   -inf otherwise

What a strong model and a weak model both find likely (generic continuations, repetition loops) scores
low; what only the expert expects scores high. The plausibility head keeps the amateur from promoting
tokens the expert itself finds implausible. The scores are then handed to the ONE sampling pipeline as
its logits: temperature 0 takes their argmax (greedy contrastive decoding), otherwise the pipeline
samples from softmax(score / T) with whatever truncation and penalties the parameters ask for.

The amateur is any model with the same tokenizer (``Amateur``: its own paged KV cache inside the
scheduler), or the expert's own first ``k`` layers (early exit through the final norm and LM head,
``early-exit:K``, read from the expert's own forward pass). Either way a contrastive request is a row of
the scheduler's batch like any other.
A constraint mask (structured output) is applied to both models' logits first, so the head is taken
among the allowed tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..sampling import ParamError, SamplingParams
from .constraints import Constraint, resolve_model, sample_seeds


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


class Amateur:
    """A separate amateur model inside the scheduler: its own paged KV cache and a block table per request.

    Its cache is a mirror of the expert's, caught up lazily: each time a contrastive row needs the amateur's
    next-token logits, the tokens of the row's sequence the amateur has not seen yet (the whole prompt the
    first time, one token per step after) run in one batched forward over the rows that need it. Prompt
    blocks are keyed as in the expert's cache, so the ``n`` samples of a prompt share them. A request's
    table is released when it finishes (``release``)."""

    def __init__(self, model, capacity_tokens: int, block_size: int = 16, name: str = "amateur"):
        from ..model.paged_cache import PagedKVCache

        self.model, self.name = model, name
        self.cache = PagedKVCache(model.config, -(-capacity_tokens // block_size) + 1, block_size, dtype=model.dtype)
        self.tables: dict[int, list[int]] = {}  # request id -> block table
        self.cached: dict[int, int] = {}  # request id -> positions in the amateur's cache

    @torch.inference_mode()
    def logits(self, requests) -> torch.Tensor:
        """[R, V]: the amateur's logits after each request's sequence so far (prompt + output)."""
        from ..model.paged_cache import PagedKVCache

        seqs = [r.prompt_ids + r.output_ids for r in requests]
        bs = self.cache.block_size
        starts = []
        for r, seq in zip(requests, seqs, strict=True):
            if r.id not in self.tables:  # first time: reuse whole cached prompt blocks (a sibling's)
                table = self.cache.match_prefix(seq, len(seq) - 1)
                self.tables[r.id], self.cached[r.id] = table, len(table) * bs
            start = min(self.cached[r.id], len(seq) - 1)  # at least the last token runs (its logits)
            for p in range(start, len(seq)):
                self.cache.ensure_writable(self.tables[r.id], p)
            starts.append(start)
        width = max(len(seq) - a for seq, a in zip(seqs, starts, strict=True))
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        valid = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (seq, a) in enumerate(zip(seqs, starts, strict=True)):
            tokens[i, : len(seq) - a] = torch.tensor(seq[a:])
            valid[i, : len(seq) - a] = True
        positions = torch.arange(width).expand_as(tokens) + torch.tensor(starts).unsqueeze(1)
        tables = [self.tables[r.id] for r in requests]
        out = self.model(tokens, positions, self.cache, valid=valid, block_tables=PagedKVCache.table_tensor(tables))
        for r, seq, table in zip(requests, seqs, tables, strict=True):
            self.cached[r.id] = len(seq)
            self.cache.register_prefix(seq, table, len(seq))
        return out.float()

    def release(self, request) -> None:
        table = self.tables.pop(request.id, None)
        self.cached.pop(request.id, None)
        if table:
            self.cache.release(table)


@dataclass
class ContrastiveOutput:
    token_ids: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    trace: list[list[dict]] | None = None  # per row, per step: the top tokens by score (trace=True)


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
    (``temperature=0``: greedy). It runs in a scheduler of its own, the path every contrastive request of
    the engine takes (no second decode loop)."""
    from .scheduler import Request, Scheduler

    params = params or SamplingParams(temperature=0.0)
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ParamError("contrastive_alpha", f"must be in (0, 1], got {alpha!r}")
    if not amateur_temperature > 0:
        raise ParamError("amateur_temperature", f"must be > 0, got {amateur_temperature!r}")
    model, tokenizer, prompt_ids, eos = resolve_model(expert, prompt, eos_token_ids)
    load = (lambda name: type(expert).load(name)) if hasattr(expert, "tokenizer") else None
    ama, ama_layers = parse_amateur(amateur, model, load)
    params = replace(params, max_tokens=params.max_tokens if max_tokens is None else max_tokens,
                     n=params.n if n is None else n)
    seeds = sample_seeds(params, params.n, seed)
    P = len(prompt_ids)
    ctx = min(model.config.context_length, ama.config.context_length)
    cache_len = min(ctx, P + params.max_tokens)
    if P >= cache_len:
        raise ParamError("prompt", f"has {P} tokens; the context holds {ctx}")
    sched = Scheduler.standalone(model, tokenizer, eos, params.n, cache_len, cache_len)
    who = ama_layers if ama_layers else Amateur(ama, params.n * (cache_len + 64) + 64)
    requests = [Request(list(prompt_ids), params, s, group=0, index=i,
                        constraint=constraint.start() if constraint is not None else None,
                        contrastive=(who, float(alpha), float(amateur_temperature)), trace_contrastive=trace)
                for i, s in enumerate(seeds)]
    out, texts = sched.run_to_end(requests, tokenizer)
    traces = None
    if trace:
        traces = [[dict(step, chosen=_name(tokenizer, t)) for step, t in zip(r.trace, r.output_ids, strict=False)]
                  for r in requests]
    return ContrastiveOutput(out, [r.finish_reason for r in requests], texts, traces)


def _name(tokenizer, token: int):
    """A token as the trace shows it: its text, or its id for a bare model."""
    return tokenizer.decode([token]) if tokenizer is not None else token


def step_trace(le, la, scores, tokenizer, top: int = 5) -> dict:
    """One step of a traced contrastive row: the top tokens by score (the chosen one is added later)."""
    lp_e, lp_a = torch.log_softmax(le.float(), -1), torch.log_softmax(la.float(), -1)
    k = min(top, int(torch.isfinite(scores).sum()))
    vals, ids = scores.topk(max(k, 1))

    return {"expert_top": _name(tokenizer, int(lp_e.argmax())),
            "candidates": [{"token": _name(tokenizer, i), "score": v, "expert_logprob": float(lp_e[i]),
                            "amateur_logprob": float(lp_a[i])} for v, i in zip(vals.tolist(), ids.tolist(),
                                                                                strict=True)]}
