"""Response pieces shared by the routes: JSON without infinities, a scheduler request as a Completion,
chat logprobs, and the decoding modes' extra response fields."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from ..decoding.modes import DriverOptions
from ..engine import Completion
from ..openai_format import chat_logprobs
from .parsing import contrastive_of


def _finite(x):
    """JSON has no infinities: -inf (a logprob of a removed token) becomes -9999.0, as in OpenAI's API;
    nan and +inf become null."""
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return -9999.0 if x == -math.inf else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json(obj, status: int = 200) -> JSONResponse:
    return JSONResponse(_finite(obj), status_code=status)


def _completion(r) -> Completion:
    return Completion(
        index=r.index, text=r.text, token_ids=list(r.output_ids), finish_reason=r.finish_reason,
        token_logprobs=r.token_logprobs,
        top_logprobs=r.top_logprobs if r.params.logprobs is not None else None,
        prompt_logprobs=r.prompt_logprobs, prompt_top_logprobs=r.prompt_top_logprobs,
        trace=r.trace if r.params.explain else None, error=r.error,
    )


def _chat_logprobs(tok, ids, lps, tops) -> list[dict]:
    """OpenAI chat ``logprobs.content``: one entry per token with its top alternatives."""
    return chat_logprobs(tok, ids, lps, tops)


def mode_extra(opts: DriverOptions | None, spec) -> dict | None:
    extra = {}
    if spec is not None:
        extra["constraint"] = spec.kind
    if contrastive_of(opts) is not None:
        extra["contrastive"] = {"amateur": opts.contrastive_amateur, "alpha": opts.contrastive_alpha}
    return extra or None


def merged_extra(out: list, spec) -> dict:
    extras = [e for _, e in out]
    extra = dict(extras[0]) if len(extras) == 1 else {k: [e.get(k) for e in extras] for k in extras[0]}
    if spec is not None:
        extra["constraint"] = spec.kind
    return extra
