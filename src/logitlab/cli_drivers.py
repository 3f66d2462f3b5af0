"""The ``logitlab`` CLI's decoding-driver parts: the ``generate`` flags for beam search, structured output,
contrastive and speculative decoding, and the ``classify`` and ``demo`` commands. The options themselves and
how they run live in ``logitlab.decoding.modes`` (shared with the server).

Wiring into ``cli.py`` (see the functions' docstrings):

    add_driver_flags(g)                        # after the generate parser's own flags
    add_driver_commands(sub, _add_model_flags)   # after the other subcommands
    # in cmd_generate, once params, engine and prompt exist:
    if driver_requested(a):
        return run_driver_generate(a, engine, prompt, params)
"""

from __future__ import annotations

import argparse
import json
import sys

from .decoding.modes import DriverOptions, generate_with_driver
from .sampling import ParamError, SamplingParams

# ---- argparse --------------------------------------------------------------------------------------

def add_driver_flags(parser: argparse.ArgumentParser) -> None:
    """Add the decoding-driver flags to the ``generate`` parser."""
    g = parser.add_argument_group("search, structured output, contrastive and speculative decoding")
    g.add_argument("--beam-width", type=int, default=None, metavar="B",
                   help="beam search with B beams; returns the --n best as choices")
    g.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="beam score = logprob / len^A (0: favour short, 1: per-token mean)")
    g.add_argument("--contrastive-amateur", default=None, metavar="early-exit:K|MODEL",
                   help="contrastive decoding against the first K layers or another model")
    g.add_argument("--contrastive-alpha", type=float, default=0.1, metavar="A",
                   help="plausibility head: tokens with p >= A * max p")
    g.add_argument("--speculative", default=None, metavar="early-exit:K|ngram|int8|gguf|MODEL",
                   help="speculative decoding with this draft (same output distribution; gguf: the model's GGUF "
                        "file on its own blocks, for a float32/bfloat16/int8 target)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, metavar="G", help="tokens drafted per round")
    g.add_argument("--json-schema", default=None, metavar="FILE|JSON", help="output must match this JSON schema")
    g.add_argument("--regex", default=None, metavar="R", help="output must match this regular expression")
    g.add_argument("--grammar", default=None, metavar="FILE", help="output must follow this EBNF grammar")
    g.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="output is exactly one of these (chosen by full-sequence probability); repeatable")


def driver_requested(a: argparse.Namespace) -> bool:
    return DriverOptions.from_args(a).requested()


def _check_syntax(spec) -> None:
    """Parse a regex, EBNF grammar or JSON schema on its own (no vocabulary needed), so that a typo is
    refused before the model loads; compiling it for the vocabulary happens when it runs."""
    from .decoding.constraints import _FIELD, _xgr

    g = _xgr().Grammar
    parse = {"regex": g.from_regex, "grammar": g.from_ebnf, "json_schema": g.from_json_schema}.get(spec.kind)
    if parse is None:
        return
    if spec.kind == "grammar" and "::=" not in spec.value:
        raise ParamError("grammar", f"is neither EBNF (no '::=' rule) nor a file that exists: {spec.value[:60]!r}")
    try:
        parse(spec.value)
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or ["does not parse"])[0]
        reason = reason.split(": ", 1)[-1] if reason.startswith("[") else reason  # "[time] file.cc:83: why"
        raise ParamError(_FIELD[spec.kind], f"does not compile: {reason}") from None


def check_driver_args(a: argparse.Namespace, params: SamplingParams) -> None:
    """The driver flags, checked before the model is loaded: ranges, combinations, the structured-output
    spec (JSON parsed, files read). What needs the model (``early-exit:K``, compiling a regex) is checked
    when the driver runs."""
    opts = DriverOptions.from_args(a)
    opts.validate()
    spec = opts.spec()
    if spec is not None:
        _check_syntax(spec)
    if opts.choice is not None and not all(opts.choice):
        raise ParamError("choice", "every choice must be a non-empty string")
    if opts.beam_width is not None and params.n > opts.beam_width:
        raise ParamError("n", f"must be at most beam_width ({opts.beam_width}), got {params.n}")


def run_driver_generate(a: argparse.Namespace, engine, prompt, params: SamplingParams) -> int:
    """``cmd_generate``'s path when a decoding-driver flag is set: prints the choices (or the OpenAI-shaped JSON
    with the extra fields under ``--json``)."""
    res, extra = generate_with_driver(engine, prompt, params, DriverOptions.from_args(a))
    if getattr(a, "json", False):
        from .openai_format import completion_response

        resp = completion_response(engine.tokenizer, engine.name, [res], echo=getattr(a, "echo", False),
                                   logprobs=a.logprobs is not None, extra=extra)
        print(json.dumps(resp, ensure_ascii=False, indent=2))
        return 0
    echo = a.prompt if getattr(a, "echo", False) else ""
    for c in res.choices:
        if len(res.choices) > 1 or "beam" in extra:
            score = ""
            if "beam" in extra:
                b = extra["beam"]
                score = f", score {b['scores'][c.index]:.3f}, logprob {b['logprobs'][c.index]:.3f}"
            print(f"--- choice {c.index} (finish_reason: {c.finish_reason}{score})")
        print(echo + c.text)
        if c.error:
            print(f"[error: {c.error}]", file=sys.stderr)
    if "speculative" in extra:
        s = extra["speculative"]
        print(f"[speculative {s['draft']}: drafted {s['drafted']}, accepted {s['accepted']} "
              f"({s['acceptance_rate']:.0%}), {s['tokens_per_round']:.2f} tokens per target forward, "
              f"{s['generated'] / max(s['seconds'], 1e-9):.1f} tok/s]", file=sys.stderr)
    if "choice" in extra:
        ch = extra["choice"]
        print("  ".join(f"{c!r}: {p:.1%}" for c, p in zip(ch["choices"], ch["probs"], strict=True)),
              file=sys.stderr)
    return 0


def _model_options(a: argparse.Namespace) -> dict:
    """Engine.load's keywords from the model flags (cli.py's ``_add_model_flags``, or the ones added here)."""
    return {"dtype": a.dtype, "exact_head": getattr(a, "exact_head", False),
            "activations": getattr(a, "activations", None)}


def cmd_classify(a: argparse.Namespace) -> int:
    from .classify import classify, parse_example

    if not a.example:
        raise ParamError("example", "give at least two --example TEXT=LABEL")
    examples = [parse_example(e) for e in a.example]
    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    if labels is not None and not all(labels):
        raise ParamError("labels", f"every label must be non-empty, got {a.labels!r}")
    from .classify import FewShotClassifier

    FewShotClassifier(examples, labels, separator=a.separator)  # refuses bad examples/labels before loading
    from .engine import Engine
    from .weights import DEFAULT_MODEL

    engine = Engine.load(a.model or DEFAULT_MODEL, **_model_options(a))
    results = classify(engine, examples, a.inputs, labels=labels, separator=a.separator)
    if a.json:
        print(json.dumps([{"input": r.input, "label": r.label, "probs": r.probs, "logprobs": r.logprobs}
                          for r in results], ensure_ascii=False, indent=2))
        return 0
    for r in results:
        probs = "  ".join(f"{k}: {v:.1%}" for k, v in sorted(r.probs.items(), key=lambda kv: -kv[1]))
        print(f"{r.input}\t-> {r.label}\t({probs})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demos import DESCRIPTIONS, NO_ENGINE, check_demo, run_demo

    if a.name == "list":
        for name, what in DESCRIPTIONS.items():
            print(f"{name:>12}  {what}")
        return 0
    check_demo(a.name, a.plot)  # a --plot the demo cannot draw is refused before the model loads
    engine = None
    if (a.model or a.dtype != "float32") and a.name not in NO_ENGINE:
        from .engine import Engine
        from .weights import DEFAULT_MODEL

        engine = Engine.load(a.model or DEFAULT_MODEL, **_model_options(a))
    run_demo(a.name, engine=engine, plot=a.plot)
    return 0


def add_driver_commands(subparsers, add_model_flags=None) -> None:
    """Add ``classify`` and ``demo`` to the CLI's subparsers. ``add_model_flags`` is cli.py's
    ``_add_model_flags`` (adds --model and --dtype); without it equivalent flags are added here."""
    from .demos import DEMOS

    def model_flags(p):
        if add_model_flags is not None:
            add_model_flags(p)
        else:
            p.add_argument("--model", default=None)
            p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "gguf"])

    c = subparsers.add_parser("classify", help="few-shot classification: label probabilities per input")
    c.add_argument("inputs", nargs="+", metavar="INPUT")
    c.add_argument("--example", action="append", default=[], metavar="TEXT=LABEL", help="repeatable")
    c.add_argument("--labels", default=None, metavar="A,B,...", help="labels to score (default: the examples')")
    c.add_argument("--separator", default=" :", help="between text and label in the pattern (default ' :')")
    c.add_argument("--json", action="store_true")
    model_flags(c)
    c.set_defaults(func=cmd_classify)

    d = subparsers.add_parser("demo", help="the seeds' examples on the real model: " + ", ".join(DEMOS))
    d.add_argument("name", choices=["list", *DEMOS])
    d.add_argument("--plot", default=None, metavar="OUT.png", help="also draw it (matplotlib, Agg)")
    model_flags(d)
    d.set_defaults(func=cmd_demo)
