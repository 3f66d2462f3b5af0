"""Results shaped like OpenAI API responses (shared by the CLI's --json and the HTTP server)."""

from __future__ import annotations

import time
import uuid

from .engine import Completion, GenerationResult
from .tokenizer import Tokenizer


def _token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def completion_logprobs(tokenizer: Tokenizer, c: Completion, prompt_ids: list[int] | None = None,
                        text_start: int = 0) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset.
    With ``prompt_ids`` (echo), the prompt tokens come first; the first has no logprob (null)."""
    ids, lps, tops = list(c.token_ids), list(c.token_logprobs), list(c.top_logprobs or [None] * len(c.token_ids))
    if prompt_ids is not None:
        ids = prompt_ids + ids
        lps = list(c.prompt_logprobs or [None] * len(prompt_ids)) + lps
        tops = list(c.prompt_top_logprobs or [None] * len(prompt_ids)) + tops
    tokens = _token_strings(tokenizer, ids)
    offsets, pos = [], text_start
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top_dicts = [
        None if top is None else {tokenizer.decode([i]): lp for i, lp in top}
        for top in tops
    ]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}


def completion_response(tokenizer: Tokenizer, model: str, results: list[GenerationResult],
                        echo: bool = False, logprobs: bool = False, extra: dict | None = None) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p_index, res in enumerate(results):
        prompt_tokens += len(res.prompt_ids)
        for c in res.choices:
            completion_tokens += len(c.token_ids)
            text = (res.prompt + c.text) if echo else c.text
            choice = {
                "index": p_index * len(res.choices) + c.index,
                "text": text,
                "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(tokenizer, c, res.prompt_ids if echo else None)
                if logprobs else None,
                "token_ids": c.token_ids,
            }
            if c.trace is not None:
                choice["trace"] = c.trace
            if c.error:
                choice["error"] = c.error
            choices.append(choice)
    out = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    if extra:
        out.update(extra)
    return out
