"""The playground's views of the whole pipeline, as HTTP routes over the same Engine.

    POST /v1/pipeline       the next-token distribution after prompt + generated, stage by stage (p after
                            each stage, each removed token marked by the stage that removed it), with an
                            optional constraint (guided_regex / guided_choice / guided_json: the tokens
                            it allows) and, given a seed, the token a request with that seed draws there
    POST /v1/beam_tree      a beam search walk-through (seed 003) as token-id paths, for drawing as a tree
    POST /v1/logit_lens     the next-token prediction read after every layer (``logitlab.lens``)
    POST /v1/sequence_view  every token of a text with its logprob, rank and the entropy at its step (GLTR)

``register`` adds them to the app, with the app's own request reading (size limit, strict JSON, OpenAI
error objects), auth and model check. Every model call runs on the runner thread (``Runner.call``), as
``/v1/distribution`` does, so it never races the scheduler; constraints compile off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import lens
from ..engine import start_token
from ..sampling import ParamError, SamplingParams
from ..tokenizer import IncrementalDetokenizer
from . import schemas
from .distribution import next_token_distribution
from .errors import APIError
from .parsing import _logit_bias
from .responses import _json

_STRICT = ConfigDict(extra="forbid", strict=True)
TokenIds = list[int]

# the request fields of a constraint -> the names compile errors use (decoding.constraints._FIELD)
_CONSTRAINT_FIELDS = {"regex": "guided_regex", "choice": "guided_choice", "json_schema": "guided_json"}
MAX_COMPILED = 8  # compiled constraints kept (xgrammar compiles against the whole vocabulary)


class PipelineRequest(schemas.DistributionRequest):
    """``/v1/distribution``'s request, plus: ``stage_top`` (tokens in the stage table, 0 = none), ``seed``
    (draw the token a request with this seed draws here) and one constraint."""

    stage_top: int = Field(default=20, ge=0, le=100)
    seed: int | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_json: dict | str | None = None


class BeamTreeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | TokenIds
    width: int = Field(default=3, ge=1, le=8)
    max_tokens: int = Field(default=6, ge=1, le=24)
    length_penalty: float = Field(default=1.0, ge=-4.0, le=4.0)


class LensRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | TokenIds
    generated: TokenIds = []
    top: int = Field(default=5, ge=1, le=20)


class SequenceRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    text: str | TokenIds


def register(app: FastAPI, engine, runner, *, auth, read_body, check_model) -> None:
    """Add the views' routes to ``app`` (``auth``, ``read_body``, ``check_model``: the app's own)."""
    tok = engine.tokenizer
    compiled: OrderedDict[tuple, object] = OrderedDict()

    async def on_runner(fn):
        return await asyncio.wrap_future(runner.call(fn))

    def context(prompt, generated: list[int], field: str = "prompt") -> tuple[list[int], list[int]]:
        """The prompt's ids and the generated path, checked against the vocabulary and the context."""
        try:
            ids = engine.encode_prompt(prompt)
        except ParamError as e:
            raise ParamError(field, e.reason) from None
        except (UnicodeError, TypeError, ValueError, OverflowError) as e:
            raise ParamError(field, f"cannot be tokenized: {e}") from None
        V = engine.vocab_size
        if any(not 0 <= t < V for t in generated):
            raise ParamError("generated", f"token ids must be integers in [0, {V})")
        if len(ids) + len(generated) > engine.max_len:
            raise ParamError(field, f"has {len(ids) + len(generated)} tokens (with generated); the context "
                                    f"holds {engine.max_len}")
        return ids, list(generated)

    def sampling_params(body: PipelineRequest, n_context: int) -> SamplingParams:
        kw = {f: getattr(body, f) for f in schemas.DIST_PASS_THROUGH if getattr(body, f) is not None}
        if body.logit_bias is not None:
            kw["logit_bias"] = _logit_bias(body.logit_bias)
        try:
            params = SamplingParams(max_tokens=1, seed=body.seed, **kw)
        except ParamError:
            raise
        except (TypeError, ValueError) as e:
            raise APIError(400, f"invalid sampling parameters: {e}", code="invalid_value") from None
        return params.validate(engine.vocab_size, context_length=engine.max_len, prompt_len=n_context,
                               eos_token_ids=sorted(tok.eos_token_ids))

    def constraint_spec(body: PipelineRequest):
        from ..decoding.constraints import spec_from_options

        given = [f for f in _CONSTRAINT_FIELDS.values() if getattr(body, f) is not None]
        if len(given) > 1:
            raise ParamError(given[1], f"give one constraint at a time (also got {given[0]})")
        if not given:
            return None
        from .guards import check_driver_sizes  # the server's size limits (issue 11)

        check_driver_sizes({f: getattr(body, f) for f in given}, app.state.limits)
        schema = body.guided_json
        if isinstance(schema, str):  # the schema itself, never a file name: parse it here
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ParamError("guided_json", f"is not valid JSON ({e})") from None
        if schema is not None and not isinstance(schema, dict):
            raise ParamError("guided_json", "must be a JSON schema object")
        if body.guided_regex is not None and not body.guided_regex:
            raise ParamError("guided_regex", "must be a non-empty regular expression")
        if body.guided_choice is not None and not (body.guided_choice and all(body.guided_choice)):
            raise ParamError("guided_choice", "needs at least one choice, each a non-empty string")
        with _renamed_fields():
            return spec_from_options(json_schema=schema, regex=body.guided_regex,
                                     choice=body.guided_choice)

    async def compile_spec(spec):
        key = (spec.kind, spec.value)
        if key in compiled:
            compiled.move_to_end(key)
            return compiled[key]
        with _renamed_fields():  # in the server's grammar worker: a time and memory budget (sandbox.py)
            c = await app.state.compile_spec(spec)
        compiled[key] = c
        while len(compiled) > MAX_COMPILED:
            compiled.popitem(last=False)
        return c

    def allowed_after(constraint, generated: list[int]):
        """The grammar's mask after the generated path (each token must be one it accepts)."""
        from ..decoding.constraints import allowed_masks

        state = constraint.start()
        for i, t in enumerate(generated):
            if not state.accept(t):
                raise ParamError("generated", f"token {i} (id {t}, {tok.decode([t])!r}) is not allowed by the "
                                              "constraint at that point")
        return allowed_masks([state], engine.vocab_size)[0]

    @app.post("/v1/pipeline")
    async def pipeline(request: Request):
        auth(request)
        body = await read_body(request, PipelineRequest)
        model = check_model(body.model)
        ids, gen = context(body.prompt, body.generated)
        params = sampling_params(body, len(ids) + len(gen))
        spec = constraint_spec(body)
        constraint = await compile_spec(spec) if spec is not None else None

        def work():
            allowed = allowed_after(constraint, gen) if constraint is not None else None
            return next_token_distribution(engine, ids, gen, params, top=body.top, allowed=allowed,
                                           stage_top=body.stage_top, seed=body.seed)

        result = await on_runner(work)
        if spec is not None:
            result["constraint"]["kind"] = spec.kind
        result["model"] = model
        return _json(result)

    @app.post("/v1/beam_tree")
    async def beam_tree(request: Request):
        auth(request)
        body = await read_body(request, BeamTreeRequest)
        model = check_model(body.model)
        ids, _ = context(body.prompt, [])
        if len(ids) + body.max_tokens > engine.max_len:
            raise ParamError("max_tokens", f"prompt ({len(ids)}) + max_tokens ({body.max_tokens}) exceeds the "
                                           f"context ({engine.max_len})")

        def work():
            from ..decoding.beam import beam_search

            # the bare model (not the Engine): the walk-through then names every path by its token ids
            return beam_search(engine.model, ids, width=body.width, length_penalty=body.length_penalty,
                               max_tokens=body.max_tokens, n=body.width, eos_token_ids=sorted(tok.eos_token_ids),
                               trace=True)

        res = await on_runner(work)
        return _json({"model": model, "prompt_tokens": len(ids), "width": body.width,
                      "length_penalty": body.length_penalty, **_beam_tree(res, tok)})

    @app.post("/v1/logit_lens")
    async def logit_lens(request: Request):
        auth(request)
        body = await read_body(request, LensRequest)
        model = check_model(body.model)
        ids, gen = context(body.prompt, body.generated)
        layers = await on_runner(lambda: lens.logit_lens(engine.model, ids + gen, top=body.top))
        L = len(layers) - 1
        final = layers[-1].top_ids[0]
        return _json({
            "model": model, "num_layers": L, "context_tokens": len(ids) + len(gen),
            "final_top": {"id": final, "token": tok.decode([final])},
            "layers": [{"layer": x.layer, "name": "embeddings" if x.layer == 0 else f"block {x.layer}",
                        "top": [{"id": i, "token": tok.decode([i]), "p": p}
                                for i, p in zip(x.top_ids, x.top_probs, strict=True)],
                        "entropy": x.entropy, "final_top_prob": x.final_top_prob,
                        "final_top_rank": x.final_top_rank} for x in layers],
        })

    @app.post("/v1/sequence_view")
    async def sequence_view(request: Request):
        auth(request)
        body = await read_body(request, SequenceRequest)
        model = check_model(body.model)
        if isinstance(body.text, str):  # the text's own tokens, conditioned on a start token (Engine.score's)
            try:
                ids = tok.encode(body.text, add_special_tokens=False)
            except (UnicodeError, TypeError, ValueError) as e:
                raise ParamError("text", f"cannot be tokenized: {e}") from None
        else:
            ids = body.text
        if not ids:
            raise ParamError("text", "must not be empty")
        start = start_token(tok)
        ids, _ = context(ids, [], field="text")
        if len(ids) + (start["id"] is not None) > engine.max_len:
            raise ParamError("text", f"has {len(ids)} tokens (and a start token); the context holds {engine.max_len}")
        if start["id"] is None and len(ids) < 2:
            raise ParamError("text", "needs at least two tokens (nothing predicts the first)")
        stats = await on_runner(lambda: lens.sequence_view(engine.model, ids, start=start["id"]))
        return _json({"model": model, "conditioned_on": start, **_sequence(stats, tok)})


class _renamed_fields:
    """Constraint errors named by the request's fields (``regex`` -> ``guided_regex``, ...)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if isinstance(e, ParamError) and e.field in _CONSTRAINT_FIELDS:
            raise ParamError(_CONSTRAINT_FIELDS[e.field], e.reason) from None
        return False


def _beam_tree(res, tok) -> dict:
    """The walk-through with every hypothesis as a token-id path (after the prompt), and the texts of
    the tokens it names."""
    steps = [{
        "step": s["step"],
        "candidates": [{"ids": c["text"], "parent": c["parent"], "token_prob": c["token_prob"],
                        "logprob": c["logprob"]} for c in s["candidates"]],
        "beams": [{"ids": b["text"], "parent": b["parent"], "logprob": b["logprob"]} for b in s["beams"]],
        "finished": [{"ids": f["text"], "logprob": f["logprob"], "score": f["score"]} for f in s["finished"]],
    } for s in res.steps]
    hyps = [{"ids": h.token_ids, "logprob": h.logprob, "score": h.score, "finish_reason": h.finish_reason,
             "text": tok.decode(h.token_ids)} for h in res.hypotheses]
    seen = {t for s in steps for part in ("candidates", "beams", "finished") for x in s[part] for t in x["ids"]}
    seen |= {t for h in hyps for t in h["ids"]}
    return {"steps": steps, "hypotheses": hyps, "forwards": res.forwards,
            "token_texts": {str(t): tok.decode([t]) for t in sorted(seen)}}


def _sequence(stats: list, tok) -> dict:
    """Per token: id, its text (UTF-8 safe pieces that join to the text), logprob, rank, GLTR bucket,
    surprisal in bits and entropy in nats; the perplexity and the count per bucket."""
    import math

    detok = IncrementalDetokenizer(tok)
    texts = [detok.push(s.id) for s in stats]
    texts[-1] += detok.flush()
    buckets = {str(b): 0 for b in lens.RANK_BUCKETS} | {"rest": 0}
    rows = []
    for s, text in zip(stats, texts, strict=True):
        row = {"id": s.id, "text": text, "logprob": s.logprob, "rank": s.rank, "entropy": s.entropy,
               "bucket": None, "surprisal_bits": None}
        if s.rank is not None:
            b = lens.rank_bucket(s.rank)
            row["bucket"] = b
            buckets[str(b) if b else "rest"] += 1
            row["surprisal_bits"] = -s.logprob / math.log(2)
        rows.append(row)
    scored = [s for s in stats if s.entropy is not None]
    return {"tokens": rows, "scored": len(scored), "perplexity": lens.perplexity(stats),
            "mean_entropy": sum(s.entropy for s in scored) / len(scored), "buckets": buckets}
