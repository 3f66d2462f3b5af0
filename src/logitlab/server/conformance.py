"""What OpenAI's and vLLM's own clients expect of the HTTP API, beyond the basic routes (issue 11).

- ``check_request``: the cross-field rules those servers enforce (400s): ``stream_options`` only with
  ``stream``; an empty ``guided_regex`` / ``guided_grammar`` / ``guided_json`` / ``guided_choice`` is an
  error, not an unconstrained request; ``prompt_logprobs`` in [0, 20]. ``guided_grammar`` may be Lark (as
  llguidance and vLLM's Lark backends read it) or EBNF (xgrammar's, GBNF-like): Lark is converted to
  EBNF by xgrammar's own Lark reader, which takes rules and terminals, string literals and ``/regex/``
  terminals, ``| ( ) ? * +`` and ``~ n`` / ``~ n..m`` repetition, ``?rule`` / ``_rule`` inlining, aliases
  (``-> name``, ignored), case-insensitive strings (``"select"i``), ``%import common.X`` and ``%ignore``
  (what it names may then appear between tokens). Regex flags (``/.../i``, ``(?i:...)``), templates and
  priorities are not supported: those grammars are a 400 naming the problem. A grammar with a rule
  ``name ::= ...`` is read as EBNF, anything else as Lark.
- ``prompt_logprobs`` (vLLM): for every prompt token after the first, its raw logprob, its rank in the
  vocabulary (1 = most likely) and the ``k`` most likely tokens, as ``{"<id>": {"logprob", "rank",
  "decoded_token"}}`` (the prompt's own token first); the first token has none (``null``).
- ``stream_options.continuous_usage_stats`` (vLLM): a ``usage`` object in every streamed chunk (that
  choice's prompt tokens and its completion tokens so far), whether or not ``include_usage`` also asks
  for the final usage-only chunk.
- ``GET /tokenizer_info`` (vLLM's route, read by lm-evaluation-harness's ``tokenizer_backend=remote``):
  the special tokens, vocabulary size, chat template and the whole ``tokenizer.json``, so a client can
  tokenize exactly as the server does without a model hub.
- The drivers that answer in one piece (``guided_choice``, beam search, contrastive, speculative) get
  their logprobs the way the token-by-token path does: one forward over prompt + output gives every
  token's raw logprob and top ``k`` (``fill_logprobs``), so ``logprobs`` / ``top_logprobs`` / ``echo``
  mean the same on both endpoints with or without a driver.
- ``max_tokens: 0`` on /v1/completions (OpenAI's legacy scoring request, with ``echo`` and ``logprobs``):
  nothing is generated; each choice is the prompt with its logprobs (``prompt_only_results``).

The model work here (``sequence_logprobs``) runs on the server's runner thread (``Runner.call``), between
two scheduler steps, as every other use of the model outside the scheduler does.
"""

from __future__ import annotations

import json
import re

import torch
from fastapi import Request, Response

from ..model.cache import KVCache
from ..openai_format import token_text
from ..sampling import ParamError

MAX_PROMPT_LOGPROBS = 20  # as the sampled tokens' logprobs (and vLLM's default max_logprobs)
CHUNK = 256  # prompt positions per forward: bounds the [T, vocab] logits held at once

_EBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z_][\w.-]*\s*::=")
_FLAGGED_REGEX = re.compile(r'Regex\("\(\\\?[a-zA-Z]+[:)]')  # Regex("(\?i)...") in xgrammar's EBNF


# ---- request rules ---------------------------------------------------------------------------------

def check_request(body) -> None:
    """Raise ParamError for what OpenAI / vLLM refuse (a Lark ``guided_grammar`` is converted later, by
    ``grammar_to_ebnf``, once the server has checked its size)."""
    stream_options = getattr(body, "stream_options", None)
    if stream_options is not None and not body.stream:
        raise ParamError("stream_options", "is only allowed with stream=true")
    if getattr(body, "guided_regex", None) == "":
        raise ParamError("guided_regex", "must not be empty (leave it out for unconstrained output)")
    for field in ("guided_grammar", "guided_json"):
        v = getattr(body, field, None)
        if isinstance(v, str) and not v.strip():
            raise ParamError(field, "must not be empty (leave it out for unconstrained output)")
    choice = getattr(body, "guided_choice", None)
    if choice is not None and (not choice or not all(choice)):
        raise ParamError("guided_choice", "needs at least one choice, each a non-empty string")
    k = getattr(body, "prompt_logprobs", None)
    if k is not None and not 0 <= k <= MAX_PROMPT_LOGPROBS:
        raise ParamError("prompt_logprobs", f"must be an integer in [0, {MAX_PROMPT_LOGPROBS}], got {k}")


def is_ebnf(grammar: str) -> bool:
    """EBNF (xgrammar / GBNF) defines rules with ``::=``; Lark with ``:``."""
    return bool(_EBNF_RULE.search(grammar))


def grammar_to_ebnf(grammar: str, field: str = "guided_grammar") -> str:
    """``grammar`` itself when it is EBNF, else it read as Lark and written as xgrammar EBNF."""
    if is_ebnf(grammar):
        return grammar
    import xgrammar

    try:
        ebnf = str(xgrammar.Grammar.from_lark(grammar))
    except Exception as e:  # xgrammar raises RuntimeError (through its FFI layer) with the parser's message
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = lines[0] if lines else type(e).__name__
        reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason
        reason = reason.split(": ", 1)[-1] if reason.startswith("/") else reason
        raise ParamError(field, f"is neither EBNF (rules 'name ::= ...' with a root rule) nor Lark (rules "
                                f"'name: ...' with a start rule) that this server reads: {reason[:300]}") from None
    if _FLAGGED_REGEX.search(ebnf):  # xgrammar would match the flag's text "(?i)" literally
        raise ParamError(field, "Lark regex flags (/.../i) are not supported: write both cases ([aA]) or use a "
                                "string with the i flag (\"select\"i)")
    return ebnf


# ---- logprobs from one forward over a whole sequence ------------------------------------------------

@torch.inference_mode()
def sequence_logprobs(engine, ids: list[int], start: int, k: int) -> list[tuple[float, int, list]]:
    """For every position ``p`` in ``[start, len(ids))`` (``start >= 1``): the raw logprob of ``ids[p]``
    given ``ids[:p]``, its rank among all tokens (1 = the most likely) and the ``k`` most likely tokens
    ``[(id, logprob), ...]``. The sequence is run in chunks of ``CHUNK`` positions over a KV cache, the LM
    head only where a prediction is wanted."""
    model = engine.model
    n = len(ids)
    if not 1 <= start <= n:
        raise ValueError(f"start must be in [1, {n}], got {start}")
    if start == n:
        return []
    cache = KVCache(model.config, 1, n, dtype=model.dtype)
    out: list[tuple[float, int, list]] = []
    for lo in range(0, n - 1, CHUNK):
        hi = min(n - 1, lo + CHUNK)  # feed ids[lo:hi]; position p predicts ids[p + 1]
        want = list(range(max(lo, start - 1), hi))
        logits_at = torch.tensor([[p - lo for p in want]]) if want else "none"
        res = model(torch.tensor([ids[lo:hi]]), torch.arange(lo, hi).unsqueeze(0), cache, rows=slice(0, 1),
                    logits_at=logits_at)
        if not want:
            continue
        lp = torch.log_softmax(res[0].float(), dim=-1)  # [len(want), V]
        target = torch.tensor([ids[p + 1] for p in want])
        chosen = lp.gather(1, target[:, None]).squeeze(1)
        ranks = (lp > chosen[:, None]).sum(1) + 1
        if k:
            vals, idx = lp.topk(k, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
        else:
            tops = [[] for _ in want]
        out += list(zip(chosen.tolist(), ranks.tolist(), tops, strict=True))
    return out


def prompt_logprobs(engine, ids: list[int], k: int) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: ``None`` for the first token, then per token a dict of its own logprob
    and the top ``k``, keyed by token id (as a JSON key, a string)."""
    tok = engine.tokenizer
    out: list[dict | None] = [None]
    for tid, (lp, rank, top) in zip(ids[1:], sequence_logprobs(engine, ids, 1, k), strict=True):
        d = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": token_text(tok, tid)}}
        for r, (i, v) in enumerate(top, start=1):
            d.setdefault(str(i), {"logprob": v, "rank": r, "decoded_token": token_text(tok, i)})
        out.append(d)
    return out


def fill_logprobs(engine, result, k: int | None, echo: bool) -> None:
    """Give a driver's ``GenerationResult`` (choice, beam, contrastive, speculative) the logprobs the
    token-by-token path gives: each output token's raw logprob and top ``k`` and, with ``echo``, the
    prompt's. ``k=None``: no logprobs were asked for; nothing to do."""
    if k is None:
        return
    prompt = list(result.prompt_ids)
    for c in result.choices:
        ids = prompt + list(c.token_ids)
        start = 1 if echo else len(prompt)
        rows = sequence_logprobs(engine, ids, max(1, start), k) if len(ids) > 1 else []
        if echo:
            head, rows = rows[: max(0, len(prompt) - 1)], rows[max(0, len(prompt) - 1):]
            c.prompt_logprobs = [None] + [lp for lp, _, _ in head]
            c.prompt_top_logprobs = [None] + [top for _, _, top in head]
        c.token_logprobs = [lp for lp, _, _ in rows]
        c.top_logprobs = [top for _, _, top in rows]


# ---- streaming ---------------------------------------------------------------------------------------

def conform_stream(gen, sse, *, prompt_tokens: list[int], n: int, continuous: bool,
                   prompt_lps: list | None = None, chat: bool = False, totals: dict | None = None):
    """Wrap a completions / chat SSE generator: with ``continuous``, put ``usage`` in every chunk (choice
    ``i``'s prompt ``prompt_tokens[i // n]`` and its completion tokens so far, counted from the chunks'
    ``token_ids``; ``totals`` instead for a driver's replayed response); with ``prompt_lps`` (one list per
    prompt), add ``prompt_logprobs`` to each choice's first chunk (chat: to the first chunk). ``sse``
    encodes a chunk as the app does. Without either, ``gen`` itself."""
    if not continuous and prompt_lps is None:
        return gen
    return _conformed(gen, sse, prompt_tokens, n, continuous, prompt_lps, chat, totals)


async def _conformed(gen, sse, prompt_tokens, n, continuous, prompt_lps, chat, totals):
    """``conform_stream``'s generator. Closing it closes ``gen``, so a client that goes away still frees
    its slot at once."""
    counts: dict[int, int] = {}
    sent: set[int] = set()
    chat_sent = False
    try:
        async for line in gen:
            if not line.startswith("data: {"):
                yield line
                continue
            obj = json.loads(line[len("data: "):])
            choices = obj.get("choices") or []
            for ch in choices:
                i = ch.get("index", 0)
                counts[i] = counts.get(i, 0) + len(ch.get("token_ids") or [])
                if prompt_lps is not None and not chat and i not in sent:
                    ch["prompt_logprobs"] = prompt_lps[i // n]
                sent.add(i)
            if prompt_lps is not None and chat and choices and not chat_sent:
                obj["prompt_logprobs"] = prompt_lps[0]
                chat_sent = True
            if continuous and choices:
                if totals is not None:
                    obj["usage"] = totals
                else:
                    i = choices[0].get("index", 0)
                    pt, ct = prompt_tokens[i // n], counts.get(i, 0)
                    obj["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
            yield sse(obj)
    finally:
        await gen.aclose()


def add_prompt_logprobs(resp: dict, prompt_lps: list, n: int, chat: bool = False) -> dict:
    """Non-streamed: completions put each prompt's list in its choices (vLLM's ``choices[i].prompt_logprobs``),
    chat at the top level."""
    if chat:
        resp["prompt_logprobs"] = prompt_lps[0]
    else:
        for ch in resp["choices"]:
            ch["prompt_logprobs"] = prompt_lps[ch["index"] // n]
    return resp


# ---- GET /tokenizer_info -------------------------------------------------------------------------------

def tokenizer_info(engine) -> dict:
    """What a client needs to tokenize as this server does (vLLM's ``/tokenizer_info`` fields, plus
    ``tokenizer_json``: the whole Hugging Face ``tokenizer.json``)."""
    tok = engine.tokenizer
    backend = tok.backend

    def text(i):
        return backend.id_to_token(i) if i is not None else None

    added = backend.get_added_tokens_decoder()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": tok.vocab_size,
        "model_vocab_size": engine.vocab_size,
        "model_max_length": engine.max_len,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": text(tok.pad_token_id),
        "unk_token": text(tok.unk_token_id),
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
        "eos_token_ids": sorted(tok.eos_token_ids),
        "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
        "special_tokens": [added[i].content for i in sorted(added) if added[i].special],
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip,
                                          "rstrip": t.rstrip, "normalized": t.normalized,
                                          "single_word": t.single_word} for i, t in sorted(added.items())},
        "chat_template": tok.chat_template,
        "tokenizer_json": json.loads(backend.to_str()),
    }


def register(app, engine, *, auth) -> None:
    """Add ``GET /tokenizer_info`` (behind the API key, as /tokenize is)."""
    cached: list[bytes] = []

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request):
        auth(request)
        if not cached:  # ~2 MB for a 49k vocabulary: rendered once
            cached.append(json.dumps(tokenizer_info(engine), ensure_ascii=False).encode("utf-8"))
        return Response(cached[0], media_type="application/json")


# ---- max_tokens=0: the prompt alone (OpenAI's legacy scoring request: echo + logprobs, nothing generated) ----

def prompt_only_results(engine, prompts: list, ids_list: list[list[int]], n: int, k: int | None,
                        echo: bool) -> list:
    """``GenerationResult``s for ``max_tokens=0``: ``n`` empty choices per prompt (finish_reason ``length``)
    carrying, with ``echo`` and ``k`` set, the prompt's logprobs and top ``k`` (one forward per prompt)."""
    from ..engine import Completion, GenerationResult

    out = []
    for text, ids in zip(prompts, ids_list, strict=True):
        plps = ptops = None
        if echo and k is not None:
            rows = sequence_logprobs(engine, ids, 1, k) if len(ids) > 1 else []
            plps = [None] + [lp for lp, _, _ in rows]
            ptops = [None] + [top for _, _, top in rows]
        choices = [Completion(index=i, text="", token_ids=[], finish_reason="length", token_logprobs=[],
                              top_logprobs=[] if k is not None else None, prompt_logprobs=plps,
                              prompt_top_logprobs=ptops) for i in range(n)]
        out.append(GenerationResult(text, list(ids), choices))
    return out
