"""The decode loop: requests in KV-cache slots, one batched forward and one sampler call per step.

Every front end (Python API, CLI, HTTP server) drives this loop. Each ``step()``:

1. runs one decode forward for every running request (one new token each, rows = their cache slots),
2. admits waiting requests into free slots and prefills them (a ragged, right-padded batch; the ``n``
   samples of one prompt share one prefill: its cache slot is copied to its siblings),
3. samples the next token of every row in ONE call of the sampling pipeline (per-row parameters),
4. appends tokens, streams text (UTF-8 safe, stop strings held back), finishes requests on EOS, stop
   token, stop string or length, and frees their slots — compacting so live slots stay ``0..R-1``,
   which keeps the decode batch a plain slice of the cache.

Requests can join or leave at any step (continuous batching). A request's randomness is a function of
its own seed and its own token count, so its output does not depend on its batch neighbours.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.cache import KVCache
from ..model.transformer import Transformer
from ..sampling import SamplingBatch, SamplingParams, sample
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .stops import StopStringMatcher

_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    group: int = -1  # requests with the same group share one prompt prefill (the n samples)
    index: int = 0  # which of the n samples
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    trace: list[dict] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    slot: int = -1
    cancelled: bool = False
    constraint: object = None  # a constraints.ConstraintState: grammar / JSON schema / regex position


    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    """What one step produced for one request (a streaming chunk)."""

    request: Request
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Scheduler:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_len: int = 2048,
        use_cache: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.max_len, self.use_cache = max_batch, max_len, use_cache
        self.cache = KVCache(model.config, max_batch, max_len, dtype=model.dtype) if use_cache else None
        self.output_counts = torch.zeros(max_batch, self.vocab_size, dtype=torch.int32)
        self.prompt_counts = torch.zeros(max_batch, self.vocab_size, dtype=torch.int32)
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i].slot == i
        self._state: dict[int, tuple] = {}  # request id -> (detokenizer, stop matcher)
        self._batch_key: tuple | None = None
        self._batch: SamplingBatch | None = None

    # ---- queue -------------------------------------------------------------------------------
    def add(self, requests: list[Request]) -> None:
        """Queue requests; the ``n`` samples of one prompt must be added together (same group)."""
        self.waiting.extend(requests)

    def abort(self, request: Request) -> None:
        request.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for r in [r for r in self.running if r.cancelled]:
            events.append(self._finish(r, "abort"))
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            r.finish_reason = "abort"
            events.append(TokenEvent(r, None, "", finish_reason="abort"))
        self._release_finished()

        running = list(self.running)
        logits = [self._decode_logits(running)] if running else []
        admitted = self._admit()
        if admitted:
            logits.append(self._prefill_logits(admitted))
        self.running.extend(admitted)
        rows = running + admitted
        if not rows:
            return events
        logits = torch.cat(logits)  # [R, V], row i is slot i
        if any(r.constraint is not None for r in rows):
            # Grammar constraints are the pipeline's first stage: tokens the grammar forbids are -inf
            # before anything else looks at the row.
            from .constraints import allowed_masks, apply_allowed

            logits = apply_allowed(logits, allowed_masks([r.constraint for r in rows], self.vocab_size))

        out = sample(
            logits,
            self._sampling_batch(rows),
            output_counts=self.output_counts[: len(rows)],
            prompt_counts=self.prompt_counts[: len(rows)],
            num_generated=torch.tensor([len(r.output_ids) for r in rows]),
            num_logprobs=max((r.params.logprobs or 0) for r in rows),
            explain=any(r.params.explain for r in rows),
        )
        self.output_counts[torch.arange(len(rows)), out.tokens] += 1
        tokens = out.tokens.tolist()
        logprobs = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        failed = out.failed.tolist()
        for i, r in enumerate(rows):
            if failed[i]:
                r.error = "no token is allowed by the sampling constraints (or the model produced NaN)"
                events.append(self._finish(r, "error"))
                continue
            top = None
            if r.params.logprobs is not None and top_ids is not None:
                top = list(zip(top_ids[i][: r.params.logprobs], top_lps[i][: r.params.logprobs], strict=True))
            if out.trace is not None and r.params.explain:
                r.trace.append({"step": len(r.output_ids), "stages": out.trace[i]})
            events.append(self._append(r, tokens[i], logprobs[i], top))
        self._release_finished()
        return events

    # ---- model calls -------------------------------------------------------------------------
    def _decode_logits(self, rows: list[Request]) -> torch.Tensor:
        if not self.use_cache:
            return self._full_recompute_logits(rows)
        tokens = torch.tensor([[r.output_ids[-1]] for r in rows])
        positions = torch.tensor([[len(r.prompt_ids) + len(r.output_ids) - 1] for r in rows])
        return self.model(tokens, positions, self.cache, rows=slice(0, len(rows)))

    def _full_recompute_logits(self, rows: list[Request]) -> torch.Tensor:
        """No KV cache: run every sequence from its first token again (cost grows with length)."""
        seqs = [r.prompt_ids + r.output_ids for r in rows]
        tokens, valid = _pad(seqs)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self.model(tokens, positions, None, valid=valid)

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots (whole groups only), resetting their counters."""
        admitted: list[Request] = []
        while self.waiting:
            group = [self.waiting[0]]
            for r in itertools.islice(self.waiting, 1, None):
                if r.group == group[0].group and r.group != -1:
                    group.append(r)
            if len(self.running) + len(admitted) + len(group) > self.max_batch:
                break
            for r in group:
                self.waiting.remove(r)
                r.slot = len(self.running) + len(admitted)
                admitted.append(r)
                self.output_counts[r.slot].zero_()
                self.prompt_counts[r.slot].zero_()
                ids = torch.tensor(r.prompt_ids)
                self.prompt_counts[r.slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
                self._state[r.id] = (
                    IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                    StopStringMatcher(r.params.stop),
                )
        return admitted

    def _prefill_logits(self, admitted: list[Request]) -> torch.Tensor:
        """One ragged forward over the first request of each group; its cache slot is copied to the
        other samples of the group. Returns the next-token logits of every admitted request."""
        leaders: list[Request] = []
        leader_of: list[int] = []
        for r in admitted:
            if not leaders or r.group == -1 or r.group != leaders[-1].group:
                leaders.append(r)
            leader_of.append(len(leaders) - 1)
        seqs = [r.prompt_ids for r in leaders]
        tokens, valid = _pad(seqs)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        echo = any(r.params.echo for r in leaders)
        if self.use_cache:
            # Leaders are prefilled into consecutive slots starting at the first admitted slot; when a
            # group has several members, members are then copied to their own slots.
            first = admitted[0].slot
            staging = slice(first, first + len(leaders))
            out = self.model(tokens, positions, self.cache, rows=staging, valid=valid,
                             logits_at="all" if echo else "last")
        else:
            out = self.model(tokens, positions, None, valid=valid, logits_at="all" if echo else "last")
        if echo:
            lengths = valid.sum(1)
            for g, r in enumerate(leaders):
                if r.params.echo:
                    self._prompt_logprobs(r, out[g, : lengths[g]])
            last = out[torch.arange(len(leaders)), lengths - 1]
        else:
            last = out
        if self.use_cache and len(leaders) != len(admitted):
            # Move leaders from their staging slots to their final slots, last first so nothing
            # is overwritten before it is read, then copy each leader into its siblings.
            first = admitted[0].slot
            final = [next(r.slot for r, g in zip(admitted, leader_of, strict=True) if g == i)
                     for i in range(len(leaders))]
            for i in reversed(range(len(leaders))):
                if final[i] != first + i:
                    self.cache.copy_slot(first + i, final[i], len(leaders[i].prompt_ids))
            for r, g in zip(admitted, leader_of, strict=True):
                if r.slot != final[g]:
                    self.cache.copy_slot(final[g], r.slot, len(r.prompt_ids))
        for r, g in zip(admitted, leader_of, strict=True):
            if r.params.echo and r is not leaders[g]:
                r.prompt_logprobs = leaders[g].prompt_logprobs
                r.prompt_top_logprobs = leaders[g].prompt_top_logprobs
        return last[torch.tensor(leader_of)]

    def _prompt_logprobs(self, r: Request, logits: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
        ids = torch.tensor(r.prompt_ids)
        r.prompt_logprobs = [None] + lp[:-1].gather(1, ids[1:, None]).squeeze(1).tolist()
        n = r.params.logprobs or 0
        if n:
            vals, idx = lp[:-1].topk(n, dim=-1)
            r.prompt_top_logprobs = [None] + [
                list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)
            ]

    # ---- bookkeeping -------------------------------------------------------------------------
    def _sampling_batch(self, rows: list[Request]) -> SamplingBatch:
        key = tuple(r.id for r in rows)
        if key != self._batch_key:  # rebuilt only when the batch composition changes
            self._batch = SamplingBatch.build(
                [r.params for r in rows], [r.seed for r in rows], self.vocab_size, self.eos_ids
            )
            self._batch_key = key
        return self._batch

    def _append(self, r: Request, token: int, logprob: float, top) -> TokenEvent:
        p = r.params
        r.output_ids.append(token)
        r.token_logprobs.append(logprob)
        r.top_logprobs.append(top)
        detok, stops = self._state[r.id]
        n = len(r.output_ids)
        if r.constraint is not None and token not in self.eos_ids:
            r.constraint.accept(token)
            if r.constraint.terminated:  # the grammar is complete: nothing else may follow
                text = stops.feed(detok.push(token)) + stops.feed(detok.flush()) + stops.flush()
                return self._finish(r, "stop", token, text, logprob, top)
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            text = stops.feed(detok.flush(), check=n > p.min_tokens) + stops.flush()
            return self._finish(r, "stop", token, text, logprob, top)
        text = stops.feed(detok.push(token), check=n >= p.min_tokens)
        if stops.stopped:
            return self._finish(r, "stop", token, text, logprob, top)
        if n >= p.max_tokens or len(r.prompt_ids) + n >= self.max_len:
            text += stops.feed(detok.flush())
            text += stops.flush()
            return self._finish(r, "stop" if stops.stopped else "length", token, text, logprob, top)
        r.text += text
        return TokenEvent(r, token, text, logprob, top)

    def _finish(self, r, reason, token=None, text="", logprob=None, top=None) -> TokenEvent:
        r.text += text
        r.finish_reason = reason
        return TokenEvent(r, token, text, logprob, top, finish_reason=reason)

    def _release_finished(self) -> None:
        """Free the slots of finished requests, moving the highest live slots down into the holes."""
        live = [r for r in self.running if not r.finished]
        if len(live) == len(self.running):
            return
        for r in self.running:
            if r.finished:
                self._state.pop(r.id, None)
        for new_slot, r in enumerate(live):
            if r.slot != new_slot:
                length = len(r.prompt_ids) + len(r.output_ids) - 1  # positions already in the cache
                if self.cache is not None:
                    self.cache.copy_slot(r.slot, new_slot, length)
                self.output_counts[new_slot] = self.output_counts[r.slot]
                self.prompt_counts[new_slot] = self.prompt_counts[r.slot]
                r.slot = new_slot
        self.running = live


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into tokens [B, T] and a validity mask [B, T]."""
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        valid[i, : len(s)] = True
    return tokens, valid
