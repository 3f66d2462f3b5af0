"""The next-token distribution before and after the sampling knobs, for the playground's chart.

Every number comes from the one sampling pipeline (``sampling.process``) run on the model's logits:
"after" is the full pipeline; "tempered" is the pipeline with every truncation knob off (bias, penalties
and temperature only: what the truncation knobs cut); each cut-off is the pipeline with just that one
truncation knob on. Nothing here re-implements a knob.
"""

from __future__ import annotations

import dataclasses

import torch

from ..sampling import SamplingBatch, SamplingParams, process

TRUNCATION_OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0, "eta": 0.0}


def _counts(ids: list[int], vocab: int) -> torch.Tensor:
    c = torch.zeros(1, vocab, dtype=torch.int32)
    if ids:
        t = torch.tensor(ids)
        c[0].index_add_(0, t, torch.ones_like(t, dtype=torch.int32))
    return c


def _entropy(p: torch.Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


@torch.inference_mode()
def next_token_distribution(engine, prompt_ids: list[int], generated: list[int], params: SamplingParams,
                            top: int = 50) -> dict:
    """The distribution of the token after ``prompt_ids + generated`` (``generated`` counts as output
    for the penalties), sorted by the tempered probability, ``top`` rows."""
    logits = engine.next_token_logits(list(prompt_ids) + list(generated)).float()[None]  # [1, V]
    V = logits.shape[-1]
    eos = sorted(engine.tokenizer.eos_token_ids)
    out_counts, prompt_counts = _counts(generated, V), _counts(prompt_ids, V)
    base = dataclasses.replace(params, n=1, seed=0, stop=[], max_tokens=1, min_tokens=0, explain=False,
                               logprobs=None)

    def run(p: SamplingParams) -> torch.Tensor:
        """log-probabilities after the pipeline with ``p`` ([V], -inf where removed)."""
        batch = SamplingBatch.build([p], [0], V, eos)
        lp = process(logits.clone(), batch, output_counts=out_counts, prompt_counts=prompt_counts,
                     num_generated=torch.tensor([len(generated)]))
        return lp[0].float()

    p_before = torch.softmax(logits[0], -1)
    lp_after = run(base)
    p_after = lp_after.exp()
    p_tempered = run(dataclasses.replace(base, **TRUNCATION_OFF)).exp()
    order = torch.argsort(p_tempered, descending=True, stable=True)
    cum = p_tempered[order].cumsum(0)
    kept_mask = torch.isfinite(lp_after)

    cutoffs = {}
    for name, off in TRUNCATION_OFF.items():
        value = getattr(params, name)
        if value == off:
            continue
        kept = torch.isfinite(run(dataclasses.replace(base, **{**TRUNCATION_OFF, name: value})))
        cutoffs[name] = {"value": value, "kept": int(kept.sum()), "kept_mass": float(p_tempered[kept].sum())}

    tok = engine.tokenizer
    rows = []
    for rank, tid in enumerate(order[:top].tolist()):
        rows.append({"rank": rank + 1, "id": tid, "token": tok.decode([tid]),
                     "p_before": float(p_before[tid]), "p_tempered": float(p_tempered[tid]),
                     "p_after": float(p_after[tid]), "cumulative": float(cum[rank])})
    return {
        "prompt_tokens": len(prompt_ids), "generated_tokens": len(generated), "vocab_size": V,
        "temperature": params.temperature, "tokens": rows, "cutoffs": cutoffs,
        "kept": int(kept_mask.sum()), "kept_mass": float(p_tempered[kept_mask].sum()),
        "entropy_before": _entropy(p_before), "entropy_after": _entropy(p_after),
    }
