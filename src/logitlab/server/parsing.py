"""Request parsing for the server: the JSON body (size, content type, strict JSON, valid Unicode, the
pydantic schema), sampling parameters, prompts, logit_bias, and the decoding-driver fields
(``decoding.modes.DriverOptions``)."""

from __future__ import annotations

import json
import math
import re

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..decoding.modes import DriverOptions
from ..sampling import ParamError, SamplingParams
from . import conformance, schemas
from .errors import APIError, _driver_errors, _validation_error
from .guards import Limits, check_driver_sizes, is_json, not_json_message

MAX_STOP = 4  # OpenAI's limit on stop strings
_AMATEUR = re.compile(r"early-exit:\d+")
_DRAFT = re.compile(r"early-exit:\d+|ngram(:\d+)?|int8|gguf")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _check_strings(data) -> None:
    """Reject lone surrogates (valid JSON escapes, not valid Unicode text) anywhere in the body."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "The request body contains a string that is not valid Unicode "
                                    "(a lone surrogate escape)", code="invalid_json") from None
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


async def read_body(request: Request, model: type[BaseModel], max_body_bytes: int):
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
        raise APIError(413, f"The request body is {int(cl)} bytes; this server accepts at most "
                            f"{max_body_bytes}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise APIError(413, f"The request body is larger than this server accepts "
                                f"({max_body_bytes} bytes)", code="request_too_large")
    if not is_json(request.headers.get("content-type")):  # CSRF: see guards.py
        raise APIError(415, not_json_message(request.headers.get("content-type")), code="unsupported_media_type")
    try:
        data = json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise APIError(400, f"We could not parse the JSON body of your request ({msg}).",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_strings(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def sampling_params(body: schemas._Sampling, max_batch: int, /, **extra) -> SamplingParams:
    kw = {f: getattr(body, f) for f in schemas.PASS_THROUGH if getattr(body, f) is not None}
    if body.stop is not None:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        if len(stop) > MAX_STOP:
            raise ParamError("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        kw["stop"] = stop
    if body.logit_bias is not None:
        kw["logit_bias"] = _logit_bias(body.logit_bias)
    kw.update({k: v for k, v in extra.items() if v is not None})
    n = kw.get("n", 1)
    if n > max_batch:
        raise ParamError("n", f"must be at most {max_batch} (this server's --max-batch), got {n}")
    try:
        return SamplingParams(**kw)
    except ParamError:
        raise
    except (TypeError, ValueError) as e:
        raise APIError(400, f"invalid sampling parameters: {e}", code="invalid_value") from None


def driver_options(body, limits: Limits) -> tuple[DriverOptions | None, object]:
    """(options, constraint spec or None) from the request's decoding-driver fields; (None, None) without."""
    data = {}
    for f in schemas.DRIVER_FIELDS:
        v = getattr(body, f, None)
        if v is not None:
            data[f] = v.model_dump(exclude_none=True, by_alias=True) if isinstance(v, BaseModel) else v
    rf = data.get("response_format")
    if rf is not None and rf["type"] == "json_schema" and not (rf.get("json_schema") or {}).get("schema"):
        raise ParamError("response_format", "type json_schema needs json_schema.schema (a JSON schema object)")
    if rf is not None and rf["type"] != "text" and "guided_json" in data:
        raise ParamError("guided_json", "give guided_json or response_format, not both")
    if rf is not None and rf["type"] == "json_object":
        # xgrammar's builtin JSON grammar takes any JSON value with free whitespace; OpenAI's json_object
        # means an object, and the compact schema grammar keeps small models out of endless whitespace
        data["response_format"] = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
    # sizes first (guards.Limits), before anything is parsed or compiled; a string is always the schema or
    # grammar itself (DriverOptions.from_request never reads, nor even looks for, a file)
    check_driver_sizes(data, limits)
    if data.get("guided_grammar"):  # Lark or EBNF -> xgrammar's EBNF (conformance.py)
        data["guided_grammar"] = conformance.grammar_to_ebnf(data["guided_grammar"])
    choice = data.get("guided_choice")
    if choice is not None and (not choice or not all(choice)):
        raise ParamError("guided_choice", "needs at least one choice, each a non-empty string")
    amateur = (data.get("contrastive") or {}).get("amateur")
    if amateur is not None and not _AMATEUR.fullmatch(amateur):
        raise ParamError("contrastive", f"amateur must be early-exit:K on this server, got {amateur!r}")
    draft = (data.get("speculative") or {}).get("draft")
    if draft is not None and not _DRAFT.fullmatch(draft):
        raise ParamError("speculative", f"draft must be early-exit:K, ngram, ngram:N, int8 or gguf on this server, "
                                        f"got {draft!r}")
    if "length_penalty" in data and "beam_width" not in data:
        raise ParamError("length_penalty", "applies to beam search only (set beam_width)")
    with _driver_errors(rf):
        opts = DriverOptions.from_request(data)
        if not opts.requested():
            return None, None
        opts.validate()
        return opts, opts.spec()


def is_streamable(opts: DriverOptions) -> bool:
    """A constraint, and contrastive decoding against the model's own first K layers (the only amateur
    this server takes): they run as rows of the scheduler's continuous batch."""
    return not (opts.beam_width is not None or opts.speculative or opts.choice)


def contrastive_of(opts: DriverOptions | None):
    """(K, alpha, amateur temperature) for ``Engine.make_requests``, or None."""
    if opts is None or not opts.contrastive_amateur:
        return None
    return int(opts.contrastive_amateur.split(":", 1)[1]), float(opts.contrastive_alpha), 1.0


def _prompts(prompt) -> list:
    """The request's prompt as a list of prompts (each a string or a list of token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ParamError("prompt", "must not be empty")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


# A token id as JSON object keys spell it: int() would also take "1_000", " 12", "+5", "007" and "٣"
_TOKEN_ID_KEY = re.compile(r"0|-?[1-9][0-9]{0,18}")


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for k, v in bias.items():
        if not _TOKEN_ID_KEY.fullmatch(k):
            raise ParamError("logit_bias", f"keys must be token ids written as plain integers, got {k[:40]!r}")
        tid = int(k)
        if not math.isfinite(v):
            raise ParamError("logit_bias", f"bias for token {tid} must be a finite number")
        out[tid] = v
    return out
