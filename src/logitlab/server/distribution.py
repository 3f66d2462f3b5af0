"""The next-token distribution before and after the sampling knobs, for the playground's views.

Every number comes from the one sampling pipeline (``sampling.process``) run on the model's logits:
"after" is the full pipeline; "tempered" is the pipeline with every truncation knob off (bias, penalties
and temperature only: what the truncation knobs cut); each cut-off is the pipeline with just that one
truncation knob on. Nothing here re-implements a knob. XTC removes its top choices only on a fraction
``xtc_probability`` of the steps, so "after" is that mixture of the pipeline with and without XTC firing:
the distribution the next token is actually drawn from. Mirostat shows its first step (mu = 2 tau).

A structured-output constraint (``allowed``, the grammar's token mask for this step) is the pipeline's
first stage, as in the scheduler: it is part of "tempered" and "after", not of the model's p.

``stage_top > 0`` adds the stage-by-stage view: the pipeline run once with the explainer's tracer
keeping each stage's logits, so every stage's p is read from the pipeline itself (in its own order, with
its own stage names), and each token removed is marked by the first stage that removed it. There XTC
is shown as it acts when it fires. ``seed`` adds one token drawn as a request with that seed would draw it
at this point (``derive_seed(seed, 0)``: the first of its ``n`` samples; the same uniform and XTC coin),
so a path stepped one token at a time is the path ``/v1/completions`` samples (Mirostat aside: its ``mu``
is a state of the whole path, and this shows its first step).
"""

from __future__ import annotations

import dataclasses

import torch

from ..sampling import SamplingBatch, SamplingParams, derive_seed, draw, process, uniforms
from ..sampling import sampler as _sampler

TRUNCATION_OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0, "eta": 0.0,
                  "top_n_sigma": 0.0, "xtc_probability": 0.0, "mirostat": 0}


def _counts(ids: list[int], vocab: int) -> torch.Tensor:
    c = torch.zeros(1, vocab, dtype=torch.int32)
    if ids:
        t = torch.tensor(ids)
        c[0].index_add_(0, t, torch.ones_like(t, dtype=torch.int32))
    return c


def _entropy(p: torch.Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


class _StageRecorder(_sampler._Tracer):
    """The explainer's tracer, also keeping every stage's logits (row 0) for the stage-by-stage view."""

    def __init__(self):
        super().__init__(True)
        self.logits: list[tuple[str, torch.Tensor]] = []

    def __call__(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        self.logits.append((name, after[0].clone()))


class _Step:
    """The pipeline's inputs at one step: the model's logits after ``prompt_ids + generated`` and what
    the penalties, DRY and no-repeat-n-gram read."""

    def __init__(self, engine, prompt_ids: list[int], generated: list[int], allowed: torch.Tensor | None):
        self.engine = engine
        self.logits = engine.next_token_logits(list(prompt_ids) + list(generated)).float()[None]  # [1, V]
        self.V = self.logits.shape[-1]
        self.eos = sorted(engine.tokenizer.eos_token_ids)
        self.out_counts, self.prompt_counts = _counts(generated, self.V), _counts(prompt_ids, self.V)
        self.num_generated = torch.tensor([len(generated)])
        self.history = torch.tensor([list(prompt_ids) + list(generated)], dtype=torch.long)
        self.allowed = allowed
        # the constraint is the pipeline's first stage (as in the scheduler): -inf outside the grammar
        self.masked = self.logits if allowed is None else self.logits.masked_fill(~allowed[None], float("-inf"))

    def batch(self, p: SamplingParams, seed: int = 0) -> SamplingBatch:
        texts = self.engine.scheduler.vocab_texts() if p.dry_multiplier > 0 else None
        return SamplingBatch.build([p], [seed], self.V, self.eos, token_texts=texts)

    def kwargs(self) -> dict:
        return dict(output_counts=self.out_counts, prompt_counts=self.prompt_counts,
                    num_generated=self.num_generated, history=self.history)

    def run_once(self, p: SamplingParams, seed: int = 0) -> torch.Tensor:
        return process(self.masked.clone(), self.batch(p, seed), **self.kwargs())[0].float()

    def run(self, p: SamplingParams) -> torch.Tensor:
        """log-probabilities after the pipeline with ``p`` ([V], -inf where removed), XTC as its mixture."""
        q = p.xtc_probability
        if q == 0 or q == 1:
            return self.run_once(p)
        fired = self.run_once(dataclasses.replace(p, xtc_probability=1.0)).exp()
        not_fired = self.run_once(dataclasses.replace(p, xtc_probability=0.0)).exp()
        return (q * fired + (1 - q) * not_fired).log()

    def stages(self, p: SamplingParams) -> list[tuple[str, torch.Tensor]]:
        """[(stage name, logits [V] after it)]: "model" first, "constraint" when there is one, then every
        stage the pipeline ran, in its order (XTC as when it fires)."""
        if 0 < p.xtc_probability < 1:
            p = dataclasses.replace(p, xtc_probability=1.0)
        rec = _StageRecorder()
        _sampler._pipeline(self.masked.clone(), self.batch(p), self.out_counts, self.prompt_counts,
                           self.num_generated, rec, want_raw=False, history=self.history)
        out = [("model", self.logits[0])]
        if self.allowed is not None:
            out.append(("constraint", self.masked[0]))
        return out + rec.logits

    def sample(self, p: SamplingParams, seed: int) -> tuple[int, torch.Tensor] | None:
        """The token a request seeded ``seed`` draws here (its first sample's seed), with the distribution
        it came from; None when the pipeline leaves no token."""
        s = derive_seed(seed, 0)
        b = self.batch(p, s)
        lp = process(self.masked.clone(), b, **self.kwargs())
        if not bool(torch.isfinite(lp).any()):
            return None
        tok = int(draw(lp, uniforms(b.seeds, self.num_generated))[0])
        return tok, lp[0]


@torch.inference_mode()
def next_token_distribution(engine, prompt_ids: list[int], generated: list[int], params: SamplingParams,
                            top: int = 50, allowed: torch.Tensor | None = None, stage_top: int = 0,
                            seed: int | None = None) -> dict:
    """The distribution of the token after ``prompt_ids + generated`` (``generated`` counts as output
    for the penalties), sorted by the tempered probability, ``top`` rows. ``allowed``: bool [V], the
    constraint's mask for this step. ``stage_top``: add ``stages`` and ``stage_rows`` (that many tokens
    by model p, plus as many of the final distribution's). ``seed``: add ``sampled``."""
    st = _Step(engine, prompt_ids, generated, allowed)
    V = st.V
    base = dataclasses.replace(params, n=1, seed=0, stop=[], max_tokens=1, min_tokens=0, explain=False,
                               logprobs=None)
    p_before = torch.softmax(st.logits[0], -1)
    lp_after = st.run(base)
    p_after = lp_after.exp()
    p_tempered = st.run(dataclasses.replace(base, **TRUNCATION_OFF)).exp()
    order = torch.argsort(p_tempered, descending=True, stable=True)
    cum = p_tempered[order].cumsum(0)
    kept_mask = torch.isfinite(lp_after)

    cutoffs = {}
    for name, off in TRUNCATION_OFF.items():
        value = getattr(params, name)
        if value == off:
            continue
        kept = torch.isfinite(st.run(dataclasses.replace(base, **{**TRUNCATION_OFF, name: value})))
        cutoffs[name] = {"value": value, "kept": int(kept.sum()), "kept_mass": float(p_tempered[kept].sum())}

    tok = engine.tokenizer
    rows = []
    for rank, tid in enumerate(order[:top].tolist()):
        rows.append({"rank": rank + 1, "id": tid, "token": tok.decode([tid]),
                     "p_before": float(p_before[tid]), "p_tempered": float(p_tempered[tid]),
                     "p_after": float(p_after[tid]), "cumulative": float(cum[rank])})
        if allowed is not None:
            rows[-1]["allowed"] = bool(allowed[tid])
    out = {
        "prompt_tokens": len(prompt_ids), "generated_tokens": len(generated), "vocab_size": V,
        "temperature": params.temperature, "tokens": rows, "cutoffs": cutoffs,
        "kept": int(kept_mask.sum()), "kept_mass": float(p_tempered[kept_mask].sum()),
        "entropy_before": _entropy(p_before), "entropy_after": _entropy(p_after),
    }
    if allowed is not None:
        out["constraint"] = _constraint_summary(tok, allowed, p_before)
    if stage_top > 0:
        out["stages"], out["stage_rows"] = _stage_view(tok, st.stages(base), allowed, stage_top)
    if seed is not None:
        drawn = st.sample(base, seed)
        out["sampled"] = None if drawn is None else {
            "id": drawn[0], "token": tok.decode([drawn[0]]), "logprob": float(p_before[drawn[0]].log()),
            "p": float(drawn[1][drawn[0]].exp()), "eos": drawn[0] in st.eos}
    return out


def _constraint_summary(tok, allowed: torch.Tensor, p_model: torch.Tensor, top: int = 40) -> dict:
    """How many tokens the grammar allows here, their model mass, and the most probable of them."""
    p = torch.where(allowed, p_model, torch.zeros_like(p_model))
    n = int(allowed.sum())
    vals, ids = p.topk(min(top, n)) if n else (p[:0], torch.zeros(0, dtype=torch.long))
    return {"allowed": n, "allowed_mass": float(p.sum()),
            "top_allowed": [{"id": i, "token": tok.decode([i]), "p_model": v}
                            for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]}


def _stage_view(tok, stages: list[tuple[str, torch.Tensor]], allowed, top: int) -> tuple[list, list]:
    """Per stage: kept, mass removed (of the p before it), entropy. Per token (the ``top`` most probable
    by model p, then the ``top`` most probable at the end not yet listed): p after every stage and the
    stage that removed it (None: still in)."""
    ps = [torch.softmax(x, -1).nan_to_num(0.0) for _, x in stages]  # a row of all -inf: p = 0
    finite = [torch.isfinite(x) for _, x in stages]
    summary = []
    for i, (name, _) in enumerate(stages):
        removed = finite[i - 1] & ~finite[i] if i else ~finite[0]
        summary.append({"stage": name, "kept": int(finite[i].sum()),
                        "mass_removed": float(ps[i - 1][removed].sum()) if i else 0.0,
                        "entropy": _entropy(ps[i])})
    V = ps[0].shape[0]
    order = torch.argsort(ps[0], descending=True, stable=True)
    rank_model = torch.empty(V, dtype=torch.long)
    rank_model[order] = torch.arange(1, V + 1)
    ids = order[:top].tolist()
    shown = set(ids)
    final_top = ps[-1].topk(min(top, V))
    ids += [i for i, v in zip(final_top.indices.tolist(), final_top.values.tolist(), strict=True)
            if v > 0 and i not in shown]
    # the first stage at which each token's logit became -inf (len(stages): never)
    gone = torch.stack([~f for f in finite]).to(torch.int8)  # [S, V]; once removed, a token stays removed
    first = torch.where(gone.any(0), gone.argmax(0), torch.full((V,), len(stages)))
    p_table = torch.stack(ps)[:, ids].T.tolist()  # [rows, S]
    rows = []
    for tid, p_row in zip(ids, p_table, strict=True):
        f = int(first[tid])
        rows.append({"id": tid, "token": tok.decode([tid]), "rank_model": int(rank_model[tid]), "p": p_row,
                     "removed_by": stages[f][0] if f < len(stages) else None,
                     "allowed": None if allowed is None else bool(allowed[tid])})
    return summary, rows
