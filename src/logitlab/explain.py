"""Showing the distribution: the explainer trace, the per-knob report of ``logitlab dist`` and its plot.

Everything here *reads* the one sampling pipeline (``sampling.process``); nothing re-implements a knob.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .sampling import SamplingBatch, SamplingParams, process

# the truncation knobs in the pipeline's order (README, step 5); each sees the distribution left by the previous
KNOBS = ("top_n_sigma", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta")
_OFF = {"top_n_sigma": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0, "eta": 0.0,
        "xtc_probability": 0.0, "mirostat": 0}


def _nonneg(x: float) -> float:
    """An entropy for display: -(1 * log 1) is -0.0, and rounding can leave -1e-9; both print as 0.000."""
    return x if x != x else max(x, 0.0) + 0.0  # nan stays nan


def format_trace(trace: list[dict], tokenizer) -> str:
    """One block per generated token: each stage with the candidates it kept and the mass it removed,
    then the entropy of the final distribution and the drawn token's rank and probability."""
    lines = []
    for step in trace:
        stages = step["stages"]
        final = next((s for s in stages if "entropy" in s), {})
        tok = final.get("token")
        piece = repr(tokenizer.decode([tok])) if tok is not None else "?"
        ent = _nonneg(final.get("entropy", float("nan")))
        lines.append(f"step {step['step']}: drew {piece} (id {tok}) rank {final.get('rank')} "
                     f"p={final.get('prob', float('nan')):.4f} entropy={ent:.3f}")
        for s in stages:
            if "stage" in s:
                lines.append(f"    {s['stage']:<14} kept {s['kept']:>6}  removed mass {s['mass_removed']:.4f}")
    return "\n".join(lines)


def _kept(logits: torch.Tensor, params: SamplingParams, vocab: int, eos: list[int], history=None,
          texts=None, prompt_counts=None) -> torch.Tensor:
    batch = SamplingBatch.build([params], [0], vocab, eos, token_texts=texts)
    # history: DRY and no_repeat_ngram_size; prompt_counts: the penalties that count the prompt
    lp = process(logits.unsqueeze(0), batch, history=history, prompt_counts=prompt_counts)[0]
    return lp


def knob_report(engine, prompt: str, params: SamplingParams, top: int = 20) -> dict:
    """The next-token distribution after ``prompt``, sorted, with the cumulative mass, and for each
    truncation knob that is set: how many tokens are left after it in the pipeline (each knob sees the
    distribution the previous ones left, renormalised), how many it would keep on its own, and the mass kept.

    ``p`` is the distribution the truncation knobs start from (after bias, penalties and temperature).
    With top-p set, ``top_p_input`` per row is the distribution top-p itself sees -- ``p`` after top-n-sigma
    and top-k, renormalised -- and ``top_p_cumulative`` its cumulative sum: the curve top-p cuts."""
    logits = engine.next_token_logits(prompt).float()
    V = logits.shape[-1]
    eos = sorted(engine.tokenizer.eos_token_ids)
    prompt_ids = engine.encode_prompt(prompt)
    history = torch.tensor([prompt_ids], dtype=torch.long)
    prompt_counts = torch.zeros(1, V, dtype=torch.int32)
    prompt_counts[0].index_add_(0, history[0], torch.ones(len(prompt_ids), dtype=torch.int32))
    texts = engine.scheduler.vocab_texts() if params.dry_multiplier > 0 else None
    one = dataclasses.replace(params, n=1, seed=0, stop=[], max_tokens=1)

    def run(p: SamplingParams) -> torch.Tensor:
        return _kept(logits, p, V, eos, history, texts, prompt_counts)

    base = dataclasses.replace(one, **_OFF)
    p_raw = torch.softmax(logits, -1)
    p_temp = run(base).exp()  # bias, penalties, temperature: what the first truncation knob sees
    order = torch.argsort(p_temp, descending=True, stable=True)
    cum = p_temp[order].cumsum(0)

    knobs = {}
    if params.mirostat == 0:  # Mirostat replaces the truncation knobs
        for i, name in enumerate(KNOBS):
            value = getattr(params, name)
            if value == _OFF[name]:
                continue
            upto = dataclasses.replace(base, **{k: getattr(params, k) for k in KNOBS[: i + 1]})
            kept = torch.isfinite(run(upto))
            alone = torch.isfinite(run(dataclasses.replace(base, **{name: value})))
            knobs[name] = {"value": value, "kept": int(kept.sum()), "kept_mass": float(p_temp[kept].sum()),
                           "kept_alone": int(alone.sum()), "mask": kept}
    top_p_input = None
    if "top_p" in knobs:
        before = KNOBS[: KNOBS.index("top_p")]
        top_p_input = run(dataclasses.replace(base, **{k: getattr(params, k) for k in before})).exp()
        top_p_cum = top_p_input[order].cumsum(0)
    final_lp = run(one)
    final_p = final_lp.exp()
    final_kept = torch.isfinite(final_lp)
    rows = []
    for rank, tid in enumerate(order[:top].tolist()):
        row = {
            "rank": rank + 1, "id": tid, "token": engine.tokenizer.decode([tid]),
            "p_model": float(p_raw[tid]), "p": float(p_temp[tid]), "cumulative": float(cum[rank]),
            "kept_by": {k: bool(v["mask"][tid]) for k, v in knobs.items()},
            "p_final": float(final_p[tid]),
        }
        if top_p_input is not None:
            row["top_p_input"] = float(top_p_input[tid])
            row["top_p_cumulative"] = float(top_p_cum[rank])
        rows.append(row)
    nz = p_temp[p_temp > 0]
    ent = _nonneg(float(-(nz * nz.log()).sum()))
    return {
        "prompt": prompt, "temperature": params.temperature,
        "entropy": ent, "perplexity_of_next_token": math.exp(ent),
        "knobs": {k: {kk: vv for kk, vv in v.items() if kk != "mask"} for k, v in knobs.items()},
        "final": {"kept": int(final_kept.sum()), "kept_mass": float(p_temp[final_kept].sum())},
        "rows": rows,
    }


def cumulative_curve(r: dict) -> tuple[list[float], int | None, str]:
    """The cumulative curve ``dist --plot`` draws, the number of tokens top-p keeps on it (None when top-p
    is off) and the curve's label. With top-p set it is the curve top-p cut in the pipeline: the cumulative
    mass of the distribution top-p saw (after top-n-sigma and top-k, renormalised), so the top-p line
    sits where that curve first reaches p."""
    if "top_p" in r["knobs"]:
        before = [k for k in KNOBS[: KNOBS.index("top_p")] if k in r["knobs"]]
        label = "cumulative mass top-p sees" + (f" (after {', '.join(before)}, renormalised)" if before else "")
        return [row["top_p_cumulative"] for row in r["rows"]], r["knobs"]["top_p"]["kept"], label
    return [row["cumulative"] for row in r["rows"]], None, "cumulative mass"


def format_knob_report(r: dict) -> str:
    knobs = list(r["knobs"])
    head = f"{'rank':>4} {'id':>6} {'token':<16} {'p':>8} {'cum':>7} " + "".join(f"{k:>10}" for k in knobs)
    lines = [f"next token after {r['prompt']!r} (temperature {r['temperature']}, "
             f"entropy {_nonneg(r['entropy']):.3f} nats)", head + f" {'p_final':>8}"]
    for row in r["rows"]:
        marks = "".join(f"{'kept' if row['kept_by'][k] else '-':>10}" for k in knobs)
        lines.append(f"{row['rank']:>4} {row['id']:>6} {row['token']!r:<16} {row['p']:8.4f} "
                     f"{row['cumulative']:7.4f} {marks} {row['p_final']:8.4f}")
    prev = None
    for k, v in r["knobs"].items():  # in pipeline order: each sees what the previous one left
        after = f" after {prev}" if prev else ""
        alone = f" (on its own: {v['kept_alone']})" if prev and v["kept_alone"] != v["kept"] else ""
        lines.append(f"{k}={v['value']}{after}: keeps {v['kept']} tokens, {v['kept_mass']:.4f} of the mass{alone}")
        prev = k
    lines.append(f"all knobs together: keep {r['final']['kept']} tokens, {r['final']['kept_mass']:.4f} of the mass")
    return "\n".join(lines)


def plot_knob_report(r: dict, path: str) -> None:
    """Bar chart of the sorted distribution with the cumulative-mass curve and the top-k / top-p / min-p
    cut-offs marked (as in seed 002's figures). The cumulative curve and the top-p line are the ones the
    pipeline used (``cumulative_curve``); the legend sits above the axes, where it hides no bar or label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 5), layout="constrained")
    colors = ["tab:blue" if row["p_final"] > 0 else "lightgray" for row in rows]
    ax.bar(x, [row["p"] for row in rows], color=colors, label="p (after bias, penalties, temperature); gray = removed")
    ax.set_xticks(x, [row["token"].replace("\n", "\\n") for row in rows], rotation=70, fontsize=8)
    ax.set_ylabel("probability")
    ax2 = ax.twinx()
    curve, top_p_kept, curve_label = cumulative_curve(r)
    ax2.plot(x, curve, color="tab:orange", marker=".", label=curve_label)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative mass")
    knobs = r["knobs"]
    if "top_k" in knobs and knobs["top_k"]["kept"] <= len(rows):
        ax.axvline(knobs["top_k"]["kept"] + 0.5, color="tab:red", ls="--", label=f"top-k = {knobs['top_k']['value']}")
    if top_p_kept is not None:
        if top_p_kept <= len(rows):
            ax.axvline(top_p_kept + 0.5, color="tab:green", ls="--",
                       label=f"top-p = {knobs['top_p']['value']} (keeps {top_p_kept})")
        ax2.axhline(knobs["top_p"]["value"], color="tab:green", ls=":", lw=0.8)
    if "min_p" in knobs:
        p_max = rows[0]["p"] if rows else 0
        ax.axhline(knobs["min_p"]["value"] * p_max, color="tab:purple", ls=":",
                   label=f"min-p = {knobs['min_p']['value']}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    ax.set_title(f"next token after {r['prompt'][-60:]!r}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
