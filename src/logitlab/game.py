"""The summarization game (seed 001, after xentlabs.ai/game): find a short prefix T that makes a paragraph P
most predictable, i.e. that minimises its cross-entropy

    CE(P | T) = -log P(P | T) = -sum_j log p(P_j | start, T, P_<j)      (nats)

``start`` is the token a text without context is conditioned on (``engine.start_token``: the model's BOS, or
its EOS where it has none), so the empty prefix scores P exactly as ``Engine.score(P)`` does, and any prefix
T as ``Engine.score(P, context=[start] + T)``. A good prefix (a summary, the key names) lowers CE below the
empty prefix's; a misleading one raises it.

Prefixes are scored in batches: the rows ``[start] + T_i + P``, right-padded, go through the model in one
forward (no KV cache: every row is a different sequence), and the LM head runs only at the positions that
predict P's tokens. Forwards are split only to keep the logits of one forward under ``MAX_LOGIT_BYTES``.

    from logitlab.game import play, search_prefix
    res = play(engine, paragraph, ["Eiffel Tower", "banana bread"])      # res.baseline, res.scores
    found = search_prefix(engine, paragraph, budget=3, search="greedy")  # found.best.prefix, .cross_entropy

``search_prefix`` builds a prefix token by token. At every step each kept prefix is extended by every token of
a candidate set -- the ``top_k`` tokens the model itself proposes after that prefix (read from the same
forward that scored it) and the ``paragraph_k`` paragraph tokens that were most surprising without a prefix
(naming them is what a summary does) -- and all extensions are scored in one batched forward. ``greedy``
keeps the best one, ``beam`` the best ``width``. The answer is the best prefix seen at any length, the empty
one included, so it is never worse than no prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .decoding.yield_point import yield_point
from .engine import start_token
from .sampling import ParamError

MAX_LOGIT_BYTES = 192 << 20  # float32 logits of one forward: rows x paragraph tokens x vocabulary x 4 bytes
MAX_BUDGET = 32  # prefix tokens a search may build
MAX_WIDTH = 32
MAX_CANDIDATES = 256  # top_k and paragraph_k, each


@dataclass
class PrefixScore:
    """CE(P | prefix): the paragraph's per-token log-probabilities after ``[start] + prefix_ids``."""

    prefix: str
    prefix_ids: list[int]
    token_logprobs: list[float]

    @property
    def cross_entropy(self) -> float:
        """-log P(P | prefix) in nats."""
        return -math.fsum(self.token_logprobs)

    @property
    def per_token(self) -> float:
        return self.cross_entropy / len(self.token_logprobs)


@dataclass
class GameResult:
    paragraph: str
    paragraph_ids: list[int]
    conditioned_on: dict  # the start token every row begins with
    baseline: PrefixScore  # the empty prefix
    scores: list[PrefixScore]  # one per prefix asked for, in order
    forwards: int = 0  # model forwards it took

    def gain(self, s: PrefixScore) -> float:
        """Nats the prefix saves against the empty prefix (negative: it hurts)."""
        return self.baseline.cross_entropy - s.cross_entropy


@dataclass
class SearchResult:
    paragraph: str
    paragraph_ids: list[int]
    conditioned_on: dict
    baseline: PrefixScore
    best: PrefixScore  # the best prefix found at any length (the empty one if nothing beat it)
    search: str
    budget: int
    steps: list[dict] = field(default_factory=list)  # per length: candidates scored, best prefix and CE
    forwards: int = 0
    scored: int = 0  # candidate prefixes scored, over all steps

    def gain(self, s: PrefixScore | None = None) -> float:
        return self.baseline.cross_entropy - (s or self.best).cross_entropy


class _Scorer:
    """Scores many prefixes of one paragraph in batched forwards and counts the forwards."""

    def __init__(self, engine, paragraph: str):
        self.engine, self.tok = engine, engine.tokenizer
        if not isinstance(paragraph, str) or not paragraph.strip():
            raise ParamError("paragraph", "must be a non-empty text")
        self.paragraph = paragraph
        self.ids = self.tok.encode(paragraph, add_special_tokens=False)
        if not self.ids:
            raise ParamError("paragraph", "has no tokens")
        self.start = start_token(self.tok)
        if self.start["id"] is None:
            raise ParamError("paragraph", "the model has no BOS or EOS token to condition the paragraph on")
        self.forwards = 0
        V = engine.vocab_size
        tv = getattr(self.tok, "vocab_size", V)
        # never proposed as prefix tokens: special/control tokens and ids past the tokenizer's vocabulary
        self.banned = torch.zeros(V, dtype=torch.bool)
        self.banned[min(V, tv):] = True
        for t in {*getattr(self.tok, "special_token_ids", ()), *getattr(self.tok, "eos_token_ids", ()),
                  self.tok.bos_token_id, self.tok.eos_token_id} - {None}:
            if 0 <= t < V:
                self.banned[t] = True

    def check_length(self, prefix_len: int) -> None:
        n = 1 + prefix_len + len(self.ids)
        if n > self.engine.max_len:
            raise ParamError("paragraph", f"start token + prefix ({prefix_len}) + paragraph ({len(self.ids)}) is "
                                          f"{n} tokens; the context holds {self.engine.max_len}")

    @torch.inference_mode()
    def score(self, prefixes: list[list[int]], top_k: int = 0) -> tuple[list[list[float]], list[list[int]]]:
        """Per-token logprobs of the paragraph after each prefix, and (``top_k`` > 0) the ``top_k`` tokens
        the model proposes to come next after each prefix (never special tokens)."""
        par, N, V = self.ids, len(self.ids), self.engine.vocab_size
        for p in prefixes:
            self.check_length(len(p))
        chunk = max(1, MAX_LOGIT_BYTES // (N * V * 4))
        out: list[list[float]] = []
        nxt: list[list[int]] = []
        target = torch.tensor(par)
        for lo in range(0, len(prefixes), chunk):
            rows = [[self.start["id"], *p, *par] for p in prefixes[lo : lo + chunk]]
            B, L = len(rows), max(len(r) for r in rows)
            tokens = torch.zeros(B, L, dtype=torch.long)
            valid = torch.zeros(B, L, dtype=torch.bool)
            for i, r in enumerate(rows):
                tokens[i, : len(r)] = torch.tensor(r)
                valid[i, : len(r)] = True
            # row i: [start, T_i (t tokens), P]; the logits at index t + j (the token before P_j) predict P_j
            at = torch.tensor([len(r) - N - 1 for r in rows]).unsqueeze(1) + torch.arange(N)
            logits = self.engine.model(tokens, torch.arange(L).expand(B, L), valid=valid, logits_at=at)
            self.forwards += 1
            lp = torch.log_softmax(logits.float(), -1)  # [B, N, V]
            out += lp.gather(-1, target.expand(B, N).unsqueeze(-1)).squeeze(-1).tolist()
            if top_k:
                first = lp[:, 0].masked_fill(self.banned, -math.inf)  # the distribution right after the prefix
                nxt += first.topk(min(top_k, V), -1).indices.tolist()
            del logits, lp
            yield_point()  # on the server: let the scheduler run a decode step between two of our forwards
        return out, nxt

    def prefix_score(self, ids: list[int], lps: list[float], text: str | None = None) -> PrefixScore:
        return PrefixScore(self.tok.decode(ids) if text is None else text, list(ids), lps)


def play(engine, paragraph: str, prefixes: list[str] | None = None) -> GameResult:
    """CE(P | T) for each prefix T (text) and for the empty prefix, scored together in batched forwards."""
    prefixes = list(prefixes or [])
    for i, t in enumerate(prefixes):
        if not isinstance(t, str):
            raise ParamError("prefixes", f"every prefix must be a string, got {type(t).__name__} at {i}")
    sc = _Scorer(engine, paragraph)
    ids = [sc.tok.encode(t, add_special_tokens=False) if t else [] for t in prefixes]
    lps, _ = sc.score([[], *ids])
    baseline = sc.prefix_score([], lps[0], "")
    scores = [sc.prefix_score(i, lp, t) for t, i, lp in zip(prefixes, ids, lps[1:], strict=True)]
    return GameResult(paragraph, sc.ids, sc.start, baseline, scores, sc.forwards)


def check_search(search: str, budget: int, width: int, top_k: int, paragraph_k: int) -> None:
    if search not in ("greedy", "beam"):
        raise ParamError("search", f"must be 'greedy' or 'beam', got {search!r}")

    def need_int(name, v, lo, hi):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ParamError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")

    need_int("budget", budget, 1, MAX_BUDGET)
    need_int("width", width, 1, MAX_WIDTH)
    need_int("top_k", top_k, 0, MAX_CANDIDATES)
    need_int("paragraph_k", paragraph_k, 0, MAX_CANDIDATES)
    if top_k == 0 and paragraph_k == 0:
        raise ParamError("top_k", "top_k and paragraph_k cannot both be 0 (no candidate tokens)")


def search_prefix(engine, paragraph: str, budget: int = 4, search: str = "greedy", width: int = 4,
                  top_k: int = 16, paragraph_k: int = 32) -> SearchResult:
    """Look for a prefix of at most ``budget`` tokens that lowers the paragraph's cross-entropy most (see the
    module docstring). ``width``: prefixes kept per step by ``beam`` (``greedy`` keeps 1)."""
    check_search(search, budget, width, top_k, paragraph_k)
    sc = _Scorer(engine, paragraph)
    sc.check_length(budget)
    (base_lps,), (base_next,) = sc.score([[]], top_k=max(top_k, 1))
    baseline = sc.prefix_score([], base_lps, "")
    # the paragraph's own tokens, most surprising (without a prefix) first
    surprise: dict[int, float] = {}
    for t, lp in zip(sc.ids, base_lps, strict=True):
        if not sc.banned[t]:
            surprise[t] = max(surprise.get(t, -math.inf), -lp)
    from_paragraph = sorted(surprise, key=lambda t: -surprise[t])[:paragraph_k]
    keep = 1 if search == "greedy" else width
    beams = [([], base_next[:top_k])]  # (prefix ids, the model's proposals after it)
    best, steps, scored = baseline, [], 0
    for length in range(1, budget + 1):
        cands, seen = [], set()
        for ids, proposals in beams:
            for t in [*proposals, *from_paragraph]:
                key = (*ids, t)
                if key not in seen:
                    seen.add(key)
                    cands.append([*ids, t])
        lps, nxt = sc.score(cands, top_k=top_k)
        scored += len(cands)
        ranked = sorted(range(len(cands)), key=lambda i: -math.fsum(lps[i]))
        beams = [(cands[i], nxt[i] if nxt else []) for i in ranked[:keep]]
        top = sc.prefix_score(cands[ranked[0]], lps[ranked[0]])
        steps.append({"length": length, "candidates": len(cands), "best_prefix": top.prefix,
                      "best_prefix_ids": top.prefix_ids, "cross_entropy": top.cross_entropy})
        if top.cross_entropy < best.cross_entropy:
            best = top
    return SearchResult(paragraph, sc.ids, sc.start, baseline, best, search, budget, steps, sc.forwards, scored)


# ---- showing it ------------------------------------------------------------------------------------

# surprisal -log p (nats) -> ANSI colour: p > 0.6, > 0.14, > 0.018, > 0.001, below
SURPRISAL_BANDS = ((0.5, "1;32", "< 0.5"), (2.0, "32", "< 2"), (4.0, "33", "< 4"), (7.0, "31", "< 7"),
                   (math.inf, "1;35", ">= 7"))


def _colour(s: float) -> str:
    return next(code for hi, code, _ in SURPRISAL_BANDS if s < hi)


def pieces(tokenizer, ids: list[int], logprobs: list[float]) -> list[tuple[str, float]]:
    """(text, surprisal in nats) per piece of the paragraph: a token's text, or, where a character's bytes
    span several tokens, those tokens together with their surprisals summed."""
    from .tokenizer import IncrementalDetokenizer

    out, held = [], 0.0
    detok = IncrementalDetokenizer(tokenizer) if hasattr(tokenizer, "backend") else None
    for t, lp in zip(ids, logprobs, strict=True):
        held += -lp
        text = detok.push(t) if detok is not None else tokenizer.decode([t])
        if text:
            out.append((text, held))
            held = 0.0
    rest = detok.flush() if detok is not None else ""
    if rest or held:
        out.append((rest, held))
    return out


def render(tokenizer, ids: list[int], logprobs: list[float], color: bool) -> str:
    """The paragraph with each piece coloured by its surprisal (plain text when ``color`` is False)."""
    if not color:
        return tokenizer.decode(ids)
    return "".join(f"\x1b[{_colour(s)}m{text}\x1b[0m" for text, s in pieces(tokenizer, ids, logprobs))


def legend(color: bool) -> str:
    parts = [f"\x1b[{code}m{label}\x1b[0m" if color else label for _, code, label in SURPRISAL_BANDS]
    return "surprisal -log p (nats): " + "  ".join(parts)


def _most_surprising(tokenizer, ids, lps, n: int = 6) -> str:
    ps = sorted(pieces(tokenizer, ids, lps), key=lambda x: -x[1])[:n]
    return ", ".join(f"{text!r} {s:.1f}" for text, s in ps)


def _describe(s: PrefixScore, base: PrefixScore | None) -> str:
    gain = "" if base is None else f", {base.cross_entropy - s.cross_entropy:+.2f} nats saved vs no prefix"
    n = len(s.prefix_ids)
    return (f"prefix {s.prefix!r} ({n} token{'' if n == 1 else 's'}): CE {s.cross_entropy:.2f} nats "
            f"({s.per_token:.3f} nats/token){gain}")


def format_game(tokenizer, result: GameResult | SearchResult, color: bool = False, header: bool = True) -> str:
    """The report printed by ``logitlab game``: one block per prefix, the empty one first (``header=False``:
    without the paragraph line, the legend and the empty prefix, for a search shown after ``play``'s report)."""
    lines = []
    if header:
        lines.append(f"paragraph: {len(result.paragraph_ids)} tokens, each row conditioned on "
                     f"{result.conditioned_on['token']!r} ({result.conditioned_on['kind'].upper()}, id "
                     f"{result.conditioned_on['id']})")
        if color:
            lines.append(legend(True))
    shown = [(result.baseline, None)] if header else []
    if isinstance(result, GameResult):
        shown += [(s, result.baseline) for s in result.scores]
    else:
        for st in result.steps:
            lines.append(f"  {result.search} step {st['length']}: {st['candidates']} candidates, best "
                         f"{st['best_prefix']!r} CE {st['cross_entropy']:.2f}")
        shown.append((result.best, result.baseline))
        lines.append(f"  ({result.scored} prefixes and the empty one scored in {result.forwards} batched forwards)")
    for s, base in shown:
        lines.append("--- " + _describe(s, base))
        if color:
            lines.append(render(tokenizer, result.paragraph_ids, s.token_logprobs, True))
        else:
            lines.append("    most surprising: " + _most_surprising(tokenizer, result.paragraph_ids,
                                                                    s.token_logprobs))
    if isinstance(result, SearchResult) and result.best is result.baseline:
        lines.append("(no prefix within the budget beat the empty prefix)")
    return "\n".join(lines)


def _score_dict(tokenizer, s: PrefixScore, base: PrefixScore) -> dict:
    return {"prefix": s.prefix, "prefix_ids": s.prefix_ids, "cross_entropy": s.cross_entropy,
            "per_token": s.per_token, "gain": base.cross_entropy - s.cross_entropy,
            "token_logprobs": s.token_logprobs}


def to_dict(tokenizer, result: GameResult | SearchResult) -> dict:
    """JSON-ready form (the CLI's --json and the server's /v1/game)."""
    d = {"paragraph_ids": result.paragraph_ids,
         "paragraph_tokens": [tokenizer.decode([t]) for t in result.paragraph_ids],
         "conditioned_on": result.conditioned_on,
         "baseline": _score_dict(tokenizer, result.baseline, result.baseline), "forwards": result.forwards}
    if isinstance(result, GameResult):
        d["results"] = [_score_dict(tokenizer, s, result.baseline) for s in result.scores]
    else:
        d["search"] = {"method": result.search, "budget": result.budget, "scored": result.scored,
                       "steps": result.steps, "best": _score_dict(tokenizer, result.best, result.baseline)}
    return d
