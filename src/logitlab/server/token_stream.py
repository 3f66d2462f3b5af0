"""One streamer for both generation endpoints: a submission's TokenEvents as SSE chunks.

``stream_tokens`` owns what the two streams share (one chunk per event, the token id and logprobs on
token events, the step's trace and the request's error, then the failure notice, usage chunk and
``[DONE]``; the unfinished requests aborted however the stream ends). A small chunk shape says what
differs: ``CompletionChunks`` (``text_completion``: echo chunk, text offsets) or ``ChatChunks``
(``chat.completion.chunk``: a role chunk per choice first, deltas).
"""

from __future__ import annotations

import time
import uuid

from ..openai_format import TextOffsets, logprobs_chunk, prompt_offsets
from .errors import APIError
from .responses import _chat_logprobs
from .streaming import sse, with_trace_and_error


def internal_failure(requests: list) -> APIError | None:
    """The 500 a runner failure (not a client's mistake) answers, if any request ended in one."""
    bad = [r for r in requests if r.finish_reason == "error" and (r.error or "").startswith("internal")]
    if bad:
        return APIError(500, bad[0].error, type_="server_error")
    return None


def usage(groups) -> dict:
    pt = sum(len(g[0].prompt_ids) for g in groups)
    ct = sum(len(r.output_ids) for g in groups for r in g)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


def stream_end(requests, groups, head: dict, include_usage: bool):
    """How every token stream ends: a failure notice if the runner failed, the usage chunk, [DONE]."""
    if (err := internal_failure(requests)) is not None:
        yield sse({"error": {"message": err.message, "type": err.type, "param": None, "code": None}})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(groups)})
    yield "data: [DONE]\n\n"


class CompletionChunks:
    """``/v1/completions`` chunks: ``text``; with ``echo``, the prompt (and its logprobs) before a
    choice's first token."""

    id_prefix, object = "cmpl-", "text_completion"

    def __init__(self, tok, requests, groups, texts: list[str], n: int, echo: bool, want_lp: bool):
        self.tok, self.texts, self.echo, self.want_lp = tok, texts, echo, want_lp
        self.where = {r.id: (gi, gi * n + r.index) for gi, g in enumerate(groups) for r in g}
        # text_offset from the tokens, not from the text sent so far (held back while a stop string may
        # be starting), so the streamed offsets are the non-streamed ones
        self.offsets = {r.id: TextOffsets(tok, len(texts[self.where[r.id][0]]) if echo else 0) for r in requests}

    def opening(self, requests) -> list[dict]:
        return []

    def before_first(self, r) -> dict | None:
        if not self.echo:
            return None
        gi, index = self.where[r.id]
        lp = None
        if self.want_lp:
            lp = logprobs_chunk(self.tok, r.prompt_ids, r.prompt_logprobs or [None] * len(r.prompt_ids),
                                r.prompt_top_logprobs, prompt_offsets(self.tok, r.prompt_ids, self.texts[gi]))
        return {"index": index, "text": self.texts[gi], "logprobs": lp, "finish_reason": None}

    def choice(self, ev) -> dict:
        return {"index": self.where[ev.request.id][1], "text": ev.text, "logprobs": None,
                "finish_reason": ev.finish_reason}

    def token_logprobs(self, ev):
        return logprobs_chunk(self.tok, [ev.token_id], [ev.logprob], [ev.top_logprobs],
                              [self.offsets[ev.request.id].next(ev.token_id)])


class ChatChunks:
    """``/v1/chat/completions`` chunks: a role chunk per choice first, then ``delta`` chunks."""

    id_prefix, object = "chatcmpl-", "chat.completion.chunk"

    def __init__(self, tok, want_lp: bool):
        self.tok, self.want_lp = tok, want_lp

    def opening(self, requests) -> list[dict]:
        return [{"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for r in requests]

    def before_first(self, r) -> dict | None:
        return None

    def choice(self, ev) -> dict:
        return {"index": ev.request.index, "delta": {"content": ev.text} if ev.text else {},
                "logprobs": None, "finish_reason": ev.finish_reason}

    def token_logprobs(self, ev):
        return {"content": _chat_logprobs(self.tok, [ev.token_id], [ev.logprob], [ev.top_logprobs])}


async def stream_tokens(shape, events, requests, groups, model: str, include_usage: bool, abort):
    """SSE lines for one submission. ``events``: the async iterator of (TokenEvent, trace) until every
    request has finished; ``abort(requests)`` runs however the stream ends (a no-op unless the client
    went away mid-stream)."""
    cid, created = f"{shape.id_prefix}{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": cid, "object": shape.object, "created": created, "model": model}

    def chunk(choice: dict) -> str:
        out = {**head, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return sse(out)

    started: set[int] = set()
    try:
        for choice in shape.opening(requests):
            yield chunk(choice)
        async for ev, trace in events:
            r = ev.request
            if r.id not in started:
                started.add(r.id)
                if (first := shape.before_first(r)) is not None:
                    yield chunk(first)
            choice = shape.choice(ev)
            if ev.token_id is not None:
                choice["token_ids"] = [ev.token_id]
                if shape.want_lp:
                    choice["logprobs"] = shape.token_logprobs(ev)
            yield chunk(with_trace_and_error(choice, ev, trace))
        for line in stream_end(requests, groups, dict(head), include_usage):
            yield line
    finally:
        abort(requests)
