"""``logitlab demo NAME``: the seeds' slides reproduced on the real model.

Each demo prints what the slide shows and, with ``plot=PATH``, draws it to a PNG with matplotlib's Agg backend
(a demo with nothing to draw refuses ``--plot`` with a one-line error before any work). Every number comes from
the same Engine, sampling pipeline and drivers as everything else. Where SmolLM2-135M cannot reproduce a
slide's result, the demo says so and shows what the model does instead.

    repetition   seed 000: the greedy "leg press" loop, set up on purpose, broken by each penalty
    temperature  seed 003: next-token distribution after "Once upon a time, there was a" at T = 0 and T = 5
    topk         seed 002: top-k on a peaked vs a flat prompt, and the probability mass k tokens keep
    epsilon      seed 003: epsilon sampling: the long tail below epsilon removed, the rest renormalised
    fewshot      seed 000: few-shot sentiment classification and English -> German translation
    yesno        seed 001: "Is the sky blue?" answered greedily with the output restricted to yes / no
    beam         seed 003: a beam search walk-through with n = 3
    kvcache      seed 000/003: cost per generated token with and without the KV cache, by context length
    contrastive  seed 003: greedy vs contrastive decoding (amateur = the model's first layers)
    speculative  seed 003: speculative decoding — same greedy text, acceptance rate and speed-up
    game         seed 001: the summarization game: cross-entropy of a paragraph after each prefix
    aot          seed 001: arrow of time: a tiny model trained forwards and backwards (a one-minute toy run)
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import torch

from .sampling import ParamError, SamplingParams

GYM = "Yesterday I went to the gym and I was"
# seed 000: "Here the 'leg press' pattern is introduced on purpose" -- the prompt already holds the loop
LEG_PRESS = GYM + " doing my workout" + " and I was doing the leg press" * 4 + " and I was"
ONCE = "Once upon a time, there was a"
# seed 002's prompts ("The greatest basketball player of all time is...", "The car is...") had made-up
# scores; on SmolLM2 the basketball prompt is not peaked, so the peaked example is a factual completion.
PEAKED = "The capital of France is"
FLAT = "My favorite food is"
SENTIMENT = [("I loved the movie", "Positive"), ("It was way too long", "Negative"),
             ("The dialogue was fine, but the story didn't make sense.", "Negative")]
SENTIMENT_INPUTS = ["The leading actress did a wonderful job.", "I want my money back.",
                    "A beautiful, moving film."]
TRANSLATION = ("I love the beach / Ich liebe den Strand\nWhat time is it? / Wie spät ist es?\n"
               "The beer is ten dollars. / Das Bier kostet zehn Dollar.\nWhere can I get a coffee? /")
SLIDE_TRANSLATION = " Wo kann ich einen Kaffee bekommen?"  # the slide's continuation
YESNO = ("Is the sky blue?", "yes")  # seed 001's question and the answer a model that knows gives
YESNO_CONTROL = ("Is the sun cold?", "no")  # the same form with the other answer: does the model tell them apart?
GAME_PARAGRAPH = ("The tower is 330 metres tall, about the same height as an 81-storey building, and the tallest "
                  "structure in Paris. It was designed by the engineer Gustave Eiffel for the 1889 World's Fair.")
GAME_PREFIXES = ("Eiffel Tower", "The Eiffel Tower in Paris:", "Banana bread recipe")

# demos that draw nothing, and why (``--plot`` is refused before any work)
NO_PLOT = {"contrastive": "it compares generated texts side by side; there is nothing to draw"}


def _print(out, *args):
    print(*args, file=out)


def _distinct_ngrams(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _gen(engine, prompt, **kw) -> tuple[str, list[int]]:
    c = engine.generate(prompt, SamplingParams(**kw))[0].choices[0]
    return c.text, c.token_ids


def _distribution(engine, prompt: str, params: SamplingParams) -> torch.Tensor:
    """The pipeline's final next-token probabilities after ``prompt`` under ``params``."""
    from .decoding.constraints import PipelineRows

    ids = engine.encode_prompt(prompt)
    logits = engine.next_token_logits(ids).unsqueeze(0)
    rows = PipelineRows(params, ids, engine.vocab_size, sorted(engine.tokenizer.eos_token_ids), 1)
    return rows.logprobs(logits)[0].exp()


def _savefig(fig, plot, out):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    _print(out, f"wrote {plot}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- the demos -----------------------------------------------------------------------------------

# seed 000's penalties, each alone, on the loop set up in the prompt. The loop is *in the prompt*, so the
# OpenAI-style penalties count prompt tokens too (penalize_prompt); repetition_penalty always does.
PENALTIES = {
    "greedy, no penalty": {},
    "repetition_penalty 1.3": dict(repetition_penalty=1.3),
    "frequency_penalty 1.0": dict(frequency_penalty=1.0, penalize_prompt=True),
    "presence_penalty 1.5": dict(presence_penalty=1.5, penalize_prompt=True),
    "seed 000 temperature penalty (frequency 1.1, presence 1.2)":
        dict(temperature_frequency_penalty=0.1, temperature_presence_penalty=0.2, penalize_prompt=True),
}


def demo_repetition(engine, out=sys.stdout, plot=None, max_tokens: int = 40, contrastive: bool = True) -> dict:
    """Seed 000: greedy decoding falls into a loop on its own; then the "leg press" loop is set up on purpose
    in the prompt and each penalty, alone and still greedy, is shown breaking it (or not)."""
    prompts = [GYM] + [LEG_PRESS] * len(PENALTIES)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0)] + [
        SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw) for kw in PENALTIES.values()]
    res = engine.generate(prompts, params)  # one continuous batch
    natural = res[0].choices[0]
    result = {"natural loop": {"prompt": GYM, "text": natural.text,
                               "distinct_4grams": _distinct_ngrams(natural.token_ids)}}
    for name, r in zip(PENALTIES, res[1:], strict=True):
        c = r.choices[0]
        result[name] = {"prompt": LEG_PRESS, "text": c.text, "distinct_4grams": _distinct_ngrams(c.token_ids),
                        "leg_press": c.text.count("leg press")}
    if contrastive:
        from .decoding.contrastive import contrastive_generate

        k = max(1, engine.config.num_layers // 4)
        cd = contrastive_generate(engine, f"early-exit:{k}", LEG_PRESS, alpha=0.1,
                                  params=SamplingParams(temperature=0.0), max_tokens=max_tokens)
        result[f"contrastive decoding (amateur = first {k} layers, alpha 0.1)"] = {
            "prompt": LEG_PRESS, "text": cd.texts[0], "distinct_4grams": _distinct_ngrams(cd.token_ids[0]),
            "leg_press": cd.texts[0].count("leg press")}
    r = result["natural loop"]
    _print(out, f"--- greedy falls into a loop on its own (distinct 4-grams: {r['distinct_4grams']:.0%})")
    _print(out, GYM + r["text"])
    _print(out, f"\n--- the loop set up on purpose; greedy continuations of:\n{LEG_PRESS}")
    for name, r in result.items():
        if name == "natural loop":
            continue
        _print(out, f"* {name}: 'leg press' {r['leg_press']}x, distinct 4-grams {r['distinct_4grams']:.0%}")
        _print(out, "  ..." + r["text"])
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [n for n in result if n != "natural loop"]
        ax.barh(range(len(names)), [result[n]["distinct_4grams"] for n in names], color="tab:blue")
        for i, n in enumerate(names):
            ax.text(0.01, i, f"'leg press' x{result[n]['leg_press']}", va="center", color="white", fontsize=8)
        ax.set_yticks(range(len(names)), [textwrap.fill(n, 32) for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"distinct 4-grams in the {max_tokens}-token greedy continuation")
        ax.set_title("Breaking the 'leg press' loop (seed 000)", fontsize=10)
        _savefig(fig, plot, out)
    return result


def demo_temperature(engine, out=sys.stdout, plot=None, top: int = 12, temperatures=(0.0, 5.0)) -> dict:
    tok = engine.tokenizer
    result = {}
    for T in temperatures:
        p = _distribution(engine, ONCE, SamplingParams(temperature=T))
        vals, ids = p.topk(top)
        text, _ = _gen(engine, ONCE, max_tokens=12, temperature=T, seed=0)
        result[T] = {"top": [(tok.decode([i]), v) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)],
                     "sample": text}
    # ranked by T=1 so both columns list the same tokens; as on the slide, the probabilities are
    # renormalised over these top tokens (top-k after temperature: the ranking does not change)
    base = _distribution(engine, ONCE, SamplingParams(temperature=1.0)).topk(top).indices.tolist()
    cols = {T: _distribution(engine, ONCE, SamplingParams(temperature=T, top_k=top)) for T in temperatures}
    _print(out, f"{ONCE!r} -> (renormalised over the top {top}; the samples use the whole vocabulary)")
    _print(out, f"{'token':>14} " + " ".join(f"{'T=' + format(T, 'g'):>8}" for T in temperatures))
    for i in base:
        _print(out, f"{tok.decode([i])!r:>14} " + " ".join(f"{float(cols[T][i]):8.1%}" for T in temperatures))
    for T in temperatures:
        _print(out, f"T={T:g} sample: {ONCE}{result[T]['sample']}")
    if plot:
        plt = _plt()
        fig, axes = plt.subplots(1, len(temperatures), figsize=(4 * len(temperatures), 3.2), sharey=True)
        for ax, T in zip(axes, temperatures, strict=True):
            ax.bar(range(top), [float(cols[T][i]) for i in base])
            ax.set_xticks(range(top), [tok.decode([i]).strip() for i in base], rotation=60, fontsize=7)
            ax.set_title(f"T = {T:g}")
        axes[0].set_ylabel("probability")
        _savefig(fig, plot, out)
    return result


def demo_topk(engine, out=sys.stdout, plot=None, k: int = 3, max_k: int = 20) -> dict:
    tok = engine.tokenizer
    result = {}
    for name, prompt in (("peaked", PEAKED), ("flat", FLAT)):
        p = _distribution(engine, prompt, SamplingParams(temperature=1.0))
        vals, ids = p.topk(max_k)
        mass = vals.cumsum(0)
        kept = _distribution(engine, prompt, SamplingParams(temperature=1.0, top_k=k))
        result[name] = {"prompt": prompt, "kept_mass": float(mass[k - 1]), "mass_curve": mass.tolist(),
                        "top": [(tok.decode([i]), v) for i, v in zip(ids[:k].tolist(), vals[:k].tolist(),
                                                                     strict=True)],
                        "after_top_k": [float(kept[i]) for i in ids[:k].tolist()]}
        _print(out, f"--- {name}: {prompt!r}")
        for (t, v), a in zip(result[name]["top"], result[name]["after_top_k"], strict=True):
            _print(out, f"{t!r:>16} {v:7.2%} -> {a:7.2%} after top-k={k}")
        _print(out, f"top-{k} keeps {result[name]['kept_mass']:.2%} of the probability mass")
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in result:
            ax.plot(range(1, max_k + 1), result[name]["mass_curve"], marker="o", ms=3,
                    label=f"{name}: {result[name]['prompt']!r}")
        ax.axvline(k, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("k")
        ax.set_ylabel("probability mass kept by top-k")
        ax.legend(fontsize=7)
        _savefig(fig, plot, out)
    return result


def demo_epsilon(engine, out=sys.stdout, plot=None, prompt: str = ONCE, epsilons=(0.001, 0.01, 0.05),
                 samples: int = 3, max_tokens: int = 16, show: int = 300) -> dict:
    """Seed 003: epsilon sampling keeps the tokens with p >= epsilon and renormalises: the long tail, each
    token unlikely but many together, is gone."""
    p = _distribution(engine, prompt, SamplingParams(temperature=1.0))
    vals = p.sort(descending=True).values
    result = {"prompt": prompt, "sorted_p": vals[:show].tolist(), "epsilons": {}}
    _print(out, f"next token after {prompt!r}: {int((p > 0).sum())} tokens possible")
    for eps in epsilons:
        q = _distribution(engine, prompt, SamplingParams(temperature=1.0, epsilon=eps))
        kept = q > 0
        mass = float(p[kept].sum())
        result["epsilons"][eps] = {"kept": int(kept.sum()), "kept_mass": mass}
        _print(out, f"epsilon = {eps:g}: keeps {int(kept.sum())} tokens ({mass:.1%} of the mass); the "
                    f"{int((~kept & (p > 0)).sum())} below it held {1 - mass:.1%} together")
    mid = epsilons[len(epsilons) // 2]
    runs = {"whole distribution": 0.0, f"epsilon = {mid:g}": mid}
    for name, eps in runs.items():
        c = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, epsilon=eps, seed=0,
                                                   n=samples))[0].choices
        result[name] = [x.text for x in c]
        _print(out, f"--- {samples} samples, {name} (same seeds):")
        for x in c:
            _print(out, "    " + (prompt + x.text).replace("\n", "\\n"))
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.semilogy(range(1, len(result["sorted_p"]) + 1), result["sorted_p"], color="tab:blue", label="p, sorted")
        for eps, color in zip(epsilons, ("tab:green", "tab:orange", "tab:red", "tab:purple"), strict=False):
            n = result["epsilons"][eps]["kept"]
            ax.axhline(eps, color=color, ls="--", lw=1,
                       label=f"epsilon = {eps:g}: keeps {n} ({result['epsilons'][eps]['kept_mass']:.0%} of the mass)")
        ax.set_xlabel("rank")
        ax.set_ylabel("probability (log scale)")
        ax.set_title(f"epsilon sampling after {prompt!r}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")  # the curve falls from top left: this corner is empty
        _savefig(fig, plot, out)
    return result


def demo_fewshot(engine, out=sys.stdout, plot=None) -> dict:
    from .classify import FewShotClassifier

    clf = FewShotClassifier(SENTIMENT)
    _print(out, "--- few-shot sentiment (prompt for the first input):")
    _print(out, clf.prompt(SENTIMENT_INPUTS[0]))
    res = clf.classify(engine, SENTIMENT_INPUTS)
    for r in res:
        probs = ", ".join(f"{k} {v:.1%}" for k, v in r.probs.items())
        _print(out, f"{r.input!r:>45} -> {r.label}   ({probs})")
    text, _ = _gen(engine, TRANSLATION, max_tokens=16, temperature=0.0, stop=["\n"])
    matches = text.strip() == SLIDE_TRANSLATION.strip()
    _print(out, "--- few-shot translation (greedy):")
    _print(out, TRANSLATION + text)
    if matches:
        _print(out, "(this is the slide's translation)")
    else:
        ours = engine.score(text, context=TRANSLATION).total_logprob if text.strip() else float("nan")
        slide = engine.score(SLIDE_TRANSLATION, context=TRANSLATION).total_logprob
        _print(out, f"NOT the slide's result: the slide shows {SLIDE_TRANSLATION.strip()!r}; {engine.name} does not "
                    f"reproduce it and writes {text.strip()!r} instead (log P: the slide's {slide:.2f}, the "
                    f"model's own {ours:.2f} nats).")
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3))
        labels = list(res[0].probs)
        width = 0.8 / len(labels)
        for j, lab in enumerate(labels):
            ax.bar([i + j * width for i in range(len(res))], [r.probs[lab] for r in res], width, label=lab)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(res))],
                      [r.input if len(r.input) < 30 else r.input[:28] + "…" for r in res], fontsize=8)
        ax.set_ylabel("label probability")
        ax.set_ylim(0, 1.25)  # headroom: the legend sits above the bars, never on them
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_title("few-shot sentiment: the label probabilities", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", ncols=len(labels))
        _savefig(fig, plot, out)
    return {"sentiment": [(r.input, r.label, r.probs) for r in res], "translation": text.strip(),
            "translation_matches_slide": matches}


def _yes_no(engine, question: str, constraint) -> dict:
    from .classify import choose

    tok = engine.tokenizer
    ids = engine.chat_prompt_ids([{"role": "user", "content": question}])
    lp = torch.log_softmax(engine.next_token_logits(ids).float(), -1)
    top = lp.topk(8)
    free, _ = _gen(engine, ids, max_tokens=12, temperature=0.0)
    restricted = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0), constraint=constraint)
    words = ["Yes", "yes", "No", "no"]
    ch = choose(engine, ids, [tok.encode(w, add_special_tokens=False) for w in words])
    p = dict(zip(words, ch.probs, strict=True))
    return {"question": question, "top": [(tok.decode([i]), float(v.exp())) for i, v in
                                          zip(top.indices.tolist(), top.values, strict=True)],
            "free": free, "restricted": restricted[0].choices[0].text,
            "p_yes": p["Yes"] + p["yes"], "p_no": p["No"] + p["no"]}


def demo_yesno(engine, out=sys.stdout, plot=None) -> dict:
    """Seed 001: for 'Is the sky blue?', sample greedily with the output limited to yes and no (a choice
    constraint: the mask is the pipeline's first stage), with the exact probability of each answer."""
    from .decoding.constraints import ConstraintSpec, compile_constraint

    cons = compile_constraint(ConstraintSpec("choice", ("Yes", "No", "yes", "no")), engine)
    result = {}
    for question, expected in (YESNO, YESNO_CONTROL):
        r = _yes_no(engine, question, cons)
        r["expected"] = expected
        result[question] = r
        _print(out, f"--- {question!r} (chat template)")
        _print(out, "  next token, unrestricted: " + ", ".join(f"{t!r} {v:.1%}" for t, v in r["top"]))
        _print(out, f"  greedy, unrestricted:     {r['free']!r}")
        _print(out, f"  greedy, yes/no only:      {r['restricted']!r}   (P(yes) {r['p_yes']:.1%}, "
                    f"P(no) {r['p_no']:.1%}, over the two)")
    sky = result[YESNO[0]]
    if sky["restricted"].strip().lower() == YESNO[1]:
        _print(out, f"As on the slide: restricted to yes/no, greedy answers {sky['restricted']!r}.")
    else:
        _print(out, f"NOT the slide's result: the slide's answer is {YESNO[1]!r}; {engine.name}, restricted to "
                    f"yes/no, answers {sky['restricted']!r} (P(yes) {sky['p_yes']:.0%}). The restriction works -- the "
                    f"answer is always yes or no -- but this small model does not know the answer; compare the "
                    f"control question {YESNO_CONTROL[0]!r} (P(yes) {result[YESNO_CONTROL[0]]['p_yes']:.0%}).")
    if plot:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        t = sky["top"]
        axes[0].bar(range(len(t)), [v for _, v in t], color="tab:gray")
        axes[0].set_xticks(range(len(t)), [repr(w) for w, _ in t], rotation=45, fontsize=7)
        axes[0].set_title(f"next token after {YESNO[0]!r}, unrestricted", fontsize=9)
        axes[0].set_ylabel("probability")
        qs = list(result)
        axes[1].bar([i - 0.2 for i in range(len(qs))], [result[q]["p_yes"] for q in qs], 0.4, label="yes")
        axes[1].bar([i + 0.2 for i in range(len(qs))], [result[q]["p_no"] for q in qs], 0.4, label="no")
        axes[1].set_xticks(range(len(qs)), qs, fontsize=8)
        axes[1].set_ylim(0, 1.25)  # headroom: the legend sits above the bars, never on them
        axes[1].set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        axes[1].set_title("restricted to yes / no", fontsize=9)
        axes[1].legend(fontsize=8, loc="upper center", ncols=2)
        _savefig(fig, plot, out)
    return result


def demo_beam(engine, out=sys.stdout, plot=None, prompt: str = "My favorite thing about fall is",
              width: int = 3, max_tokens: int = 8) -> dict:
    from .decoding.beam import beam_search

    res = beam_search(engine, prompt, width=width, n=width, max_tokens=max_tokens, length_penalty=1.0, trace=True)
    _print(out, f"beam search, n = {width}, prompt {prompt!r}")
    for st in res.steps[:3]:
        _print(out, f"--- step {st['step'] + 1}: current beam candidates")
        for c in sorted(st["candidates"], key=lambda c: -c["prob"]):
            _print(out, f"    {c['text']!r:>40}  {c['prob']:.4f}")
        _print(out, "    beam: " + " | ".join(f"{b['text']!r} {b['prob']:.4f}" for b in st["beams"]))
    _print(out, f"... ({len(res.steps)} steps, {res.forwards} batched forwards)")
    _print(out, "--- best sequences (score = logprob / len^1):")
    for h in res.hypotheses:
        _print(out, f"    {prompt}{h.text!r}  logprob {h.logprob:.3f}  score {h.score:.3f}  ({h.finish_reason})")
    greedy, _ = _gen(engine, prompt, max_tokens=max_tokens, temperature=0.0)
    _print(out, f"--- greedy: {prompt}{greedy!r}  logprob "
                f"{engine.score(greedy, context=prompt).total_logprob:.3f}")
    if plot:
        _plot_beam(res.steps, prompt, width, plot, out)
    return {"hypotheses": [(h.text, h.logprob, h.score) for h in res.hypotheses], "steps": res.steps}


def _plot_beam(steps: list[dict], prompt: str, width: int, plot, out, max_steps: int = 6) -> None:
    """The search tree: x = step, y = log-probability of the prefix; every candidate a gray dot labelled with
    its new text, the kept beams blue and joined to their parents."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 6.5))
    parents = [("", 0.0)]  # (text, logprob) of the rows expanded at this step; the prompt first
    ax.plot([0], [0], "o", color="tab:blue")
    ax.annotate(prompt if len(prompt) < 30 else "…" + prompt[-28:], (0, 0), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
    for st in steps[:max_steps]:
        x = st["step"] + 1
        for c in st["candidates"]:
            ptext, plp = parents[c["parent"]]
            ax.plot([x - 1, x], [plp, c["logprob"]], color="lightgray", lw=0.6, zorder=1)
            ax.plot([x], [c["logprob"]], "o", color="lightgray", ms=4, zorder=2)
            ax.annotate(repr(c["text"][len(ptext):]), (x, c["logprob"]), fontsize=6, color="gray",
                        xytext=(3, -2), textcoords="offset points")
        for b in st["beams"]:
            ptext, plp = parents[b["parent"]]
            ax.plot([x - 1, x], [plp, b["logprob"]], color="tab:blue", lw=1.2, zorder=3)
            ax.plot([x], [b["logprob"]], "o", color="tab:blue", ms=5, zorder=4)
        parents = [(b["text"], b["logprob"]) for b in st["beams"]]
    ax.set_xlabel("step (tokens generated)")
    ax.set_ylabel("log P(prefix | prompt)")
    ax.set_title(f"beam search, n = {width}: candidates (gray) and the kept beam (blue)", fontsize=10)
    _savefig(fig, plot, out)


@torch.inference_mode()
def demo_kvcache(engine, out=sys.stdout, plot=None, lengths=(16, 32, 64, 128, 256, 512), repeats: int = 3) -> dict:
    """Time to produce ONE next token at context length L: with the cache (one token through the model,
    attending to L cached keys) vs without (the whole L-token sequence through the model again)."""
    from .model.cache import KVCache

    model = engine.model
    lengths = [L for L in lengths if L < engine.max_len]
    cache = KVCache(model.config, 1, max(lengths) + 1, dtype=model.dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, max(lengths) + 1))
    model(ids[:, : max(lengths)], torch.arange(max(lengths)).unsqueeze(0), cache)  # fill the cache
    rows = []
    for L in lengths:
        def cached(L=L):
            model(ids[:, L : L + 1], torch.tensor([[L]]), cache)

        def full(L=L):
            model(ids[:, : L + 1], torch.arange(L + 1).unsqueeze(0))

        t_c = min(_time(cached) for _ in range(repeats))
        t_f = min(_time(full) for _ in range(repeats))
        rows.append({"length": L, "with_cache_ms": t_c * 1e3, "without_cache_ms": t_f * 1e3})
    _print(out, f"{'context':>8} {'with cache':>12} {'without':>12} {'ratio':>7}   (ms per generated token)")
    for r in rows:
        _print(out, f"{r['length']:>8} {r['with_cache_ms']:12.1f} {r['without_cache_ms']:12.1f} "
                    f"{r['without_cache_ms'] / r['with_cache_ms']:7.1f}x")
    total_c = sum(r["with_cache_ms"] for r in rows)
    total_f = sum(r["without_cache_ms"] for r in rows)
    _print(out, f"(sum over these lengths: {total_c:.0f} ms with the cache, {total_f:.0f} ms without)")
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["length"] for r in rows], [r["with_cache_ms"] for r in rows], marker="o", label="with KV cache")
        ax.plot([r["length"] for r in rows], [r["without_cache_ms"] for r in rows], marker="o",
                label="without (recompute)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per generated token")
        ax.set_title(f"KV cache cost curve ({engine.name})")
        ax.legend()
        _savefig(fig, plot, out)
    return {"rows": rows}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def demo_contrastive(engine, out=sys.stdout, plot=None, max_tokens: int = 40) -> dict:
    from .decoding.contrastive import contrastive_generate

    result = {}
    for prompt in (GYM, ONCE):
        greedy, _ = _gen(engine, prompt, max_tokens=max_tokens, temperature=0.0)
        _print(out, f"--- {prompt!r}\n  greedy:      {greedy!r}")
        result[prompt] = {"greedy": greedy}
        for k in (max(1, engine.config.num_layers // 4), engine.config.num_layers // 2):
            cd = contrastive_generate(engine, f"early-exit:{k}", prompt, alpha=0.1, max_tokens=max_tokens)
            result[prompt][f"early-exit:{k}"] = cd.texts[0]
            _print(out, f"  contrastive (amateur = first {k} layers): {cd.texts[0]!r}")
    return result


def demo_speculative(engine, out=sys.stdout, plot=None, max_tokens: int = 48, gamma: int = 4) -> dict:
    from .decoding.speculative import benchmark_speculative

    k = max(1, engine.config.num_layers // 4)
    rows = benchmark_speculative(engine, drafts=("ngram", f"early-exit:{k}", "int8"), prompt=GYM,
                                 max_tokens=max_tokens, num_speculative_tokens=gamma)
    _print(out, f"greedy, {max_tokens} tokens after {GYM!r}, gamma = {gamma}")
    _print(out, f"{'draft':>14} {'accept':>7} {'tok/fwd':>8} {'plain tok/s':>12} {'spec tok/s':>11} "
                f"{'speed-up':>9} same-text")
    for r in rows:
        _print(out, f"{r['draft']:>14} {r['acceptance_rate']:7.0%} {r['tokens_per_target_forward']:8.2f} "
                    f"{r['plain_tok_s']:12.1f} {r['spec_tok_s']:11.1f} {r['speedup']:8.2f}x {r['same_as_plain']}")
    if plot:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        names = [r["draft"] for r in rows]
        axes[0].bar(names, [r["acceptance_rate"] for r in rows], color="tab:green")
        axes[0].set_ylim(0, 1)
        axes[0].set_ylabel("acceptance rate")
        axes[1].bar(names, [r["speedup"] for r in rows], color="tab:blue")
        axes[1].axhline(1.0, color="gray", ls="--", lw=0.8)
        axes[1].set_ylabel("speed-up vs plain greedy")
        fig.suptitle(f"speculative decoding, gamma = {gamma} (same greedy text: "
                     f"{all(r['same_as_plain'] for r in rows)})", fontsize=10)
        _savefig(fig, plot, out)
    return {"rows": rows}


def demo_game(engine, out=sys.stdout, plot=None, paragraph: str = GAME_PARAGRAPH, prefixes=GAME_PREFIXES,
              budget: int = 2, top_k: int = 8, paragraph_k: int = 12) -> dict:
    """Seed 001: the summarization game. CE of the paragraph after a few hand-written prefixes and after the
    prefix a quick greedy search finds (``logitlab game`` runs bigger searches)."""
    from .game import format_game, play, search_prefix

    color = hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
    res = play(engine, paragraph, list(prefixes))
    found = search_prefix(engine, paragraph, budget=budget, search="greedy", top_k=top_k, paragraph_k=paragraph_k)
    _print(out, f"paragraph: {paragraph}")
    _print(out, format_game(engine.tokenizer, res, color=color))
    _print(out, f"\n--- a greedy search for a prefix of at most {budget} tokens:")
    _print(out, format_game(engine.tokenizer, found, color=color, header=False))
    if plot:
        plt = _plt()
        import numpy as np

        fig, ax = plt.subplots(figsize=(11, 3.8))
        best_hand = min(res.scores, key=lambda s: s.cross_entropy) if res.scores else res.baseline
        curves = ((res.baseline, "black", "no prefix"), (best_hand, "tab:blue", "best hand-written"),
                  (found.best, "tab:orange", "search"))
        for sc, color, what in curves:
            name = f"{what} {sc.prefix!r}" if sc.prefix_ids else what
            ax.plot(np.cumsum([-x for x in sc.token_logprobs]), lw=1.2, color=color,
                    label=f"{name}: CE {sc.cross_entropy:.1f} nats")
        toks = [engine.tokenizer.decode([t]) for t in res.paragraph_ids]
        ax.set_xticks(range(len(toks)), toks, rotation=80, fontsize=6)
        ax.set_ylabel("cumulative -log p (nats)")
        ax.set_title("the summarization game: cross-entropy of the paragraph after each prefix", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        _savefig(fig, plot, out)
    return {"baseline": res.baseline.cross_entropy,
            "prefixes": {s.prefix: s.cross_entropy for s in res.scores},
            "search": {"prefix": found.best.prefix, "prefix_ids": found.best.prefix_ids,
                       "cross_entropy": found.best.cross_entropy, "forwards": found.forwards,
                       "scored": found.scored}}


def demo_aot(engine=None, out=sys.stdout, plot=None, steps: int = 80, seq_len: int = 32, batch: int = 32) -> dict:
    """Seed 001's arrow of time, as a one-minute toy: the same tiny model trained forwards and backwards on
    ``p1*p2=n`` lines (``logitlab aot`` runs the real experiment: more steps, seeds, natural language)."""
    import tempfile
    from pathlib import Path

    from .train.aot import plot_aot, run_experiment
    from .train.datasets import make_dataset

    ds = make_dataset("primes", prime_range=(10, 300), test=100)
    _print(out, f"arrow of time, toy run: {len(ds.train)} lines like {ds.train[0]!r}, one seed, {steps} steps "
                "per direction, the tiny preset, byte tokens")
    with tempfile.TemporaryDirectory() as d:
        summary, runs = run_experiment(ds, Path(d), seeds=1, steps=steps, preset="tiny", tokenizer="bytes",
                                       log=lambda m: _print(out, m), seq_len=seq_len, batch=batch,
                                       eval_every=max(1, steps // 4), packing="padded", progress=False)
    fw, bw = summary["forward"]["val_loss"], summary["backward"]["val_loss"]
    lo, hi = summary["ci95"]
    _print(out, f"validation loss: forward {fw:.4f}, backward {bw:.4f} nats/token; (bw - fw) / fw = "
                f"{summary['gap']:+.2%} (95% CI {lo:+.2%} .. {hi:+.2%}, held-out documents resampled)")
    if lo > 0:
        verdict = "forward is easier here, the direction the slide reports"
    elif hi < 0:
        verdict = "backward is lower here: the opposite of the slide's finding"
    else:
        verdict = "no clear gap here"
    _print(out, f"{verdict}. One seed and {steps} steps of a tiny model is a toy, not the experiment: the "
                "slide's 0.5-2% forward advantage is measured on natural language with trained models "
                "(`logitlab aot --dataset NAME --out DIR`, several seeds).")
    if plot:
        plot_aot(runs, summary, Path(plot))
        _print(out, f"wrote {plot}")
    return summary


DEMOS = {
    "repetition": demo_repetition,
    "temperature": demo_temperature,
    "topk": demo_topk,
    "epsilon": demo_epsilon,
    "fewshot": demo_fewshot,
    "yesno": demo_yesno,
    "beam": demo_beam,
    "kvcache": demo_kvcache,
    "contrastive": demo_contrastive,
    "speculative": demo_speculative,
    "game": demo_game,
    "aot": demo_aot,
}
NO_ENGINE = {"aot"}  # trains its own tiny models


DESCRIPTIONS = {line.split()[0]: line.split(None, 1)[1] for line in __doc__.splitlines()
                if line.startswith("    ") and line.split()[0] in DEMOS}


def check_demo(name: str, plot: str | None = None) -> None:
    """Refuse, before any work, an unknown demo and a --plot that cannot be honoured."""
    if name not in DEMOS:
        raise ParamError("demo", f"must be one of {', '.join(DEMOS)}, got {name!r}")
    if plot is None:
        return
    if name in NO_PLOT:
        raise ParamError("plot", f"demo {name!r} has no picture: {NO_PLOT[name]}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise ParamError("plot", f"no directory to write {plot!r} in")


def run_demo(name: str, engine=None, out=None, plot: str | None = None, **kwargs) -> dict:
    """Run one demo (loading the default model unless ``engine`` is given or the demo needs none), printing
    to ``out`` (default: the current ``sys.stdout``)."""
    check_demo(name, plot)
    out = sys.stdout if out is None else out
    if engine is None and name not in NO_ENGINE:
        from .engine import Engine

        engine = Engine.load()
    return DEMOS[name](engine, out=out, plot=plot, **kwargs)
