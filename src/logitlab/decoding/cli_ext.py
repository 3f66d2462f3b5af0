"""CLI (and request-field) front end for the decoding drivers: beam search, structured output, contrastive and
speculative decoding on ``generate``, and the ``classify`` and ``demo`` commands.

Wiring into ``cli.py`` (see the functions' docstrings):

    from .decoding.cli_ext import add_driver_commands, add_driver_flags, driver_requested, run_driver_generate
    add_driver_flags(g)                        # after the generate parser's own flags
    add_driver_commands(sub, _add_model_flags)   # after the other subcommands
    # in cmd_generate, once params, engine and prompt exist:
    if driver_requested(a):
        return run_driver_generate(a, engine, prompt, params)

The same options come from server request bodies with ``DriverOptions.from_request(body)`` and run with
``generate_with_driver(engine, prompt, params, options)`` -> (GenerationResult, extra JSON fields).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from ..sampling import ParamError, SamplingParams

MAX_BEAM_WIDTH = 32  # beams share one prompt but each holds a KV-cache row of prompt + max_tokens
MAX_LENGTH_PENALTY = 10.0  # score = logprob / len^A; |A| > 10 only ever picks the shortest or longest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DriverOptions:
    beam_width: int | None = None
    length_penalty: float = 1.0
    contrastive_amateur: str | None = None
    contrastive_alpha: float = 0.1
    speculative: str | None = None
    num_speculative_tokens: int = 4
    json_schema: object = None  # dict, JSON text or file name
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None  # EBNF text or file name
    choice: list[str] | None = None
    read_files: bool = True  # json_schema / grammar may name a file (CLI); a server request's never do

    def requested(self) -> bool:
        return any([self.beam_width is not None, self.contrastive_amateur, self.speculative,
                    self.json_schema is not None, self.json_object, self.regex, self.grammar, self.choice])

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> DriverOptions:
        return cls(beam_width=a.beam_width, length_penalty=a.length_penalty,
                   contrastive_amateur=a.contrastive_amateur, contrastive_alpha=a.contrastive_alpha,
                   speculative=a.speculative, num_speculative_tokens=a.num_speculative_tokens,
                   json_schema=a.json_schema, regex=a.regex, grammar=a.grammar, choice=a.choice)

    @classmethod
    def from_request(cls, body: dict) -> DriverOptions:
        """Server fields: beam_width, length_penalty, contrastive {amateur, alpha}, speculative {draft,
        num_tokens}, guided_json, guided_regex, guided_choice, guided_grammar, response_format {type:
        json_object | json_schema, json_schema: {schema: ...}}."""
        contrastive = body.get("contrastive") or {}
        speculative = body.get("speculative") or {}
        if not isinstance(contrastive, dict):
            raise ParamError("contrastive", "must be an object {amateur, alpha}")
        if not isinstance(speculative, dict):
            raise ParamError("speculative", "must be an object {draft, num_tokens}")
        schema, json_object = body.get("guided_json"), False
        rf = body.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
                raise ParamError("response_format", "type must be text, json_object or json_schema")
            if rf["type"] == "json_object":
                json_object = True
            elif rf["type"] == "json_schema":
                js = rf.get("json_schema") or {}
                schema = js.get("schema", js) if isinstance(js, dict) else js
                if not schema:
                    raise ParamError("response_format", "json_schema needs a schema")
        choice = body.get("guided_choice")
        if choice is not None and (not isinstance(choice, list) or not all(isinstance(c, str) for c in choice)):
            raise ParamError("guided_choice", "must be a list of strings")
        return cls(
            beam_width=body.get("beam_width"), length_penalty=body.get("length_penalty", 1.0),
            contrastive_amateur=contrastive.get("amateur"), contrastive_alpha=contrastive.get("alpha", 0.1),
            speculative=speculative.get("draft"), num_speculative_tokens=speculative.get("num_tokens", 4),
            json_schema=schema, json_object=json_object, regex=body.get("guided_regex"),
            grammar=body.get("guided_grammar"), choice=choice, read_files=False)

    def validate(self) -> None:
        modes = [m for m, on in (("beam_width", self.beam_width is not None),
                                 ("contrastive_amateur", bool(self.contrastive_amateur)),
                                 ("speculative", bool(self.speculative)), ("choice", bool(self.choice))) if on]
        if len(modes) > 1:
            raise ParamError(modes[1], f"cannot be combined with {modes[0]}")
        # Ranges first, before any model is loaded or cache allocated: beam search allocates a KV cache of
        # beam_width rows, and len ** length_penalty overflows a float64 far below 1e308.
        if self.beam_width is not None and (not _is_int(self.beam_width)
                                            or not 1 <= self.beam_width <= MAX_BEAM_WIDTH):
            raise ParamError("beam_width", f"must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not _is_num(self.length_penalty) or not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ParamError("length_penalty", f"must be a number in [-{MAX_LENGTH_PENALTY:g}, "
                                               f"{MAX_LENGTH_PENALTY:g}], got {self.length_penalty!r}")
        if not _is_num(self.contrastive_alpha) or not 0 < self.contrastive_alpha <= 1:
            raise ParamError("contrastive_alpha", f"must be in (0, 1], got {self.contrastive_alpha!r}")
        if not _is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= 64:
            raise ParamError("num_speculative_tokens",
                             f"must be an integer in [1, 64], got {self.num_speculative_tokens!r}")
        if self.speculative and self.spec() is not None:
            raise ParamError("speculative", "cannot be combined with a structured-output constraint")

    def spec(self):
        from .constraints import spec_from_options

        return spec_from_options(json_schema=self.json_schema, regex=self.regex, grammar=self.grammar,
                                 read_files=self.read_files,
                                 json_object=self.json_object)


# ---- running ---------------------------------------------------------------------------------------

def _stop_at(text: str, stops) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in (stops or []) if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _completions(engine, prompt_ids, params, token_lists, reasons, extra_logprobs=None):
    """GenerationResult from token lists: text (EOS removed, cut at stop strings) and, when logprobs are
    asked for, the raw model logprob of every token (one batched scoring forward)."""
    from ..engine import Completion, GenerationResult

    eos = set(engine.tokenizer.eos_token_ids)
    lps = extra_logprobs
    if lps is None and params.logprobs is not None and any(token_lists):
        from ..classify import continuation_logprobs

        nonempty = [i for i, t in enumerate(token_lists) if t]
        scored = continuation_logprobs(engine, prompt_ids, [token_lists[i] for i in nonempty])
        lps = [[] for _ in token_lists]
        for i, s in zip(nonempty, scored, strict=True):
            lps[i] = s
    res = GenerationResult(engine.tokenizer.decode(prompt_ids), list(prompt_ids))
    for i, (ids, reason) in enumerate(zip(token_lists, reasons, strict=True)):
        text, stopped = _stop_at(engine.tokenizer.decode([t for t in ids if t not in eos]), params.stop)
        res.choices.append(Completion(index=i, text=text, token_ids=list(ids),
                                      finish_reason="stop" if stopped else reason,
                                      token_logprobs=list(lps[i]) if lps else [],
                                      top_logprobs=[None] * len(ids) if params.logprobs is not None else None))
    return res


def beam_group(engine, prompt_ids: list[int], params: SamplingParams, opts: DriverOptions, constraint=None):
    """A beam search for ``engine.scheduler``: the group, whose ``requests`` (the ``n`` hypotheses the
    client sees) are what to submit."""
    from ..engine import next_group
    from .beam import BeamGroup, _validate
    from .scheduler import Request

    _validate(opts.beam_width, params.n, params.max_tokens, opts.length_penalty)
    group = BeamGroup(prompt_ids, opts.beam_width, opts.length_penalty, params.max_tokens, params.n,
                      sorted(engine.tokenizer.eos_token_ids), engine.vocab_size, params, constraint)
    gid = next_group()
    group.requests = [Request(list(prompt_ids), params, 0, group=gid, index=i, beam=group) for i in range(params.n)]
    return group


def spec_group(engine, prompt_ids: list[int], params: SamplingParams, opts: DriverOptions):
    """Speculative decoding for ``engine.scheduler``: the group, whose ``requests`` (one per sample) stream
    their tokens as they are accepted. The draft: ``early-exit:K``, ``int8``, ``ngram[:N]``."""
    from ..engine import next_group
    from .constraints import sample_seeds
    from .scheduler import Request
    from .speculative import SpecGroup, make_draft

    draft = make_draft(opts.speculative, engine.model, load=None)
    seeds = sample_seeds(params, params.n)
    group = SpecGroup(prompt_ids, params, seeds, draft, opts.num_speculative_tokens,
                      sorted(engine.tokenizer.eos_token_ids), engine.vocab_size, engine.max_len)
    gid = next_group()
    group.requests = [Request(list(prompt_ids), params, seeds[i], group=gid, index=i, spec=group)
                      for i in range(params.n)]
    return group


def spec_completion(engine, prompt_ids, params: SamplingParams, opts: DriverOptions, group):
    """(GenerationResult, extra) of a finished speculative group: the samples and the draft's statistics."""
    res = _completions(engine, prompt_ids, params, [r.output_ids for r in group.requests],
                       [r.finish_reason for r in group.requests])
    stats = group.stats.to_dict()
    stats["draft"] = opts.speculative
    stats["num_speculative_tokens"] = opts.num_speculative_tokens
    return res, {"speculative": stats}


def beam_completion(engine, prompt_ids, params: SamplingParams, opts: DriverOptions, group):
    """(GenerationResult, extra) of a decided beam search: the hypotheses best first, their scores."""
    hyps = group.result(engine.tokenizer).hypotheses
    res = _completions(engine, prompt_ids, params, [h.token_ids for h in hyps], [h.finish_reason for h in hyps])
    extra = {"beam": {"width": opts.beam_width, "length_penalty": opts.length_penalty,
                      "scores": [h.score for h in hyps], "logprobs": [h.logprob for h in hyps]}}
    return res, extra


def generate_with_driver(engine, prompt, params: SamplingParams, opts: DriverOptions, constraint=None):
    """Run ``prompt`` with the decoding-driver options. Returns (GenerationResult, extra) where ``extra`` holds
    the JSON fields to add to the response (``speculative`` statistics, ``beam`` scores, ``choice``
    probabilities). ``constraint``: the options' constraint already compiled (a server compiles it in a
    bounded worker process); else it is compiled here."""
    opts.validate()
    prompt_ids = engine.encode_prompt(prompt)
    params.validate(engine.vocab_size, context_length=engine.max_len, prompt_len=len(prompt_ids),
                    eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    spec = opts.spec()
    if spec is None:
        constraint = None
    elif constraint is None:
        from .constraints import compile_constraint

        constraint = compile_constraint(spec, engine)
    if opts.choice:
        from ..classify import choose
        from ..sampling.rng import derive_seed

        ranked = choose(engine, prompt_ids, list(opts.choice))
        order = sorted(range(len(opts.choice)), key=lambda i: -ranked.probs[i])
        picks = []
        for i in range(params.n):
            if params.temperature == 0:
                picks.append(order[i % len(order)])
            else:
                seed = derive_seed(params.seed if params.seed is not None else 0, i)
                picks.append(choose(engine, prompt_ids, list(opts.choice), temperature=params.temperature,
                                    seed=seed % (1 << 63)).index)
        ids = [engine.tokenizer.encode(opts.choice[i], add_special_tokens=False) for i in picks]
        res = _completions(engine, prompt_ids, params, ids, ["stop"] * len(ids))
        for c, i in zip(res.choices, picks, strict=True):
            c.text = opts.choice[i]
        extra = {"choice": {"choices": list(opts.choice), "logprobs": ranked.logprobs, "probs": ranked.probs}}
        return res, extra
    if opts.beam_width is not None:  # a mode of the engine's scheduler: step it until the search is decided
        group = beam_group(engine, prompt_ids, params, opts, constraint)
        engine.scheduler.add(group.requests)
        while not group.done:
            engine.scheduler.step()
        return beam_completion(engine, prompt_ids, params, opts, group)
    if opts.contrastive_amateur:
        from .contrastive import contrastive_generate

        out = contrastive_generate(engine, opts.contrastive_amateur, prompt_ids, alpha=opts.contrastive_alpha,
                                   params=params, constraint=constraint)
        res = _completions(engine, prompt_ids, params, out.token_ids, out.finish_reasons)
        return res, {"contrastive": {"amateur": opts.contrastive_amateur, "alpha": opts.contrastive_alpha}}
    if opts.speculative:  # a mode of the engine's scheduler: step it until every sample has finished
        group = spec_group(engine, prompt_ids, params, opts)
        engine.scheduler.add(group.requests)
        while not all(r.finished for r in group.requests):
            engine.scheduler.step()
        return spec_completion(engine, prompt_ids, params, opts, group)
    # A constraint alone runs in the engine's own continuous batch (it streams like any request).
    res = engine.generate(prompt_ids, params, constraint=constraint)[0]
    res.prompt = prompt if isinstance(prompt, str) else res.prompt
    return res, {"constraint": spec.kind}


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
    g.add_argument("--speculative", default=None, metavar="early-exit:K|ngram|int8|MODEL",
                   help="speculative decoding with this draft (same output distribution)")
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
    from .constraints import _FIELD, _xgr

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
        from ..openai_format import completion_response

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


def cmd_classify(a: argparse.Namespace) -> int:
    from ..classify import classify, parse_example

    if not a.example:
        raise ParamError("example", "give at least two --example TEXT=LABEL")
    examples = [parse_example(e) for e in a.example]
    labels = [x.strip() for x in a.labels.split(",")] if a.labels else None
    if labels is not None and not all(labels):
        raise ParamError("labels", f"every label must be non-empty, got {a.labels!r}")
    from ..classify import FewShotClassifier

    FewShotClassifier(examples, labels, separator=a.separator)  # refuses bad examples/labels before loading
    from ..engine import Engine
    from ..weights import DEFAULT_MODEL

    engine = Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype)
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
    from ..demos import DESCRIPTIONS, NO_ENGINE, check_demo, run_demo

    if a.name == "list":
        for name, what in DESCRIPTIONS.items():
            print(f"{name:>12}  {what}")
        return 0
    check_demo(a.name, a.plot)  # a --plot the demo cannot draw is refused before the model loads
    engine = None
    if (a.model or a.dtype != "float32") and a.name not in NO_ENGINE:
        from ..engine import Engine
        from ..weights import DEFAULT_MODEL

        engine = Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype)
    run_demo(a.name, engine=engine, plot=a.plot)
    return 0


def add_driver_commands(subparsers, add_model_flags=None) -> None:
    """Add ``classify`` and ``demo`` to the CLI's subparsers. ``add_model_flags`` is cli.py's
    ``_add_model_flags`` (adds --model and --dtype); without it equivalent flags are added here."""
    from ..demos import DEMOS

    def model_flags(p):
        if add_model_flags is not None:
            add_model_flags(p)
        else:
            p.add_argument("--model", default=None)
            p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])

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
