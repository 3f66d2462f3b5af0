"""SSE and streaming helpers: the asyncio end of a runner submission (``_Stream``), the client-disconnect
watch, SSE lines and responses, and finished (driver) results replayed as SSE chunks."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from .responses import _finite


class _Gone:
    """Put on a stream's queue when its client disconnects."""


class _ClientGone(Exception):
    pass


class _Stream:
    """The asyncio end of one submission: the runner thread puts (event, trace) here."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, ev, trace) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (ev, trace))


async def _watch_disconnect(request: Request, stream: _Stream) -> None:
    """Wake the stream's reader the moment its client goes away: the ASGI server sends ``http.disconnect``
    when the connection closes (the body has been read by now, so nothing else arrives here)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.queue.put_nowait(_Gone)
            return


def sse(obj) -> str:
    return f"data: {json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)}\n\n"


def _sse_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def replay_completion(resp: dict, include_usage: bool):
    """A finished (driver) completion as SSE: one chunk per choice, one with the extra fields."""
    head = {k: resp[k] for k in ("id", "object", "created", "model")}
    for choice in resp["choices"]:
        out = {**head, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        yield sse(out)
    tail = {**head, "choices": [], **{k: v for k, v in resp.items() if k not in (*head, "choices", "usage")}}
    if include_usage:
        tail["usage"] = resp["usage"]
    yield sse(tail)
    yield "data: [DONE]\n\n"


def with_trace_and_error(choice: dict, ev, trace) -> dict:
    """A streamed choice carries the step's explainer trace and, on failure, the request's error."""
    if trace is not None:
        choice["trace"] = [trace]
    if ev.finish_reason == "error" and ev.request.error:
        choice["error"] = ev.request.error
    return choice


async def replay_chat(resp: dict, include_usage: bool):
    """A finished (driver) chat completion as SSE chunks: per choice the role, the whole content and
    the finish reason; then one chunk with no choices carrying the extra fields."""
    head = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
            "model": resp["model"]}

    def chunk(choice):
        out = {**head, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return sse(out)

    for c in resp["choices"]:
        yield chunk({"index": c["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
        yield chunk({"index": c["index"], "delta": {"content": c["message"]["content"]},
                     "logprobs": c["logprobs"], "finish_reason": None})
        yield chunk({"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]})
    skip = ("id", "object", "created", "model", "choices", "usage")
    tail = {**head, "choices": [], **{k: v for k, v in resp.items() if k not in skip}}
    if include_usage:
        tail["usage"] = resp["usage"]
    yield sse(tail)
    yield "data: [DONE]\n\n"
