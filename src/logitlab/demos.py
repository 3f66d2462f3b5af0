"""``logitlab demo NAME``: the seeds' slides reproduced on the real model.

Each demo prints what the slide shows (and, with ``plot=PATH``, draws it to a PNG with matplotlib's Agg
backend). Every number comes from the same Engine, sampling pipeline and drivers as everything else.

    repetition   seed 000: the greedy repetition loop, and penalties (and contrastive decoding) breaking it
    temperature  seed 003: next-token distribution after "Once upon a time, there was a" at T = 0 and T = 5
    topk         seed 002: top-k on a peaked vs a flat prompt, and the probability mass k tokens keep
    fewshot      seed 000: few-shot sentiment classification and English -> German translation
    beam         seed 003: a beam search walk-through with n = 3
    kvcache      seed 000/003: cost per generated token with and without the KV cache, by context length
    contrastive  seed 003: greedy vs contrastive decoding (amateur = the model's first layers)
    speculative  seed 003: speculative decoding — same greedy text, acceptance rate and speed-up
"""

from __future__ import annotations

import sys
import time

import torch

from .sampling import ParamError, SamplingParams

GYM = "Yesterday I went to the gym and I was"
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
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    _print(out, f"wrote {plot}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- the demos -----------------------------------------------------------------------------------

def demo_repetition(engine, out=sys.stdout, plot=None, max_tokens: int = 60) -> dict:
    from .decoding.contrastive import contrastive_generate

    runs = {
        "greedy": dict(temperature=0.0),
        "greedy + frequency 0.5 / presence 0.5": dict(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.5),
        "greedy + repetition_penalty 1.3": dict(temperature=0.0, repetition_penalty=1.3),
        "seed 000 per-token temperature (freq 0.1, presence 0.1), T=0.7, seed 0":
            dict(temperature=0.7, temperature_frequency_penalty=0.1, temperature_presence_penalty=0.1, seed=0),
    }
    result = {}
    for name, kw in runs.items():
        text, ids = _gen(engine, GYM, max_tokens=max_tokens, **kw)
        result[name] = {"text": text, "distinct_4grams": _distinct_ngrams(ids)}
    k = max(1, engine.config.num_layers // 4)
    cd = contrastive_generate(engine, f"early-exit:{k}", GYM, alpha=0.1,
                              params=SamplingParams(temperature=0.0), max_tokens=max_tokens)
    result[f"contrastive (amateur = first {k} layers, alpha 0.1)"] = {
        "text": cd.texts[0], "distinct_4grams": _distinct_ngrams(cd.token_ids[0])}
    for name, r in result.items():
        _print(out, f"--- {name}   (distinct 4-grams: {r['distinct_4grams']:.0%})")
        _print(out, GYM + r["text"])
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3))
        names = list(result)
        ax.barh(range(len(names)), [result[n]["distinct_4grams"] for n in names])
        ax.set_yticks(range(len(names)), [n[:40] for n in names], fontsize=7)
        ax.set_xlabel("distinct 4-grams in the continuation")
        ax.set_title("Breaking the repetition loop")
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
    _print(out, "--- few-shot translation:")
    _print(out, TRANSLATION + text)
    return {"sentiment": [(r.input, r.label, r.probs) for r in res], "translation": text.strip()}


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
    return {"hypotheses": [(h.text, h.logprob, h.score) for h in res.hypotheses], "steps": res.steps}


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
    return {"rows": rows}


DEMOS = {
    "repetition": demo_repetition,
    "temperature": demo_temperature,
    "topk": demo_topk,
    "fewshot": demo_fewshot,
    "beam": demo_beam,
    "kvcache": demo_kvcache,
    "contrastive": demo_contrastive,
    "speculative": demo_speculative,
}


DESCRIPTIONS = {line.split()[0]: line.split(None, 1)[1] for line in __doc__.splitlines()
                if line.startswith("    ") and line.split()[0] in DEMOS}


def run_demo(name: str, engine=None, out=sys.stdout, plot: str | None = None, **kwargs) -> dict:
    """Run one demo (loading the default model unless ``engine`` is given)."""
    if name not in DEMOS:
        raise ParamError("demo", f"must be one of {', '.join(DEMOS)}, got {name!r}")
    if engine is None:
        from .engine import Engine

        engine = Engine.load()
    return DEMOS[name](engine, out=out, plot=plot, **kwargs)
