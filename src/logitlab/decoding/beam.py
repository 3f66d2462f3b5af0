"""Beam search with length normalisation (seed 003).

Keep the ``B`` best partial hypotheses ("beams"). At every step all beams run in ONE batched forward
(rows of the scheduler's continuous batch, beside any other request), each beam's next-token
log-probabilities come from the sampling pipeline (constraint mask, logit bias, penalties, ... with
temperature 0 read as 1: beam search needs the distribution, not its argmax), and the ``B * V``
extensions are ranked by their summed log-probability ``s = sum_i log p(x_i | x_<i)``. The ``B`` best
extensions that are not end-of-sequence become the new beams; each new beam takes a share of its
parent's KV block table (paged cache: nothing is copied but the shared last block, on its next write).
Extensions ending in EOS are finished hypotheses, kept aside with the length-normalised score

    score(x) = s(x) / |x| ** alpha            (|x| counts generated tokens, EOS included; alpha = length_penalty)

alpha = 0 ranks by probability (favours short outputs), alpha = 1 by mean log-probability per token.

Stopping: at ``max_tokens`` (live beams are finished with reason "length"), or as soon as ``B``
hypotheses are finished and no live beam can still beat the ``B``-th best of them. Log-probabilities
are <= 0, so a live beam's sum only falls; its best reachable score is ``s / max_tokens ** alpha`` for
alpha > 0 (a longer divisor helps a negative sum), and ``s / |x| ** alpha`` for alpha <= 0. This bound is
exact, not a heuristic: stopping never changes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..sampling import ParamError, SamplingParams
from .constraints import Constraint, PipelineRows, allowed_masks, resolve_model, stop_token_set


@dataclass
class Hypothesis:
    token_ids: list[int]
    logprob: float  # sum of the (pipeline) log-probabilities of the generated tokens
    score: float  # logprob / len ** length_penalty
    finish_reason: str  # "stop" (EOS or grammar complete) | "length"
    text: str | None = None
    token_logprobs: list[float] = field(default_factory=list)  # each token's (pipeline) log-probability


@dataclass
class BeamResult:
    hypotheses: list[Hypothesis]  # the n best, best first
    steps: list[dict] = field(default_factory=list)  # per-step walk-through (trace=True)
    forwards: int = 0


def normalised_score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(1, length) ** length_penalty


def _best_reachable(logprob: torch.Tensor, length: int, max_tokens: int, alpha: float) -> torch.Tensor:
    """Upper bound of the final normalised score of live beams with summed logprob ``logprob``."""
    return logprob / (max_tokens ** alpha if alpha > 0 else max(1, length) ** alpha)


class BeamGroup:
    """One beam search as a mode of the scheduler: ``width`` rows of the running batch, each with its own
    block table, advanced by ``select`` after every batched forward. The client sees ``requests`` (the
    ``n`` best hypotheses), finished together when the search is decided.

    Reordering is a swap of block tables: a new beam takes a share of its parent's table (no key or
    value is copied; the shared last block is copied on its next write)."""

    kind = "beam"

    def __init__(self, prompt_ids: list[int], width: int, length_penalty: float, max_tokens: int, n: int,
                 eos_token_ids, vocab_size: int, params: SamplingParams | None = None,
                 constraint: Constraint | None = None, trace: bool = False, early_stop: bool = True):
        self.prompt_ids, self.W, self.alpha = list(prompt_ids), width, float(length_penalty)
        self.max_tokens, self.n, self.V = max_tokens, n, vocab_size
        self.params = params if params is not None else SamplingParams()
        # what ends a hypothesis: the one stop policy (EOS unless ignore_eos, and the stop_token_ids)
        self.eos = stop_token_set(self.params, eos_token_ids)
        self.rows = PipelineRows(self.params, self.prompt_ids, vocab_size, sorted(self.eos), count=1,
                                 distribution=True)
        self.states = [constraint.start()] if constraint is not None else None
        self.trace, self.early_stop = trace, early_stop
        self.seqs: list[list[int]] = [[]]  # live beams' generated tokens
        self.token_lps: list[list[float]] = [[]]  # and each token's (pipeline) log-probability
        self.sums = torch.zeros(1, dtype=torch.float64)
        self.tables: list[list[int]] = [[]]  # live beams' KV block tables (the prompt's, before step 0)
        self.finished: list[Hypothesis] = []
        self.steps: list[dict] = []
        self.forwards = 0
        self.done = self.aborted = False
        self.requests: list = []  # the scheduler's visible requests (set by make_requests)
        self.reserved = 0  # KV blocks set aside at admission

    @property
    def position(self) -> int:
        """Position of the tokens the live beams feed next (every beam has the same length)."""
        return len(self.prompt_ids) + len(self.seqs[0]) - 1

    def live(self) -> int:
        return 0 if self.done else len(self.seqs)

    def last_tokens(self) -> list[int]:
        return [s[-1] for s in self.seqs]

    def select(self, logits: torch.Tensor, cache=None, tokenizer=None) -> None:
        """One step: ``logits`` [R, V] of the live beams -> the ``W`` best extensions become the beams
        (block tables reordered in ``cache``), EOS extensions finished hypotheses; ``done`` when decided."""
        self.forwards += 1
        step = len(self.seqs[0])
        L = step + 1  # length of every extension made in this step
        W, V, alpha = self.W, self.V, self.alpha
        allowed = allowed_masks(self.states, V) if self.states is not None else None
        lp = self.rows.logprobs(logits, allowed).double()  # [R, V]
        cand = (self.sums.unsqueeze(1) + lp).view(-1)  # [R * V]
        R = len(self.seqs)
        k = min(cand.numel(), W + R * len(self.eos))  # enough to hold W live ones after every EOS one
        vals, idx = cand.topk(k)
        parents: list[int] = []
        tokens: list[int] = []
        new_sums: list[float] = []
        lp_rows = lp.tolist() if k else []
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            if v == float("-inf"):
                break
            parent, tok = divmod(i, V)
            if tok in self.eos:  # (a complete grammar allows only EOS, so this also ends constrained beams)
                self.finished.append(Hypothesis(self.seqs[parent] + [tok], v, normalised_score(v, L, alpha), "stop",
                                                token_logprobs=self.token_lps[parent] + [lp_rows[parent][tok]]))
            elif len(parents) < W:
                parents.append(parent)
                tokens.append(tok)
                new_sums.append(v)
        if self.trace:
            self.steps.append(_trace_step(step, self.seqs, self.sums, lp, W, parents, tokens, new_sums,
                                          self.finished, tokenizer))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[max(W, self.n):]  # only the best W can matter for the result or the stopping rule
        if not parents:  # no live extension left (every token masked or -inf)
            self.seqs, self.token_lps, self.sums = [], [], self.sums[:0]
            self._end(cache)
            return
        old_tables = self.tables
        self.seqs = [self.seqs[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        self.token_lps = [self.token_lps[p] + [lp_rows[p][t]] for p, t in zip(parents, tokens, strict=True)]
        self.sums = torch.tensor(new_sums, dtype=torch.float64)
        if cache is not None:  # reorder = new tables sharing the parents' blocks, then drop the old ones
            self.tables = [cache.share(old_tables[p]) for p in parents]
            for t in old_tables:
                cache.release(t)
        if L == self.max_tokens:
            self._end(cache)
            return
        if self.early_stop and len(self.finished) >= W:
            best_live = float(_best_reachable(self.sums, L, self.max_tokens, alpha).max())
            if best_live <= self.finished[W - 1].score:
                self.seqs, self.token_lps, self.sums = [], [], self.sums[:0]
                self._end(cache)
                return
        self.rows.reorder(torch.tensor(parents, dtype=torch.long), torch.tensor(tokens, dtype=torch.long))
        if self.states is not None:
            new_states = []
            for p, t in zip(parents, tokens, strict=True):
                st = self.states[p].fork()
                st.accept(t)
                new_states.append(st)
            self.states = new_states

    def _end(self, cache) -> None:
        """Beams still alive are finished by length; release every block."""
        for s, v, lps in zip(self.seqs, self.sums.tolist(), self.token_lps, strict=False):
            self.finished.append(Hypothesis(s, v, normalised_score(v, len(s), self.alpha), "length",
                                            token_logprobs=lps))
        self.finished.sort(key=lambda h: -h.score)
        if cache is not None:
            for t in self.tables:
                cache.release(t)
        self.tables, self.done = [], True

    def abort(self, cache) -> None:
        if cache is not None:
            for t in self.tables:
                cache.release(t)
        self.tables, self.done, self.aborted = [], True, True

    def result(self, tokenizer=None) -> BeamResult:
        best = self.finished[: self.n]
        if tokenizer is not None:
            for h in best:
                h.text = tokenizer.decode([t for t in h.token_ids if t not in self.eos])
        return BeamResult(best, self.steps, self.forwards)


def _validate(width, n, max_tokens, length_penalty) -> None:
    if not isinstance(width, int) or width < 1:
        raise ParamError("beam_width", f"must be an integer >= 1, got {width!r}")
    if not isinstance(n, int) or not 1 <= n <= width:
        raise ParamError("n", f"must be between 1 and beam_width ({width}), got {n!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ParamError("max_tokens", f"must be an integer >= 1, got {max_tokens!r}")
    if not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ParamError("length_penalty", f"must be a number, got {length_penalty!r}")


@torch.inference_mode()
def beam_search(
    model_or_engine,
    prompt,
    width: int = 4,
    length_penalty: float = 1.0,
    max_tokens: int = 32,
    n: int = 1,
    eos_token_ids=None,
    params: SamplingParams | None = None,
    constraint: Constraint | None = None,
    trace: bool = False,
    early_stop: bool = True,
) -> BeamResult:
    """The ``n`` best sequences after ``prompt`` (text with an Engine, or token ids) by length-normalised
    log-probability. ``params`` (optional) runs the beams' log-probabilities through the sampling
    pipeline (bias, penalties, banned/allowed tokens, truncation); without it they are the model's raw
    log-probabilities. ``constraint`` (xgrammar) masks each beam's next tokens as the pipeline's first
    stage; each beam keeps its own parse state. ``early_stop=False`` runs to ``max_tokens`` (same result,
    more work: for tests and demos).

    It runs as a mode of the scheduler: with an Engine, in the engine's own continuous batch (batched
    with whatever else runs there); with a bare model, in a scheduler of its own."""
    model, tokenizer, prompt_ids, eos = resolve_model(model_or_engine, prompt, eos_token_ids)
    _validate(width, n, max_tokens, length_penalty)
    P = len(prompt_ids)
    if P + max_tokens > model.config.context_length:
        raise ParamError("max_tokens", f"prompt ({P}) + max_tokens ({max_tokens}) exceeds the context "
                         f"length {model.config.context_length}")
    from .scheduler import Scheduler

    sched = getattr(model_or_engine, "scheduler", None) if tokenizer is not None else None
    if sched is None:
        sched = Scheduler.standalone(model, None, eos, width, P + max_tokens, P + max_tokens)
    group = BeamGroup(prompt_ids, width, length_penalty, max_tokens, n, eos, model.config.vocab_size, params,
                      constraint, trace, early_stop)
    sched.add_beam(group)
    while not group.done:
        sched.step()
    return group.result(tokenizer)


def _trace_step(step, seqs, sums, lp, W, parents, tokens, new_sums, finished, tokenizer) -> dict:
    """The slide's walk-through: each beam's best W extensions ("current beam candidates", with the
    probability of the whole prefix), the refreshed beam, and the finished hypotheses so far."""

    def show(ids):
        return tokenizer.decode(ids) if tokenizer is not None else ids

    candidates = []
    vals, ids = lp.topk(min(W, lp.shape[-1]), dim=-1)
    for r in range(len(seqs)):
        for v, t in zip(vals[r].tolist(), ids[r].tolist(), strict=True):
            if v > float("-inf"):
                total = float(sums[r]) + v
                candidates.append({"text": show(seqs[r] + [t]), "parent": r, "token_prob": math.exp(v),
                                   "logprob": total, "prob": math.exp(total)})
    return {
        "step": step,
        "candidates": candidates,
        "beams": [{"text": show(seqs[p] + [t]), "logprob": v, "prob": math.exp(v), "parent": p}
                  for p, t, v in zip(parents, tokens, new_sums, strict=True)],
        "finished": [{"text": show(h.token_ids), "logprob": h.logprob, "score": h.score} for h in finished],
    }
