"""Showing the distribution: the explainer trace, the per-knob report of ``logitlab dist`` and its plot.

Everything here *reads* the one sampling pipeline (``sampling.process``); nothing re-implements a knob.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .sampling import SamplingBatch, SamplingParams, process

KNOBS = ("top_k", "top_p", "min_p", "typical_p", "epsilon", "eta")
_OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0, "eta": 0.0}


def format_trace(trace: list[dict], tokenizer) -> str:
    """One block per generated token: each stage with the candidates it kept and the mass it removed,
    then the entropy of the final distribution and the drawn token's rank and probability."""
    lines = []
    for step in trace:
        stages = step["stages"]
        final = next((s for s in stages if "entropy" in s), {})
        tok = final.get("token")
        piece = repr(tokenizer.decode([tok])) if tok is not None else "?"
        lines.append(f"step {step['step']}: drew {piece} (id {tok}) rank {final.get('rank')} "
                     f"p={final.get('prob', float('nan')):.4f} entropy={final.get('entropy', float('nan')):.3f}")
        for s in stages:
            if "stage" in s:
                lines.append(f"    {s['stage']:<14} kept {s['kept']:>6}  removed mass {s['mass_removed']:.4f}")
    return "\n".join(lines)


def _kept(logits: torch.Tensor, params: SamplingParams, vocab: int, eos: list[int]) -> torch.Tensor:
    batch = SamplingBatch.build([params], [0], vocab, eos)
    lp = process(logits.unsqueeze(0), batch)[0]
    return lp


def knob_report(engine, prompt: str, params: SamplingParams, top: int = 20) -> dict:
    """The next-token distribution after ``prompt``, sorted, with the cumulative mass, and for each
    truncation knob that is set: which tokens it keeps on its own and the mass it keeps."""
    logits = engine.next_token_logits(prompt).float()
    V = logits.shape[-1]
    eos = sorted(engine.tokenizer.eos_token_ids)
    temperature = params.temperature
    p_raw = torch.softmax(logits, -1)
    p_temp = torch.softmax(logits / temperature, -1) if temperature > 0 else torch.nn.functional.one_hot(
        logits.argmax(), V).float()
    order = torch.argsort(p_temp, descending=True, stable=True)
    cum = p_temp[order].cumsum(0)

    base = dataclasses.replace(params, **_OFF, n=1, seed=0, stop=[], max_tokens=1)
    knobs = {}
    for name in KNOBS:
        if getattr(params, name) != _OFF[name]:
            kept = torch.isfinite(_kept(logits, dataclasses.replace(base, **{name: getattr(params, name)}), V, eos))
            knobs[name] = {"value": getattr(params, name), "kept": int(kept.sum()),
                           "kept_mass": float(p_temp[kept].sum()), "mask": kept}
    final_lp = _kept(logits, dataclasses.replace(params, n=1, seed=0, stop=[], max_tokens=1), V, eos)
    final_p = final_lp.exp()
    final_kept = torch.isfinite(final_lp)
    rows = []
    for rank, tid in enumerate(order[:top].tolist()):
        rows.append({
            "rank": rank + 1, "id": tid, "token": engine.tokenizer.decode([tid]),
            "p_model": float(p_raw[tid]), "p": float(p_temp[tid]), "cumulative": float(cum[rank]),
            "kept_by": {k: bool(v["mask"][tid]) for k, v in knobs.items()},
            "p_final": float(final_p[tid]),
        })
    ent = -(p_temp[p_temp > 0] * p_temp[p_temp > 0].log()).sum()
    return {
        "prompt": prompt, "temperature": temperature,
        "entropy": float(ent), "perplexity_of_next_token": math.exp(float(ent)),
        "knobs": {k: {kk: vv for kk, vv in v.items() if kk != "mask"} for k, v in knobs.items()},
        "final": {"kept": int(final_kept.sum()), "kept_mass": float(p_temp[final_kept].sum())},
        "rows": rows,
    }


def format_knob_report(r: dict) -> str:
    knobs = list(r["knobs"])
    head = f"{'rank':>4} {'id':>6} {'token':<16} {'p':>8} {'cum':>7} " + "".join(f"{k:>10}" for k in knobs)
    lines = [f"next token after {r['prompt']!r} (temperature {r['temperature']}, "
             f"entropy {r['entropy']:.3f} nats)", head + f" {'p_final':>8}"]
    for row in r["rows"]:
        marks = "".join(f"{'kept' if row['kept_by'][k] else '-':>10}" for k in knobs)
        lines.append(f"{row['rank']:>4} {row['id']:>6} {row['token']!r:<16} {row['p']:8.4f} "
                     f"{row['cumulative']:7.4f} {marks} {row['p_final']:8.4f}")
    for k, v in r["knobs"].items():
        lines.append(f"{k}={v['value']}: keeps {v['kept']} tokens, {v['kept_mass']:.4f} of the mass")
    lines.append(f"all knobs together: keep {r['final']['kept']} tokens, {r['final']['kept_mass']:.4f} of the mass")
    return "\n".join(lines)


def plot_knob_report(r: dict, path: str) -> None:
    """Bar chart of the sorted distribution with the cumulative-mass line and the top-k / top-p /
    min-p cut-offs marked (as in seed 002's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
    colors = ["tab:blue" if row["p_final"] > 0 else "lightgray" for row in rows]
    ax.bar(x, [row["p"] for row in rows], color=colors, label="p (after temperature); gray = removed")
    ax.set_xticks(x, [row["token"].replace("\n", "\\n") for row in rows], rotation=70, fontsize=8)
    ax.set_ylabel("probability")
    ax2 = ax.twinx()
    ax2.plot(x, [row["cumulative"] for row in rows], color="tab:orange", marker=".", label="cumulative mass")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative mass")
    knobs = r["knobs"]
    if "top_k" in knobs and knobs["top_k"]["kept"] <= len(rows):
        ax.axvline(knobs["top_k"]["kept"] + 0.5, color="tab:red", ls="--", label=f"top-k = {knobs['top_k']['value']}")
    if "top_p" in knobs:
        k = knobs["top_p"]["kept"]
        if k <= len(rows):
            ax.axvline(k + 0.5, color="tab:green", ls="--", label=f"top-p = {knobs['top_p']['value']}")
        ax2.axhline(knobs["top_p"]["value"], color="tab:green", ls=":", lw=0.8)
    if "min_p" in knobs:
        p_max = rows[0]["p"] if rows else 0
        ax.axhline(knobs["min_p"]["value"] * p_max, color="tab:purple", ls=":",
                   label=f"min-p = {knobs['min_p']['value']}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title(f"next token after {r['prompt'][-60:]!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
