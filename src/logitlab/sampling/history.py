"""Processors that read each row's token history: DRY and ``no_repeat_ngram_size``.

``history`` is a ``[B, T]`` long tensor: row b holds its prompt and generated tokens in order from column 0,
then padding (any negative value) up to T. Everything here is tensor ops over ``[B, T]``; the only Python
loops are over *match length* in ``dry`` (bounded, see there) and over the distinct n-gram sizes of the
batch in ``no_repeat_ngram`` (usually one). Neither loops over rows or over the vocabulary.

Why per-row history at all: both processors depend on the *order* of the tokens (which token followed
which sequence), which the per-token counts the other penalties use cannot express.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
FLOAT_MAX_LOG = 88.7228391  # log(FLT_MAX): llama.cpp clamps the DRY exponent so base^exp stays finite
PAD = -1
CHUNK = 16  # DRY's match search compares this many tokens per candidate per iteration


def right_align(history: torch.Tensor) -> torch.Tensor:
    """[B, T] left-aligned rows (padding after) -> the same rows right-aligned (padding -1 before), so that
    every row's last token sits in column T - 1."""
    B, T = history.shape
    lengths = (history >= 0).sum(-1, keepdim=True)
    src = torch.arange(T, device=history.device) - (T - lengths)
    return torch.where(src >= 0, history.gather(1, src.clamp(min=0)), torch.full_like(history, PAD))


def dry_match_lengths(a: torch.Tensor, breaker: torch.Tensor | None, cap: torch.Tensor) -> torch.Tensor:
    """For right-aligned rows ``a [b, T]`` (-1 = nothing): ``m[b, i]`` for i < T - 1 is the length of the
    longest sequence ending at position i that equals the sequence ending at the row's last token, counting
    only the last ``rep_limit`` tokens (those after the row's last sequence breaker; ``breaker [b, T]``
    marks breaker positions) and at most ``cap[b]`` -- llama.cpp's ``dry_repeat_count`` (which it gets with
    the Z-algorithm in C), text-generation-webui's ``match_length``.

    Loop: the positions still matching are kept as a list of (row, position) pairs, all of the same length
    n; each iteration compares the next ``CHUNK`` tokens of every candidate at once (one gather), records
    how far each got, and keeps those that matched all of them. Ordinary text leaves a handful of
    candidates after the first iteration; a long loop in the context (the worst case) costs
    max(min(rep_limit, cap)) / CHUNK iterations (the clamp of the exponent bounds cap: ~160 for base 1.75)."""
    b, T = a.shape
    valid = a >= 0
    plain = valid if breaker is None else valid & ~breaker
    rep_limit = plain.flip(1).long().cumprod(1).sum(1)  # non-breaker tokens at the end of the row
    limit = torch.minimum(rep_limit, cap)
    m = torch.zeros(b, max(T - 1, 0), dtype=torch.long, device=a.device)
    if T < 2:
        return m
    start = (a[:, : T - 1] == a[:, T - 1:]) & valid[:, : T - 1] & (limit >= 1).unsqueeze(-1)
    # int32 and a left margin of padding: every read below stays inside its row without a clamp
    margin = int(limit.max()) + CHUNK
    padded = torch.nn.functional.pad(a.to(torch.int32), (margin, 0), value=PAD)
    W = margin + T
    flat = padded.reshape(-1)
    rows, pos = start.nonzero(as_tuple=True)
    at = rows * W + margin + pos  # candidates as flat indices into ``padded``
    out_at = rows * (T - 1) + pos  # ... and into ``m``
    lim = limit[rows].unsqueeze(-1)
    n = 1  # every candidate matches n tokens so far
    steps = torch.arange(CHUNK, device=a.device)
    while rows.numel():
        # extension j reaches length n + j + 1: a[pos - n - j] == a[T - 1 - n - j], within the limit
        back = n + steps  # [C]
        tail = padded[:, W - 1 - back]  # [b, C]: the row's own suffix, read once per row
        ok = (flat[at.unsqueeze(-1) - back] == tail.index_select(0, rows)) & (back < lim)
        run = ok.cumprod(-1, dtype=torch.uint8).sum(-1, dtype=torch.long)
        m.view(-1)[out_at] = n + run
        more = run == CHUNK
        rows, at, out_at, lim = rows[more], at[more], out_at[more], lim[more]
        n += CHUNK
    return m


def dry(logits: torch.Tensor, history: torch.Tensor, breakers: torch.Tensor | None, multiplier: torch.Tensor,
        base: torch.Tensor, allowed_length: torch.Tensor, last_n: torch.Tensor) -> torch.Tensor:
    """DRY, "Don't Repeat Yourself" (text-generation-webui; llama.cpp's ``dry``): a token that would extend a
    sequence already repeated in the context is penalised by its longest such repeat ``n``:

        l_t -= multiplier * base^(n - allowed_length)      for n >= allowed_length

    where n is the length of the longest sequence of the last tokens that also occurs earlier followed by
    t. Only the last ``last_n`` tokens are searched (-1: all; 0 or multiplier 0: off); a match never reaches
    back past the last sequence breaker (``breakers [B, V]`` bool, tokens whose text holds a breaker
    string), and breaker tokens themselves are never penalised. As llama.cpp, the exponent is clamped to
    log(FLT_MAX) / log(base) (so lengths beyond that give the same penalty, and the match search stops
    there); text-generation-webui caps the match at 50 instead, which gives a penalty just as prohibitive.
    Cost: O(B T) tensor work plus the match loop; only the penalised (row, token) entries are touched."""
    active = (multiplier > 0) & (last_n != 0)
    if not bool(active.any()) or history.shape[1] < 2:
        return logits
    rows = active.nonzero().squeeze(-1)
    h = right_align(history.index_select(0, rows))
    T = h.shape[1]
    col = torch.arange(T, device=h.device)
    window = torch.where(last_n[rows] < 0, T, last_n[rows]).unsqueeze(-1)
    a = torch.where(col >= T - window, h, torch.full_like(h, PAD))
    brk = None if breakers is None else breakers[rows.unsqueeze(-1), a.clamp(min=0)] & (a >= 0)

    b_base, allowed = base[rows].double(), allowed_length[rows]
    max_exp = torch.where(b_base > 1.000001, torch.floor(FLOAT_MAX_LOG / b_base.log()), torch.zeros_like(b_base))
    # Lengths past allowed + max_exp all get the clamped penalty, so the search may stop there; with base 1
    # every length >= allowed gets the same penalty. (1 < base <= 1.000001: llama.cpp does not clamp.)
    cap = torch.where(max_exp > 0, allowed + max_exp.long(), torch.full_like(allowed, T))
    cap = torch.where(b_base == 1.0, allowed, cap).clamp(max=T)
    m = dry_match_lengths(a, brk, cap)

    # the token after each matching occurrence would extend the repeat (breakers never count)
    hit = m >= allowed.unsqueeze(-1)
    if brk is not None:
        hit &= ~brk[:, 1:]
    r, i = hit.nonzero(as_tuple=True)
    if not r.numel():
        return logits
    tok, length = a[r, i + 1], m[r, i]
    # the longest match per (row, token): sort by (row, token, length), keep each group's last entry
    key = (r * logits.shape[1] + tok) * (T + 1) + length
    key = key.sort().values
    group = key // (T + 1)
    last = torch.ones_like(group, dtype=torch.bool)
    last[:-1] = group[1:] != group[:-1]
    group, length = group[last], (key % (T + 1))[last]
    r, tok = group // logits.shape[1], group % logits.shape[1]
    exp = (length - allowed[r]).double()
    exp = torch.where(max_exp[r] > 0, torch.minimum(exp, max_exp[r]), exp)
    penalty = multiplier[rows][r].double() * b_base[r].pow(exp)
    out = logits.clone()
    out[rows[r], tok] = (logits[rows[r], tok].double() - penalty).to(logits.dtype)
    return out


def no_repeat_ngram(logits: torch.Tensor, history: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """transformers' ``no_repeat_ngram_size``: with n = size, l_t = -inf for every token t such that the
    last n - 1 tokens followed by t form an n-gram already present in the row's history (n = 1: every token
    seen). Nothing is banned while the history holds fewer than n - 1 tokens. size = 0: off."""
    active = size > 0
    if not bool(active.any()):
        return logits
    B, V = logits.shape
    T = history.shape[1]
    lengths = (history >= 0).sum(-1)
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)  # column V: "nothing"
    for n in sorted(set(size[active].tolist())):  # the distinct sizes of the batch
        rows = ((size == n) & active).nonzero().squeeze(-1)
        h, L = history.index_select(0, rows), lengths.index_select(0, rows)
        q = n - 1  # length of the prefix that must match the row's last q tokens
        if q == 0:
            hit = torch.where(h >= 0, h, torch.full_like(h, V))
            banned[rows] = banned[rows].scatter(1, hit, True)
            continue
        if q >= T:
            continue
        last = (L.unsqueeze(-1) - q + torch.arange(q, device=h.device)).clamp(min=0)
        suffix = h.gather(1, last)  # [r, q]
        starts = torch.arange(T - q, device=h.device)
        windows = h.unfold(1, q, 1)[:, : T - q]  # [r, T - q, q]: h[j : j + q] for every start j
        match = (windows == suffix.unsqueeze(1)).all(-1) & (starts + q < L.unsqueeze(-1))
        match &= (L >= q).unsqueeze(-1)
        nxt = torch.where(match, h[:, q:], torch.full_like(h[:, q:], V))
        banned[rows] = banned[rows].scatter(1, nxt, True)
    return logits.masked_fill(banned[:, :V], NEG_INF)


class TokenTexts:
    """The vocabulary as text (``texts[i]``: token i decoded on its own), for DRY's sequence breakers.

    A token is a breaker when its text contains one of the breaker strings (llama.cpp's single-token restart
    sequences: a newline breaker also breaks at ".\\n\\n"). A breaker spelled only across several tokens is not
    recognised (llama.cpp also matches those multi-token spellings). Look-ups are cached: the sampling batch
    is rebuilt whenever its composition changes, and scanning 50k texts costs ~10 ms."""

    def __init__(self, texts):
        self.texts = list(texts)
        self._ids: dict[tuple[str, ...], tuple[int, ...]] = {}

    def breaker_ids(self, breakers: tuple[str, ...]) -> tuple[int, ...]:
        ids = self._ids.get(breakers)
        if ids is None:
            ids = tuple(i for i, text in enumerate(self.texts) if any(s in text for s in breakers))
            self._ids[breakers] = ids
        return ids

