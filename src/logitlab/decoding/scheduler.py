"""The decode loop: running requests are the rows of one batched forward and one sampler call per step.

Every front end (Python API, CLI, HTTP server) drives this loop. Each ``step()``:

1. runs one decode forward for every running request (one new token each),
2. admits waiting requests while there are rows and KV blocks for them and prefills them (a ragged,
   right-padded batch). Their prompts first take whatever whole blocks the prefix cache holds, so only
   the rest is computed; the ``n`` samples of one prompt share one prefill and its blocks,
3. samples the next token of every row in ONE call of the sampling pipeline (per-row parameters),
4. appends tokens, streams text (UTF-8 safe, stop strings held back), finishes requests on EOS, stop
   token, stop string or length, and releases their blocks (their full blocks stay cached for reuse).

The KV cache is paged (``model/paged_cache.py``): each request holds a block table, memory follows the
tokens in use, and a request is admitted only when the pool can hold it to its end (it waits until
then; one that could never fit is refused up front), so a running request never runs out of blocks.
Requests can join or leave at any step (continuous batching). A request's randomness is a function of
its own seed and its own token count, so its output does not depend on its batch neighbours.

On a GPU (a model on cuda) the KV pool, the per-slot sampling state and the sampling pipeline live on the
device; the model's inputs are built on the host as always and moved by the model, once per forward; the
sampled tokens, logprobs and flags come back in one copy per step (``_to_host``). Beam search picks its beams
from host copies of its rows' logits; speculative decoding, guided choice and contrastive decoding build
their tensors on the host and are refused on a device (ParamError).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.paged_cache import PagedKVCache
from ..model.transformer import Transformer
from ..sampling import ParamError, SamplingBatch, SamplingParams, sample
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .stops import StopStringMatcher

log = logging.getLogger("logitlab.scheduler")

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
    slot: int = -1  # row of the decode batch (and of the per-row sampling state)
    blocks: list[int] = field(default_factory=list)  # KV-cache block table
    reserved: int = 0  # KV blocks set aside for this request at admission (enough to reach its end)
    allocated: int = 0  # blocks allocated for it since (not shared ones): counted against ``reserved``
    cancelled: bool = False
    constraint: object = None  # a constraints.ConstraintState: grammar / JSON schema / regex position
    beam: object = None  # a beam.BeamGroup this request is one hypothesis of (the group holds the rows)
    spec: object = None  # a speculative.SpecGroup this request is one row of
    choice: object = None  # a choice.ChoiceGroup this request is one sample of
    # contrastive decoding: (amateur, alpha, amateur temperature); the row samples from the contrastive
    # scores (decoding/contrastive.py). The amateur is K, the model's own first K layers (read from the same
    # forward pass), or a contrastive.Amateur (a separate model with its own paged cache)
    contrastive: tuple[object, float, float] | None = None
    trace_contrastive: bool = False  # record each step's top tokens by score in ``trace``


    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Prefill:
    """A prompt on its way into the KV cache, a chunk per step while other requests decode: its leader
    (first) and the samples that will share its blocks."""

    members: list[Request]
    done: int = -1  # prompt positions in the cache (-1: the prefix cache not consulted yet)

    @property
    def leader(self) -> Request:
        return self.members[0]


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
        kv_tokens: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
    ):
        """kv_tokens: the KV pool's budget in tokens (default: ``max_batch * max_len``, what a static cache
        would hold); memory is taken as blocks are first used, so this is a ceiling. prefill_chunk: prompt
        tokens computed per step while other requests are decoding (a long prompt then delays their next
        token by one chunk's forward, not by the whole prompt's)."""
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_batch, self.max_len, self.use_cache = max_batch, max_len, use_cache
        # The model's device: the KV pool, the per-slot sampling state and the sampling pipeline live there;
        # the model's inputs are built on the host and moved by the model, once per forward.
        self.device = dev = _device_of(model)
        capacity = -(-(kv_tokens or max_batch * max_len) // block_size) + 1  # + the scratch block
        # a device pool is allocated whole (a pool that grows would need every captured CUDA graph again)
        pool = {} if dev.type == "cpu" else {"initial_blocks": capacity, "device": dev}
        self.cache = PagedKVCache(model.config, capacity, block_size, dtype=model.dtype, **pool) if use_cache else None
        self.output_counts = torch.zeros(max_batch, self.vocab_size, dtype=torch.int32, device=dev)
        self.prompt_counts = torch.zeros(max_batch, self.vocab_size, dtype=torch.int32, device=dev)
        self.mirostat_mu = torch.zeros(max_batch, dtype=torch.float64, device=dev)  # per slot, like the counts
        self._token_texts = None  # the vocabulary as text, for DRY's sequence breakers (made on first use)
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.waiting: deque = deque()  # Requests, and BeamGroups (a beam search waits as one unit)
        self.running: list[Request] = []  # running[i].slot == i
        self.groups: list = []  # running beam searches: their live beams are rows after ``running``
        self.prefilling: list[_Prefill] = []  # admitted prompts not yet wholly in the cache
        self._state: dict[int, tuple] = {}  # request id -> (detokenizer, stop matcher)
        self._batch_key: tuple | None = None
        self._batch: SamplingBatch | None = None

    # ---- queue -------------------------------------------------------------------------------
    @classmethod
    def standalone(cls, model: Transformer, tokenizer, eos_token_ids, rows: int, max_len: int,
                   tokens_per_row: int) -> Scheduler:
        """A scheduler of its own for a function that runs one mode on a model (``beam_search``,
        ``speculative_generate``, ``constrained_generate``): ``rows`` rows, a KV pool for ``tokens_per_row``
        tokens each (plus whole-block slack), and these end-of-sequence ids. ``tokenizer=None``: a bare model
        on token ids (results carry no text)."""
        sched = cls(model, tokenizer if tokenizer is not None else _IdsOnly(eos_token_ids), max_batch=rows,
                    max_len=max_len, kv_tokens=rows * (tokens_per_row + 64) + 64)
        sched.eos_ids = sorted(int(e) for e in eos_token_ids)
        return sched

    def run_to_end(self, requests: list[Request], tokenizer) -> tuple[list[list[int]], list[str] | None]:
        """Add ``requests``, step until every one has finished, and return their token ids and (given a
        tokenizer) their texts without end-of-sequence ids: the tail of the standalone mode functions."""
        self.add(requests)
        while not all(r.finished for r in requests):
            self.step()
        eos = set(self.eos_ids)
        out = [list(r.output_ids) for r in requests]
        return out, [tokenizer.decode([t for t in o if t not in eos]) for o in out] if tokenizer else None

    def add(self, requests: list[Request]) -> None:
        """Queue requests (checked by ``check_fits`` in ``Engine.make_requests``); the ``n`` samples of
        one prompt are added together (same group). The hypotheses of a beam search queue their group."""
        if self.device.type != "cpu":
            for r in requests:
                if r.contrastive is not None:
                    raise ParamError("contrastive_amateur", f"contrastive decoding runs on the CPU only (the model is "
                                     f"on {self.device})")
        for r in requests:
            group = r.beam or r.spec or r.choice
            if group is None:
                self.waiting.append(r)
            elif r is group.requests[0]:
                self.add_beam(group)

    def add_beam(self, group) -> None:
        """Queue a beam search (``beam.BeamGroup``) or a speculative decode (``speculative.SpecGroup``):
        ``group.W`` rows of the batch once admitted."""
        field_name = {"beam": "beam_width", "choice": "guided_choice"}.get(group.kind, "n")
        if self.cache is None:
            raise ParamError(field_name, f"{group.kind} decoding needs the KV cache (not --no-kv-cache)")
        if self.device.type != "cpu" and group.kind != "beam":  # their drivers build their tensors on the host
            raise ParamError(field_name, f"{group.kind} decoding runs on the CPU only (the model is on {self.device})")
        if group.W > self.max_batch:
            raise ParamError(field_name, f"must be at most {self.max_batch} (the largest batch), got {group.W}")
        need = self._group_blocks(group)
        if need > self.cache.capacity - 1:
            raise ParamError(field_name, f"{group.W} rows x (prompt + max_tokens) need {need} KV blocks; the pool "
                             f"holds {self.cache.capacity - 1} (raise --kv-memory)")
        self.waiting.append(group)

    def _group_blocks(self, group) -> int:
        per_row = self._worst_blocks(len(group.prompt_ids), group.max_tokens)
        if group.kind == "speculative":  # a row writes its drafts (up to gamma + 1 positions) past its length
            per_row += self.cache.blocks_for(group.gamma + 1)
        return group.W * per_row + self.cache.blocks_for(len(group.prompt_ids))

    def _worst_blocks(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks one request may need by its end (+1: a copy of a shared last block)."""
        return self.cache.blocks_for(min(prompt_len + max_tokens, self.max_len)) + 1

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """ParamError when one request alone could never fit in the KV pool (it would wait forever)."""
        if self.cache is None:
            return
        need, have = self._worst_blocks(prompt_len, max_tokens), self.cache.capacity - 1
        if need > have:
            raise ParamError("max_tokens", f"prompt + max_tokens need {need * self.cache.block_size} KV-cache "
                             f"positions; the pool holds {have * self.cache.block_size} (raise --kv-memory)")

    def abort(self, request: Request) -> None:
        request.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.groups or self.prefilling)

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for r in [r for r in self.running if r.cancelled]:
            events.append(self._finish(r, "abort"))
        for r in [r for r in self.waiting if _cancelled(r)]:
            self.waiting.remove(r)
            if isinstance(r, Request):
                r.finish_reason = "abort"
                events.append(TokenEvent(r, None, "", finish_reason="abort"))
            else:
                r.abort(None)
                events += self._group_events(r, "abort")
        for g in [g for g in self.groups if _cancelled(g)]:
            g.abort(self.cache)
        for u in [u for u in self.prefilling if all(r.cancelled for r in u.members)]:
            self.prefilling.remove(u)
            if self.cache is not None:
                self.cache.release(u.leader.blocks)
            for r in u.members:
                r.finish_reason = "abort"
                events.append(TokenEvent(r, None, "", finish_reason="abort"))
        self._release_finished()

        running, groups = list(self.running), [g for g in self.groups if not g.done and g.kind == "beam"]
        # Speculative rounds: drafts proposed now; verification rides in the one decode forward below as
        # one-token rows after the beams' where the model decodes in its native kernels, else its own forward.
        spec = [g for g in self.groups if not g.done and g.kind == "speculative"]
        if spec:
            from .speculative import rides_decode
        ride = bool(spec) and rides_decode(self)
        verify, alone = ([(g, g.prepare(self)) for g in spec], []) if ride else ([], spec)
        decoded = self._decode_logits(running, groups, verify) if running or groups or verify else None
        logits = [decoded[: len(running)]] if running else []
        admitted, new_groups = self._admit()
        self.prefilling += _units(admitted)
        admitted, ready_logits = self._prefill_step(chunked=bool(running or groups))
        if admitted:
            logits.append(ready_logits)
            self._activate(admitted, len(running))
        offset = len(running) + sum(g.live() for g in groups)
        for g, (tokens, _, _) in verify:  # commit what each verification accepts (streams the tokens)
            n = tokens.numel()
            events += g.commit(self, decoded[offset: offset + n].view(*tokens.shape, -1))
            offset += n
        for g in alone:
            events += g.round(self)  # draft, verify in a target forward of its own, commit
        for g in [g for g in self.groups if not g.done and g.kind == "choice"]:
            g.score_chunk(self)  # the next few options, as rows over the prompt's blocks
        if new_groups:
            if any(g.kind == "beam" for g in new_groups):
                self._prefill_groups([g for g in new_groups if g.kind == "beam"])
            for g in new_groups:
                if g.kind == "choice":
                    g.prefill(self)
                if g.kind == "speculative":
                    for r in g.requests:
                        self._state[r.id] = (IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                                             StopStringMatcher(r.params.stop))
                    g.prefill(self)
        offset = len(running)
        for g in groups:  # each beam search picks its next beams from its rows' logits
            R = g.live()
            g.select(_host(decoded[offset: offset + R]), self.cache, self._text_tokenizer())
            offset += R
        self.groups += new_groups
        for g in [g for g in self.groups if g.done]:
            self.groups.remove(g)
            if g.kind == "beam":
                events += self._group_events(g, "abort" if g.aborted else None)
                continue
            if g.kind == "choice":
                events += self._choice_events(g)
                continue
            for r in g.requests:  # speculative rows streamed their tokens; an abort ends the rest
                self._state.pop(r.id, None)
                if not r.finished:
                    events.append(self._finish(r, "abort"))
        self.running.extend(admitted)
        rows = running + admitted
        if not rows:
            return events
        logits = torch.cat(logits)  # [R, V], row i is slot i
        num_logprobs = max((r.params.logprobs or 0) for r in rows)
        explain = any(r.params.explain for r in rows)
        broken: dict[int, str] = {}  # row -> error, for rows failed alone (row isolation)
        try:
            out = self._sample(logits, rows, 0, self._sampling_batch(rows), num_logprobs, explain)
        except Exception:
            # Row isolation: one request's parameters or state (a value validation let through, a bug in one
            # sampler stage, a broken grammar matcher) must not fail its batch neighbours. Sample the rows one
            # by one; only a row that still raises fails, alone. (Costs R small calls, on this step only.)
            log.exception("sampling a batch of %d rows failed; sampling them one by one", len(rows))
            out, broken = self._sample_each(logits, rows, num_logprobs, explain)
        self.output_counts[torch.arange(len(rows), device=self.device), out.tokens] += 1
        if out.mirostat_mu is not None:
            self.mirostat_mu[: len(rows)] = out.mirostat_mu
        if out.tokens.device.type == "cpu":
            tokens = out.tokens.tolist()
            logprobs = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            failed = out.failed.tolist()
        else:
            tokens, logprobs, top_ids, top_lps, failed = _to_host(out)
        for i, r in enumerate(rows):
            if i in broken:
                r.error = broken[i]
                events.append(self._finish(r, "error"))
                continue
            if failed[i]:
                r.error = "no token is allowed by the sampling constraints (or the model produced NaN)"
                events.append(self._finish(r, "error"))
                continue
            top = None
            if r.params.logprobs is not None and top_ids is not None:
                top = list(zip(top_ids[i][: r.params.logprobs], top_lps[i][: r.params.logprobs], strict=True))
            if out.trace is not None and r.params.explain:
                r.trace.append({"step": len(r.output_ids), "stages": out.trace[i]})
            try:
                events.append(self._append(r, tokens[i], logprobs[i], top))
            except Exception as e:  # detokenizer / stop strings / grammar accept of this row: fail it alone
                log.exception("request %s failed after sampling", r.id)
                r.error = f"internal error: {type(e).__name__}: {e}"
                events.append(self._finish(r, "error"))
        self._release_finished()
        return events

    def _sample(self, logits: torch.Tensor, rows: list[Request], start: int, batch: SamplingBatch,
                num_logprobs: int, explain: bool):
        """The sampling pipeline on ``rows`` (rows ``start``.. of the batch, ``logits`` theirs): the grammar
        constraint mask first (tokens it forbids are -inf before anything else looks at a row), then
        ``sample`` with the rows' per-row state."""
        if any(r.constraint is not None for r in rows):
            from .constraints import allowed_masks, apply_allowed

            allowed = allowed_masks([r.constraint for r in rows], self.vocab_size)
            logits = apply_allowed(logits, allowed if allowed.device == logits.device else allowed.to(logits.device))
        history = None
        if {"dry", "no_repeat_ngram"} & batch.uses:  # these read each row's tokens in order
            history = _pad([r.prompt_ids + r.output_ids for r in rows], fill=-1)[0]
            history = history if history.device == logits.device else history.to(logits.device)
        end = start + len(rows)
        return sample(
            logits,
            batch,
            output_counts=self.output_counts[start:end],
            prompt_counts=self.prompt_counts[start:end],
            num_generated=torch.tensor([len(r.output_ids) for r in rows]),
            num_logprobs=num_logprobs,
            explain=explain,
            history=history,
            mirostat_mu=self.mirostat_mu[start:end] if "mirostat" in batch.uses else None,
        )

    def _sample_each(self, logits: torch.Tensor, rows: list[Request], num_logprobs: int, explain: bool):
        """Row isolation: every row sampled alone. Returns (the rows' outputs as one SamplerOutput, {row:
        error} for the rows that raised; their entries in the output are placeholders)."""
        from ..sampling.sampler import SamplerOutput

        outs, broken = [], {}
        for i, r in enumerate(rows):
            try:
                texts = self.vocab_texts() if r.params.dry_multiplier > 0 else None
                batch = SamplingBatch.build([r.params], [r.seed], self.vocab_size, self.eos_ids, device=self.device,
                                            token_texts=texts)
                outs.append(self._sample(logits[i: i + 1], [r], i, batch, num_logprobs, explain))
            except Exception as e:
                log.exception("request %s fails alone: its row cannot be sampled", r.id)
                broken[i] = f"internal error: {type(e).__name__}: {e}"
                outs.append(None)
        ok = next((o for o in outs if o is not None), None)

        def cat(name, fill):
            parts = [getattr(o, name) if o is not None else fill for o in outs]
            return None if any(p is None for p in parts) else torch.cat(parts)

        has_top = ok.top_ids is not None if ok is not None else num_logprobs > 0
        width = ok.top_ids.shape[1] if ok is not None and has_top else num_logprobs
        mu = None
        if any(o is not None and o.mirostat_mu is not None for o in outs):
            mu = self.mirostat_mu[: len(rows)].clone()
            for i, o in enumerate(outs):
                if o is not None and o.mirostat_mu is not None:
                    mu[i] = o.mirostat_mu[0]
        dev = logits.device
        zero = torch.zeros(1, device=dev)
        return SamplerOutput(
            tokens=cat("tokens", torch.zeros(1, dtype=torch.long, device=dev)), logprobs=cat("logprobs", zero),
            raw_logprobs=cat("raw_logprobs", zero), processed_logprobs=cat("processed_logprobs", zero),
            top_ids=cat("top_ids", torch.zeros(1, width, dtype=torch.long, device=dev)) if has_top else None,
            top_logprobs=cat("top_logprobs", torch.zeros(1, width, device=dev)) if has_top else None,
            failed=cat("failed", torch.zeros(1, dtype=torch.bool, device=dev)),
            trace=[t for o in outs for t in (o.trace if o is not None and o.trace is not None else [[]])]
            if explain else None,
            mirostat_mu=mu,
        ), broken

    # ---- model calls -------------------------------------------------------------------------
    def _decode_logits(self, rows: list[Request], groups=(), verify=()) -> torch.Tensor:
        """One decode forward: a new token for every running request, then for every live beam of each
        beam search, then the verification rows of each speculative round (``verify``: (group, (tokens,
        positions, valid) [W, g + 1])), each position a one-token row over its sequence's blocks; rows in
        that order."""
        if not self.use_cache:
            return self._full_recompute_logits(rows)
        tokens = [r.output_ids[-1] for r in rows]
        positions = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in rows]
        for r, p in zip(rows, positions, strict=True):
            self._writable(r, p)
        tables = [r.blocks for r in rows]
        for g in groups:
            p = g.position
            for t in g.tables:
                self.cache.ensure_writable(t, p)
            tokens += g.last_tokens()
            positions += [p] * g.live()
            tables += g.tables
        valid = None
        if verify:
            valid = [True] * len(tokens)
            for g, (t, p, v) in verify:
                tokens += t.flatten().tolist()
                positions += p.flatten().tolist()
                valid += v.flatten().tolist()
                tables += [table for table in g.tables for _ in range(t.shape[1])]
            valid = torch.tensor(valid).unsqueeze(1)
        return self._contrasted(rows, self.model, torch.tensor(tokens).unsqueeze(1),
                                torch.tensor(positions).unsqueeze(1), self.cache, valid=valid,
                                block_tables=PagedKVCache.table_tensor(tables))

    def _contrasted(self, rows: list[Request], fn, *args, **kwargs) -> torch.Tensor:
        """``fn(*args, **kwargs)`` (a forward whose first ``len(rows)`` logits rows are ``rows``'), with the
        logits of contrastive rows replaced by their contrastive scores: the amateur's logits read at layer K
        of the same pass, or from a separate amateur model (one batched forward per amateur)."""
        contrastive = [(i, r) for i, r in enumerate(rows) if r.contrastive is not None]
        if not contrastive:
            return fn(*args, **kwargs)
        from .contrastive import contrastive_scores, step_trace

        want = {r.contrastive[0] for _, r in contrastive if isinstance(r.contrastive[0], int)}
        logits, early = fn(*args, exits=tuple(sorted(want)), **kwargs) if want else (fn(*args, **kwargs), {})
        separate: dict[int, tuple] = {}  # id(amateur) -> (amateur, [(i, r)])
        for i, r in contrastive:
            if not isinstance(r.contrastive[0], int):
                separate.setdefault(id(r.contrastive[0]), (r.contrastive[0], []))[1].append((i, r))
        amateur_logits = {}
        for amateur, members in separate.values():
            la = amateur.logits([r for _, r in members])
            amateur_logits.update({i: la[j: j + 1] for j, (i, _) in enumerate(members)})
        for i, r in contrastive:
            k, alpha, temp = r.contrastive
            la = early[k][i: i + 1] if isinstance(k, int) else amateur_logits[i]
            scores = contrastive_scores(logits[i: i + 1], la, alpha, temp)[0]
            if r.trace_contrastive:
                r.trace.append(step_trace(logits[i], la[0], scores, self._text_tokenizer()))
            logits[i] = scores
        return logits

    def _writable(self, r: Request, position: int) -> None:
        """Make ``position`` of ``r`` writable; a new or copied block counts against its reservation."""
        before = r.blocks[position // self.cache.block_size] if position // self.cache.block_size < len(r.blocks) \
            else None
        self.cache.ensure_writable(r.blocks, position)
        if r.blocks[position // self.cache.block_size] != before:
            r.allocated += 1

    def _outstanding(self) -> int:
        """Blocks the running requests and beam searches may still allocate (their reservations). A beam
        search's beams copy and drop blocks as they reorder, so its use is counted as the blocks it holds."""
        plain = sum(max(0, r.reserved - r.allocated) for r in self.running)
        plain += sum(max(0, r.reserved - r.allocated) for u in self.prefilling for r in u.members)
        return plain + sum(max(0, g.reserved - len({b for t in g.tables for b in t})) for g in self.groups)

    def _full_recompute_logits(self, rows: list[Request]) -> torch.Tensor:
        """No KV cache: run every sequence from its first token again (cost grows with length)."""
        seqs = [r.prompt_ids + r.output_ids for r in rows]
        tokens, valid = _pad(seqs)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self._contrasted(rows, self.model, tokens, positions, None, valid=valid)

    def _admit(self) -> list[Request]:
        """Move waiting requests, in order, into free rows while the KV pool can hold them to their end
        (reserving their blocks); reset their per-row state. A group (the n samples of a prompt) may be
        admitted over several steps: members admitted together share one prefill."""
        admitted: list[Request] = []
        new_groups: list = []
        if not self.waiting:
            return admitted, new_groups
        budget = self.cache.num_free() - self._outstanding() if self.cache is not None else 0
        leaders: dict[int, Request] = {}
        rows = len(self.running) + sum(g.W for g in self.groups) + sum(len(u.members) for u in self.prefilling)
        while self.waiting and rows < self.max_batch:
            r = self.waiting[0]
            if not isinstance(r, Request):  # a beam search: its width in rows, its worst case in blocks
                need = self._group_blocks(r)
                if rows + r.W > self.max_batch or need > budget:
                    break
                budget -= need
                r.reserved = need
                rows += r.W
                new_groups.append(self.waiting.popleft())
                continue
            rows += 1
            if self.cache is not None:
                # a sibling admitted with its leader shares the prompt's blocks; otherwise all are new
                shared = r.group != -1 and r.group in leaders
                need = self._worst_blocks(len(r.prompt_ids), r.params.max_tokens)
                need -= self.cache.blocks_for(len(r.prompt_ids)) - 1 if shared else 0
                if need > budget:
                    break
                budget -= need
                r.reserved, r.allocated = need, 0
                if r.group != -1:
                    leaders.setdefault(r.group, r)
            admitted.append(self.waiting.popleft())
        return admitted, new_groups

    def _activate(self, ready: list[Request], first_row: int) -> None:
        """Give requests whose prompt is in the cache their rows (from ``first_row``) and per-row state."""
        for i, r in enumerate(ready):
            r.slot = first_row + i
            self.mirostat_mu[r.slot] = 2.0 * r.params.mirostat_tau  # Mirostat's initial mu
            self._state[r.id] = (
                IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                StopStringMatcher(r.params.stop),
            )
        # their rows' token counts, in one go (a row per request would be n small ops)
        lo, hi = ready[0].slot, ready[-1].slot + 1
        self.output_counts[lo:hi].zero_()
        self.prompt_counts[lo:hi].zero_()
        rows = torch.cat([torch.full((len(r.prompt_ids),), r.slot) for r in ready])
        ids = torch.cat([torch.tensor(r.prompt_ids) for r in ready])
        if self.device.type != "cpu":  # made on the host, moved once
            rows, ids = rows.to(self.device), ids.to(self.device)
        self.prompt_counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def prefill_prompts(self, prompts: list[list[int]], upto: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """The first ``upto[i]`` tokens of each prompt into a new block table, in one ragged forward: the
        whole blocks the prefix cache holds are reused (never the block of the last token to compute, whose
        logits are wanted), the rest computed, the full blocks keyed for later reuse. Returns the tables and
        the logits after token ``upto[i] - 1`` of each row [R, V] (None when every prompt was cached whole)."""
        tables, starts = [], []
        for ids, n in zip(prompts, upto, strict=True):
            table = self.cache.match_prefix(ids, n - 1) if n else []
            starts.append(len(table) * self.cache.block_size)
            for p in range(starts[-1], n):
                self.cache.ensure_writable(table, p)
            tables.append(table)
        last = None
        if any(n > s for n, s in zip(upto, starts, strict=True)):
            tokens, valid = _pad([ids[s:n] or ids[:1] for ids, s, n in zip(prompts, starts, upto, strict=True)])
            valid &= torch.tensor([n > s for n, s in zip(upto, starts, strict=True)]).unsqueeze(1)
            positions = torch.arange(tokens.shape[1]).expand_as(tokens) + torch.tensor(starts).unsqueeze(1)
            last = self.model(tokens, positions, self.cache, valid=valid,
                              block_tables=PagedKVCache.table_tensor(tables))
        for ids, table, n in zip(prompts, tables, upto, strict=True):
            self.cache.register_prefix(ids, table, n)
        return tables, last

    def _prefill_groups(self, groups: list) -> None:
        """Prefill the prompts of newly admitted beam searches in one forward; each picks its first beams."""
        tables, last = self.prefill_prompts([g.prompt_ids for g in groups], [len(g.prompt_ids) for g in groups])
        for i, (g, table) in enumerate(zip(groups, tables, strict=True)):
            g.tables = [table]
            g.select(_host(last[i: i + 1]), self.cache, self._text_tokenizer())

    def _text_tokenizer(self):
        """The tokenizer, or None when the scheduler runs a bare model on token ids."""
        return None if getattr(self.tokenizer, "ids_only", False) else self.tokenizer

    def _choice_events(self, g) -> list[TokenEvent]:
        """A scored choice group: each sample's request becomes its pick (or is aborted)."""
        events = []
        if g.aborted:
            for r in g.requests:
                if not r.finished:
                    events.append(self._finish(r, "abort"))
            return events
        g.ranked, picks = g.picks()
        for r, i in zip(g.requests, picks, strict=True):
            r.output_ids = list(g.options[i])
            text = g.texts[i] if g.texts is not None else ""
            events.append(self._finish(r, "stop", text=text))
        return events

    def _group_events(self, g, reason: str | None) -> list[TokenEvent]:
        """A decided (or aborted) beam search: its visible requests become the ``n`` best hypotheses."""
        events = []
        hyps = g.result(self._text_tokenizer()).hypotheses
        for r, h in zip(g.requests, hyps + [None] * len(g.requests), strict=False):
            if h is not None and reason is None:
                r.output_ids, r.token_logprobs = list(h.token_ids), list(h.token_logprobs)
                r.text = h.text or ""
            r.finish_reason = reason or (h.finish_reason if h is not None else "stop")
            events.append(TokenEvent(r, None, r.text, finish_reason=r.finish_reason))
        return events

    def _prefill_step(self, chunked: bool) -> tuple[list[Request], torch.Tensor | None]:
        """Advance the prompts being prefilled by one ragged forward. A leader first takes the whole blocks
        of its prompt that the prefix cache holds (never the block of its last token, whose logits are
        needed), then computes the rest; while others are decoding (``chunked``) at most
        ``prefill_chunk`` prompt tokens are computed per step, oldest prompt first. Echo needs every
        prompt position's logits, and a run without a KV cache has nothing to resume from: those prompts go
        whole. Returns the requests whose prompt is now complete (a leader's samples share its blocks) and
        their next-token logits [R, V]."""
        budget = self.prefill_chunk if chunked else None
        chosen: list[tuple[_Prefill, int, int]] = []
        for u in self.prefilling:
            lead, L = u.leader, len(u.leader.prompt_ids)
            if u.done < 0:
                u.done = 0
                if self.use_cache and not lead.params.echo:
                    lead.blocks = self.cache.match_prefix(lead.prompt_ids, L - 1)
                    u.done = len(lead.blocks) * self.cache.block_size
            whole = budget is None or lead.params.echo or not self.use_cache
            take = L - u.done if whole else min(L - u.done, budget)
            if take < 1:
                break
            chosen.append((u, u.done, u.done + take))
            if budget is not None:
                budget -= take
                if budget <= 0:
                    break
        if not chosen:
            return [], None
        if self.use_cache:
            for u, a, b in chosen:
                for p in range(a, b):
                    self._writable(u.leader, p)
        tokens, valid = _pad([u.leader.prompt_ids[a:b] for u, a, b in chosen])
        starts = torch.tensor([a for _, a, _ in chosen]).unsqueeze(1)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens) + starts
        echo = any(u.leader.params.echo for u, _, _ in chosen)
        logits_at = "all" if echo else "last"
        kv = dict(cache=self.cache, block_tables=PagedKVCache.table_tensor([u.leader.blocks for u, _, _ in chosen])) \
            if self.use_cache else {}
        out = self.model(tokens, positions, valid=valid, logits_at=logits_at, **kv)
        if self.use_cache:
            for u, _, b in chosen:
                self.cache.register_prefix(u.leader.prompt_ids, u.leader.blocks, b)
        lengths = valid.sum(1)
        last = out[torch.arange(len(chosen), device=out.device), (lengths - 1).to(out.device)] if echo else out
        if any(u.leader.contrastive is not None for u, _, _ in chosen):
            # the contrastive rows' next-token scores: one more pass over their last tokens (cached now), with
            # the amateur read at layer K (the chunked prefill above computed the expert only)
            idx = [i for i, (u, _, _) in enumerate(chosen) if u.leader.contrastive is not None]
            leads = [chosen[i][0].leader for i in idx]
            ends = torch.tensor([chosen[i][2] - 1 for i in idx]).unsqueeze(1)
            toks = torch.tensor([[r.prompt_ids[e]] for r, e in zip(leads, ends.view(-1).tolist(), strict=True)])
            if self.use_cache:
                for r, e in zip(leads, ends.view(-1).tolist(), strict=True):
                    self._writable(r, e)  # (a copy first if that block is shared or cached)
                scored = self._contrasted(leads, self.model, toks, ends, cache=self.cache,
                                          block_tables=PagedKVCache.table_tensor([r.blocks for r in leads]))
            else:  # no cache: the whole prompt again
                seq_tokens, seq_valid = _pad([r.prompt_ids for r in leads])
                seq_pos = torch.arange(seq_tokens.shape[1]).expand_as(seq_tokens)
                scored = self._contrasted(leads, self.model, seq_tokens, seq_pos, valid=seq_valid)
            last = last.clone()
            last[torch.tensor(idx, device=last.device)] = scored
        ready: list[Request] = []
        rows: list[int] = []
        for i, (u, _, b) in enumerate(chosen):
            u.done = b
            if b < len(u.leader.prompt_ids):
                continue  # more chunks to come
            self.prefilling.remove(u)
            lead = u.leader
            if lead.params.echo:
                self._prompt_logprobs(lead, out[i, : lengths[i]])
            for r in u.members:
                if r is not lead:
                    if self.use_cache:
                        r.blocks = self.cache.share(lead.blocks)
                    if r.params.echo:
                        r.prompt_logprobs, r.prompt_top_logprobs = lead.prompt_logprobs, lead.prompt_top_logprobs
                    if r.trace_contrastive and lead.trace:
                        r.trace.append(lead.trace[-1])  # the first token is drawn from the shared scores
                ready.append(r)
                rows.append(i)
        return ready, (last[torch.tensor(rows, device=last.device)] if ready else None)

    def _prompt_logprobs(self, r: Request, logits: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
        ids = torch.tensor(r.prompt_ids, device=lp.device)
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
            texts = self.vocab_texts() if any(r.params.dry_multiplier > 0 for r in rows) else None
            self._batch = SamplingBatch.build(
                [r.params for r in rows], [r.seed for r in rows], self.vocab_size, self.eos_ids,
                device=self.device, token_texts=texts,
            )
            self._batch_key = key
        return self._batch

    def vocab_texts(self):
        """Every token id decoded on its own (ids past the tokenizer's vocabulary: ""), made once."""
        if self._token_texts is None:
            from ..sampling.history import TokenTexts

            n = min(self.vocab_size, self.tokenizer.vocab_size)
            backend = getattr(self.tokenizer, "backend", None)  # the `tokenizers` object: one batched call
            if backend is not None:
                texts = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
            else:
                texts = [self.tokenizer.decode([i]) for i in range(n)]
            self._token_texts = TokenTexts(list(texts) + [""] * (self.vocab_size - n))
        return self._token_texts

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
        """Release the blocks of finished requests (keying their full blocks, so a follow-up that
        repeats the conversation reuses them) and move live rows down into the holes."""
        live = [r for r in self.running if not r.finished]
        if len(live) == len(self.running):
            return
        for r in self.running:
            if r.finished:
                self._state.pop(r.id, None)
                if r.contrastive is not None and hasattr(r.contrastive[0], "release"):
                    r.contrastive[0].release(r)  # a separate amateur's blocks
                if self.cache is not None and r.blocks:
                    seq = r.prompt_ids + r.output_ids
                    self.cache.register_prefix(seq, r.blocks, len(seq) - 1)  # the last token was never fed
                    self.cache.release(r.blocks)
        for new_slot, r in enumerate(live):
            if r.slot != new_slot:
                self.output_counts[new_slot] = self.output_counts[r.slot]
                self.prompt_counts[new_slot] = self.prompt_counts[r.slot]
                self.mirostat_mu[new_slot] = self.mirostat_mu[r.slot]
                r.slot = new_slot
        self.running = live


class _IdsOnly:
    """What the scheduler needs of a tokenizer when a bare model runs on token ids (no text)."""

    ids_only = True  # results name paths by their token ids

    def __init__(self, eos):
        self.eos_token_ids = frozenset(eos)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def _units(admitted: list[Request]) -> list[_Prefill]:
    """Admitted requests -> prefills: the samples of one prompt admitted together share one."""
    units: list[_Prefill] = []
    for r in admitted:
        if units and r.group != -1 and r.group == units[-1].leader.group:
            units[-1].members.append(r)
        else:
            units.append(_Prefill([r]))
    return units


def _cancelled(item) -> bool:
    """A request, or a beam search whose client cancelled any of its hypotheses."""
    if isinstance(item, Request):
        return item.cancelled
    return any(r.cancelled for r in item.requests)


def _pad(seqs: list[list[int]], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into tokens [B, T] (padding ``fill``) and a validity mask [B, T]."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), fill, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        valid[i, : len(s)] = True
    return tokens, valid


def _device_of(model) -> torch.device:
    """The model's device (a Transformer's ``device``; the host for anything that does not say)."""
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


def _host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host (the beam search picks its beams there)."""
    return t if t.device.type == "cpu" else t.to("cpu")


def _to_host(out) -> tuple[list, list, list | None, list | None, list]:
    """A device SamplerOutput's tokens, logprobs, top ids and logprobs, and failed flags as Python lists, in
    ONE device-to-host copy: every column as float64 (token ids < 2^53 and float32 logprobs are exact
    there), converted back to the types ``tolist()`` of each tensor gives."""
    B = out.tokens.shape[0]
    cols = [out.tokens.view(B, 1), out.logprobs.view(B, 1), out.failed.view(B, 1)]
    n = out.top_ids.shape[1] if out.top_ids is not None else 0
    if out.top_ids is not None:
        cols += [out.top_ids, out.top_logprobs]
    rows = torch.cat([c.to(torch.float64) for c in cols], dim=1).to("cpu").tolist()
    tokens = [int(r[0]) for r in rows]
    logprobs = [r[1] for r in rows]
    failed = [bool(r[2]) for r in rows]
    top_ids = [[int(v) for v in r[3: 3 + n]] for r in rows] if out.top_ids is not None else None
    top_lps = [r[3 + n: 3 + 2 * n] for r in rows] if out.top_ids is not None else None
    return tokens, logprobs, top_ids, top_lps, failed
