"""The front door of the decoding drivers: request options (CLI flags or server request fields) turned into a
decoding mode -- beam search, structured output, contrastive or speculative decoding, or a fixed choice.

``DriverOptions.from_args(namespace)`` (the CLI, see ``logitlab.cli_drivers``) or ``DriverOptions.from_request(body)``
(the server) build the options; ``generate_with_driver(engine, prompt, params, options)`` runs them ->
(GenerationResult, extra JSON fields). ``beam_group`` / ``spec_group`` and ``*_completion`` let the server's
scheduler run beam search and speculative decoding as streaming modes.
"""

from __future__ import annotations

import argparse
import math
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


def choice_group(engine, prompt_ids: list[int], params: SamplingParams, opts: DriverOptions):
    """``guided_choice`` for ``engine.scheduler``: the options scored as rows after the prompt, then each of
    the ``n`` samples (the group's ``requests``) takes its pick."""
    from ..engine import next_group
    from .choice import ChoiceGroup
    from .scheduler import Request

    options = [engine.tokenizer.encode(c, add_special_tokens=False) for c in opts.choice]
    if any(not o for o in options):
        raise ParamError("choice", "every choice needs at least one token")
    if len(prompt_ids) + max(len(o) for o in options) > engine.max_len:
        raise ParamError("prompt", f"prompt ({len(prompt_ids)}) + longest choice exceeds the context "
                                   f"({engine.max_len})")
    group = ChoiceGroup(prompt_ids, options, params, texts=list(opts.choice))
    gid = next_group()
    group.requests = [Request(list(prompt_ids), params, 0, group=gid, index=i, choice=group)
                      for i in range(params.n)]
    return group


def choice_completion(engine, prompt_ids, params: SamplingParams, opts: DriverOptions, group):
    """(GenerationResult, extra) of a scored choice group: each sample's pick, and every option's logprob."""
    picks = [r.output_ids for r in group.requests]
    res = _completions(engine, prompt_ids, params, picks, ["stop"] * len(picks))
    for c, r in zip(res.choices, group.requests, strict=True):
        c.text = r.text
    ranked = group.ranked
    return res, {"choice": {"choices": list(opts.choice), "logprobs": ranked.logprobs, "probs": ranked.probs}}


def spec_group(engine, prompt_ids: list[int], params: SamplingParams, opts: DriverOptions):
    """Speculative decoding for ``engine.scheduler``: the group, whose ``requests`` (one per sample) stream
    their tokens as they are accepted. The draft: ``early-exit:K``, ``int8``, ``gguf``, ``ngram[:N]``."""
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
    if opts.choice:  # a mode of the engine's scheduler: options scored as rows, a few per step
        group = choice_group(engine, prompt_ids, params, opts)
        engine.scheduler.add(group.requests)
        while not group.done:
            engine.scheduler.step()
        return choice_completion(engine, prompt_ids, params, opts, group)
    if opts.beam_width is not None:  # a mode of the engine's scheduler: step it until the search is decided
        group = beam_group(engine, prompt_ids, params, opts, constraint)
        engine.scheduler.add(group.requests)
        while not group.done:
            engine.scheduler.step()
        return beam_completion(engine, prompt_ids, params, opts, group)
    if opts.contrastive_amateur:  # rows of the engine's scheduler, against early-exit:K or a separate model
        amateur = engine.amateur(opts.contrastive_amateur)
        res = engine.generate(prompt_ids, params, constraint=constraint,
                              contrastive=(amateur, opts.contrastive_alpha, 1.0))[0]
        res.prompt = prompt if isinstance(prompt, str) else res.prompt
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
