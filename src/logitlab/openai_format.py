"""Results shaped like OpenAI API responses (shared by the CLI's --json and the HTTP server).

Token strings, as OpenAI writes them: a token whose bytes are UTF-8 on their own is that text; a token
holding part of a character (byte-level BPE splits an emoji or a CJK character over 2-4 tokens) is
``bytes:`` followed by its bytes, ``\\xNN`` for each byte that is not UTF-8 by itself (``bytes:\\xf0\\x9f``).
Chat's ``bytes`` field always carries the token's real bytes.

``text_offset`` is where each token starts in the returned text: the number of characters that the
tokens before it complete (a token inside a character starts where that character starts), so offsets
never point inside a character, and the streamed and the non-streamed offsets are the same numbers
(both come from ``TextOffsets``). Tokens after a stop string (their text is cut off) keep the offset
they have in the uncut text, so they may lie past the end of the returned text.

``top_logprobs`` (legacy completions) holds the ``logprobs`` most likely tokens and, when it is not
among them, the sampled (or, with echo, the prompt's) token: up to ``logprobs + 1`` entries, so
``logprobs=0`` gives the sampled token alone. Chat's ``top_logprobs`` does the same for
``top_logprobs >= 1`` and is empty for 0 (the entry itself is the sampled token).
"""

from __future__ import annotations

import codecs
import re
import time
import uuid

from .engine import Completion, GenerationResult
from .tokenizer import IncrementalDetokenizer, Tokenizer, unicode_to_byte

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for (special and added tokens: their text as written)."""
    backend = getattr(tokenizer, "backend", None)
    piece = backend.id_to_token(int(token_id)) if backend is not None else None
    if piece is None:
        return tokenizer.decode([token_id]).encode("utf-8")
    if token_id in getattr(tokenizer, "_added_ids", ()):
        return piece.encode("utf-8")
    if getattr(tokenizer, "_byte_level", False):
        to_byte = unicode_to_byte()
        if all(c in to_byte for c in piece):
            return bytes(to_byte[c] for c in piece)
    m = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece's byte-fallback tokens
    if m:
        return bytes([int(m.group(1), 16)])
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The token as OpenAI shows it: its text, or ``bytes:\\xNN...`` when it is part of a character."""
    b = token_bytes(tokenizer, token_id)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + b.decode("utf-8", errors="backslashreplace")


class TextOffsets:
    """``text_offset`` of successive tokens: ``next(id)`` returns where that token starts, ``start`` plus
    the characters the earlier tokens completed, at most ``limit``. ``skip_special_tokens``: as the
    indexed text was made (generated text leaves them out, an echoed prompt has them as written).

    Byte-level tokenizers: the tokens' bytes go through an incremental UTF-8 decoder, which emits a
    character once its last byte is in (and U+FFFD for bytes that can never form one, as decoding does),
    so a token inside a character starts exactly where that character starts. Other tokenizers (their
    decoders add and strip spaces): the streaming detokenizer's emissions."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0, limit: int | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.pos, self.limit = start, limit
        if getattr(tokenizer, "_byte_level", False):
            self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.detok = None
        else:
            self.utf8 = None
            self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)

    def next(self, token_id: int) -> int:
        at = self.pos if self.limit is None else min(self.pos, self.limit)
        if self.detok is not None:
            self.pos += len(self.detok.push(token_id))
        elif not (self.skip and token_id in self.tokenizer.special_token_ids):
            self.pos += len(self.utf8.decode(token_bytes(self.tokenizer, token_id)))
        return max(0, at)


def prompt_offsets(tokenizer: Tokenizer, prompt_ids: list[int], prompt_text: str) -> list[int]:
    """``text_offset`` of the prompt's tokens within ``prompt_text`` (echo). When the ids decode to more
    than the text (a BOS the tokenizer added), the extra leading characters are not counted."""
    decoded = tokenizer.decode(prompt_ids)
    shift = len(decoded) - len(prompt_text) if decoded.endswith(prompt_text) else 0
    offsets = TextOffsets(tokenizer, start=-shift, limit=len(prompt_text), skip_special_tokens=False)
    return [offsets.next(t) for t in prompt_ids]


def top_dict(tokenizer: Tokenizer, token_id: int, logprob: float | None, top) -> dict[str, float]:
    """One legacy ``top_logprobs`` entry: the top alternatives, plus ``token_id`` when it is not one."""
    out = {token_text(tokenizer, i): lp for i, lp in (top or [])}
    if logprob is not None and all(i != token_id for i, _ in (top or [])):
        out.setdefault(token_text(tokenizer, token_id), logprob)
    return out


def logprobs_chunk(tokenizer: Tokenizer, ids, lps, tops, offsets: list[int]) -> dict:
    """The legacy logprobs object for ``ids`` (a whole choice or one streamed chunk of it)."""
    tops = list(tops) if tops is not None else [None] * len(ids)
    return {
        "tokens": [token_text(tokenizer, i) for i in ids],
        "token_logprobs": list(lps),
        "top_logprobs": [None if lp is None else top_dict(tokenizer, i, lp, t)
                         for i, lp, t in zip(ids, lps, tops, strict=True)],
        "text_offset": list(offsets),
    }


def completion_logprobs(tokenizer: Tokenizer, c: Completion, prompt_ids: list[int] | None = None,
                        text_start: int = 0, prompt_text: str | None = None) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset.
    With ``prompt_ids`` (echo), the prompt tokens come first (the first has no logprob: null) and the
    text is ``prompt_text`` (default: the decoded prompt) + the completion."""
    ids, lps = list(c.token_ids), list(c.token_logprobs)
    tops = list(c.top_logprobs) if c.top_logprobs is not None else [None] * len(ids)
    offsets_list: list[int] = []
    if prompt_ids is not None:
        if prompt_text is None:
            prompt_text = tokenizer.decode(prompt_ids)
        offsets_list = prompt_offsets(tokenizer, prompt_ids, prompt_text)
        text_start = len(prompt_text)
        plps = list(c.prompt_logprobs) if c.prompt_logprobs is not None else [None] * len(prompt_ids)
        ptops = list(c.prompt_top_logprobs) if c.prompt_top_logprobs is not None else [None] * len(prompt_ids)
        ids, lps, tops = list(prompt_ids) + ids, plps + lps, ptops + tops
    offsets = TextOffsets(tokenizer, text_start)
    offsets_list += [offsets.next(t) for t in c.token_ids]
    return logprobs_chunk(tokenizer, ids, lps, tops, offsets_list)


def chat_logprobs(tokenizer: Tokenizer, ids, lps, tops) -> list[dict]:
    """OpenAI chat ``logprobs.content``: one entry per token with its top alternatives (and the sampled
    token among them when it is not one of the top; none when ``top_logprobs`` was 0)."""

    def entry(i, lp):
        return {"token": token_text(tokenizer, i), "logprob": lp, "bytes": list(token_bytes(tokenizer, i))}

    out = []
    for k, tid in enumerate(ids):
        top = tops[k] if tops and k < len(tops) and tops[k] else []
        alts = [entry(a, b) for a, b in top]
        if top and all(a != tid for a, _ in top):
            alts.append(entry(tid, lps[k]))
        out.append({**entry(tid, lps[k]), "top_logprobs": alts})
    return out


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
                "logprobs": completion_logprobs(tokenizer, c, res.prompt_ids if echo else None,
                                                prompt_text=res.prompt) if logprobs else None,
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
