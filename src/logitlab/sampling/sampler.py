"""The one sampling pipeline. Every decoding path (CLI, API, server, beam, speculative) goes through it.

Fixed order, per step, for all rows at once (each row with its own parameters, as ``[B]`` tensors):

    0. sanitize         NaN -> -inf (raw log-probabilities are taken here)
    1. mask             allowed / banned token ids; EOS ids while fewer than min_tokens are generated
    2. logit bias       l += bias
    3. penalties        repetition (CTRL, x) -> frequency/presence (OpenAI, +) -> temperature penalty
                        (seed 000, per-token temperature on the shifted logits) -> DRY -> no-repeat n-gram
                        ban (these two read each row's token ``history``, ``history.py``)
       (+inf)           a row holding +inf logits keeps only those tokens, equally likely
       (failed)         a row with no finite logit left is marked ``failed``
    4. temperature      l / T, or dynamic temperature (T scaled within T +- dynatemp_range by the
                        normalised entropy); T = 0 rows are greedy: one-hot at the argmax of the logits
                        after 1-3 (ties -> lowest id); truncation does not apply to them
    5. truncation       top-n-sigma -> top-k -> top-p -> min-p -> typical -> epsilon -> eta -> XTC, each
                        on the distribution the previous steps left, renormalised. XTC fires with
                        probability xtc_probability, from the uniform hash(seed, num_generated, XTC_STREAM).
                        Rows with Mirostat on use Mirostat INSTEAD of all of these (as llama.cpp, whose
                        Mirostat chain is temperature -> mirostat), with their ``mirostat_mu`` state
    6. draw             inverse CDF of the final distribution at a per-request uniform
                        u = hash(seed, num_generated) (``rng.py``): float64 cumsum + searchsorted;
                        Mirostat rows then update mu from the surprise of the drawn token

Stages no row needs are skipped entirely (``SamplingBatch.uses``); rows whose knob is off pass through
a stage unchanged. Nothing loops over rows or the vocabulary in Python, except ``SamplingBatch.build``
(once per batch composition) and the conversion of the explainer trace to Python at the end. (DRY loops
over match length and no-repeat-ngram over the batch's distinct n: see ``history.py``.)

Cost (see ``bench_sampler``): no full sort unless unavoidable.
* top-k: one ``topk`` (processors.py: a native kernel on the CPU) with the batch's largest k. When
  every sampled row uses top-k (k <= 4096), the pipeline continues on those ``[B, K]`` candidates only
  ("compact path": temperature, top-p, ..., the draw), kept in token-id order so that a uniform picks
  exactly the token it would pick over the whole row; ``process`` scatters the result back to
  ``[B, V]``. A tie at some row's k-th value (rare with real logits) sends the step down the full
  path, which resolves it by token id.
* top-p and typical look only at the rows that use them, through ``topk(256)``, then ``topk(4096)``,
  and sort the row only when those candidates do not yet hold the required mass (exactly the sort's
  result either way). min-p, epsilon and eta need no ordering at all.
* greedy: an all-greedy batch stops at the argmax (one candidate column per row: no softmax, no draw);
  the raw logprob is the logit minus the row's log-sum-exp, no [B, V] log-softmax unless alternatives
  are asked for.
* Seeded draws: one float64 cumsum + searchsorted per row, no ``torch.multinomial``.

Devices: the pipeline runs where the logits are. ``SamplingBatch.build(device=...)`` puts the per-row
tensors there (built on the host, moved once per batch composition); counters (``num_generated``) may
come from the host; the uniforms are always hashed on the host (``rng.py``) and moved, so a seeded row
draws the same numbers on a GPU as on the CPU. Every tensor made here names its device.

Logprobs: ``raw`` = log_softmax of the model's logits (after step 0), ``processed`` = log of the final
distribution the token was drawn from (greedy rows: 0 for the argmax). Both are returned; each row's
``logprobs_mode`` picks the one in ``SamplerOutput.logprobs`` / ``top_logprobs``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from . import history as H
from . import mirostat as M
from . import processors as P
from .params import SamplingParams
from .rng import canonical_seed
from .rng import uniforms as rng_uniforms

NEG_INF = float("-inf")
TRUNCATION = ("top_n_sigma", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "xtc_probability")
_TRUNCATION_OFF = {"top_n_sigma": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0,
                   "eta": 0.0, "xtc_probability": 0.0}
XTC_STREAM = 21  # the RNG stream of XTC's coin (0: the draw; 11-13: speculative decoding)


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors, built ONCE per batch composition (``build``).

    ``uses`` names the stages at least one row needs; the others are skipped. Greedy rows (T = 0) have
    their truncation knobs (and dynamic temperature, and Mirostat) set to "off" here, since they cannot
    change an argmax. Mirostat rows have their truncation knobs and dynamic temperature off: Mirostat
    replaces them (llama.cpp builds its Mirostat chain from plain temperature and Mirostat alone)."""

    temperature: torch.Tensor  # [B] float32 (0 for greedy rows)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long
    top_p: torch.Tensor  # [B] float64 (thresholds compare in float64)
    min_p: torch.Tensor
    typical_p: torch.Tensor
    epsilon: torch.Tensor
    eta: torch.Tensor
    repetition_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    temperature_frequency_penalty: torch.Tensor
    temperature_presence_penalty: torch.Tensor
    penalize_prompt: torch.Tensor  # [B] bool
    min_tokens: torch.Tensor  # [B] long
    processed_logprobs: torch.Tensor  # [B] bool: row wants logprobs of the processed distribution
    seeds: torch.Tensor  # [B] long, 63-bit
    top_n_sigma: torch.Tensor  # [B] float64
    xtc_probability: torch.Tensor  # [B] float64 (0 for greedy and Mirostat rows)
    xtc_threshold: torch.Tensor  # [B] float64
    dynatemp_range: torch.Tensor  # [B] float32
    dynatemp_exponent: torch.Tensor  # [B] float32
    mirostat: torch.Tensor  # [B] long: 0 off, 1, 2
    mirostat_tau: torch.Tensor  # [B] float64
    mirostat_eta: torch.Tensor  # [B] float64
    dry_multiplier: torch.Tensor  # [B] float64
    dry_base: torch.Tensor  # [B] float64
    dry_allowed_length: torch.Tensor  # [B] long
    dry_penalty_last_n: torch.Tensor  # [B] long
    no_repeat_ngram_size: torch.Tensor  # [B] long
    dry_breakers: torch.Tensor | None  # [B, V] bool, only when some row uses DRY with breakers
    eos_ids: torch.Tensor  # [E] long
    eos_mask: torch.Tensor  # [V] bool
    bias: torch.Tensor | None  # [B, V] float32, only when some row has a logit_bias
    allowed: torch.Tensor | None  # [B, V] bool, only when some row has allowed_token_ids
    banned: torch.Tensor | None  # [B, V] bool, only when some row has banned_token_ids
    uses: frozenset  # names of the stages some row needs
    vocab_size: int = 0
    compact_k: int = 0  # > 0: every sampled row uses top-k <= compact_k, so the compact path applies
    fused: torch.Tensor | None = None  # [B] bool on the host: rows that only use temperature and top-p
    # [B] long on the host when the batch lives on another device: the uniforms are hashed there (rng.py)
    host_seeds: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], vocab_size: int, eos_token_ids=(),
              device="cpu", token_texts=None) -> SamplingBatch:
        """Tensors for rows ``params[i]`` drawing with ``seeds[i]`` (validated params assumed), on ``device``
        (the logits'), made on the host and moved once per batch composition.
        ``token_texts[i]``, token i decoded alone (a list, or a ``history.TokenTexts`` that caches the look-
        ups), resolves DRY's sequence breakers to token ids; without it DRY runs without breakers."""
        if len(seeds) != len(params):
            raise ValueError(f"{len(params)} rows of params but {len(seeds)} seeds")
        B, V = len(params), vocab_size

        def col(values, dtype):
            return torch.tensor(list(values), dtype=dtype, device=device)

        greedy_rows = [p.temperature == 0 for p in params]
        miro_rows = [p.mirostat != 0 and not g for p, g in zip(params, greedy_rows, strict=True)]
        # rows where the truncation knobs act: not greedy, not replaced by Mirostat
        trunc_rows = [not (g or m) for g, m in zip(greedy_rows, miro_rows, strict=True)]

        def knob(name, dtype):  # truncation knob, off for greedy and Mirostat rows
            return col((getattr(p, name) if on else _TRUNCATION_OFF[name] for p, on in zip(params, trunc_rows,
                                                                                         strict=True)), dtype)

        bias = allowed = banned = breakers = None
        if any(p.logit_bias for p in params):
            rows, ids, vals = _triples(((i, int(t), float(v)) for i, p in enumerate(params)
                                        for t, v in (p.logit_bias or {}).items()), device)
            bias = torch.zeros(B, V, device=device)
            bias[rows, ids] = torch.tensor(vals, device=device)
        if any(p.allowed_token_ids is not None for p in params):
            restricted = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
            allowed = torch.ones(B, V, dtype=torch.bool, device=device)
            allowed[restricted] = False
            rows, ids, _ = _triples(((i, int(t), 0) for i in restricted for t in params[i].allowed_token_ids), device)
            allowed[rows, ids] = True
        if any(p.banned_token_ids for p in params):
            banned = torch.zeros(B, V, dtype=torch.bool, device=device)
            rows, ids, _ = _triples(((i, int(t), 0) for i, p in enumerate(params)
                                     for t in p.banned_token_ids or ()), device)
            banned[rows, ids] = True
        dry_rows = [p.dry_multiplier > 0 and p.dry_penalty_last_n != 0 for p in params]
        if token_texts is not None and any(on and p.dry_sequence_breakers for p, on in zip(params, dry_rows,
                                                                                           strict=True)):
            texts = token_texts if isinstance(token_texts, H.TokenTexts) else H.TokenTexts(token_texts)
            breakers = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, p in enumerate(params):
                ids = texts.breaker_ids(tuple(p.dry_sequence_breakers)) if dry_rows[i] else ()
                if ids:
                    breakers[i, torch.tensor(ids, dtype=torch.long, device=device)] = True
        eos = sorted({int(t) for t in eos_token_ids})
        eos_mask = torch.zeros(V, dtype=torch.bool, device=device)
        if eos:
            eos_mask[torch.tensor(eos, dtype=torch.long, device=device)] = True

        uses = set()
        if allowed is not None or banned is not None:
            uses.add("mask")
        if eos and any(p.min_tokens > 0 for p in params):
            uses.add("min_tokens")
        if bias is not None:
            uses.add("logit_bias")
        if any(p.repetition_penalty != 1.0 for p in params):
            uses.add("repetition_penalty")
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            uses.add("frequency_presence")
        if any(p.temperature_frequency_penalty or p.temperature_presence_penalty for p in params):
            uses.add("temperature_penalty")
        if any(dry_rows):
            uses.add("dry")
        if any(p.no_repeat_ngram_size > 0 for p in params):
            uses.add("no_repeat_ngram")
        if any(greedy_rows):
            uses.add("greedy")
        if any(p.temperature not in (0, 1) for p in params):
            uses.add("temperature")
        dynatemp = [p.dynatemp_range if on else 0.0 for p, on in zip(params, trunc_rows, strict=True)]
        if any(dynatemp):
            uses.add("dynatemp")
        if any(miro_rows):
            uses.add("mirostat")
        active = {"top_k": lambda p: 0 < p.top_k < V,  # top_k >= V keeps everything: off too
                  "xtc_probability": lambda p: p.xtc_probability > 0 and p.xtc_threshold <= 0.5}
        for name in TRUNCATION:
            on = active.get(name, lambda p, name=name: getattr(p, name) != _TRUNCATION_OFF[name])
            if any(on(p) and t for p, t in zip(params, trunc_rows, strict=True)):
                uses.add(name)

        # The compact path (see _pipeline): every row that samples uses top-k, and the largest k is small.
        # Dynamic temperature needs the entropy of the whole row, so it rules the compact path out.
        sampled_k = [p.top_k if t else 0 for p, g, t in zip(params, greedy_rows, trunc_rows, strict=True) if not g]
        compact_k = max(sampled_k) if sampled_k and all(0 < k < V for k in sampled_k) else 0
        if compact_k > P.PREFIX_GUESSES[-1] or "dynatemp" in uses:
            compact_k = 0

        fused = [_fusable(p, V, bool(eos)) for p in params]
        f32, f64 = torch.float32, torch.float64
        return cls(
            fused=torch.tensor(fused, dtype=torch.bool) if any(fused) else None,
            temperature=col((p.temperature for p in params), f32),
            greedy=col(greedy_rows, torch.bool),
            top_k=knob("top_k", torch.long), top_p=knob("top_p", f64), min_p=knob("min_p", f64),
            typical_p=knob("typical_p", f64), epsilon=knob("epsilon", f64), eta=knob("eta", f64),
            repetition_penalty=col((p.repetition_penalty for p in params), f32),
            frequency_penalty=col((p.frequency_penalty for p in params), f32),
            presence_penalty=col((p.presence_penalty for p in params), f32),
            temperature_frequency_penalty=col((p.temperature_frequency_penalty for p in params), f32),
            temperature_presence_penalty=col((p.temperature_presence_penalty for p in params), f32),
            penalize_prompt=col((p.penalize_prompt for p in params), torch.bool),
            min_tokens=col((p.min_tokens for p in params), torch.long),
            processed_logprobs=col((p.logprobs_mode == "processed" for p in params), torch.bool),
            seeds=col((canonical_seed(s) for s in seeds), torch.long),
            top_n_sigma=knob("top_n_sigma", f64), xtc_probability=knob("xtc_probability", f64),
            xtc_threshold=col((p.xtc_threshold for p in params), f64),
            dynatemp_range=col(dynatemp, f32), dynatemp_exponent=col((p.dynatemp_exponent for p in params), f32),
            mirostat=col((p.mirostat if m else 0 for p, m in zip(params, miro_rows, strict=True)), torch.long),
            mirostat_tau=col((p.mirostat_tau for p in params), f64),
            mirostat_eta=col((p.mirostat_eta for p in params), f64),
            dry_multiplier=col((p.dry_multiplier if on else 0.0 for p, on in zip(params, dry_rows, strict=True)),
                               f64),
            dry_base=col((p.dry_base for p in params), f64),
            dry_allowed_length=col((p.dry_allowed_length for p in params), torch.long),
            dry_penalty_last_n=col((p.dry_penalty_last_n for p in params), torch.long),
            no_repeat_ngram_size=col((p.no_repeat_ngram_size for p in params), torch.long),
            dry_breakers=breakers,
            eos_ids=col(eos, torch.long), eos_mask=eos_mask,
            bias=bias, allowed=allowed, banned=banned, uses=frozenset(uses), vocab_size=V,
            compact_k=compact_k,
            host_seeds=None if torch.device(device).type == "cpu"
            else torch.tensor([canonical_seed(s) for s in seeds], dtype=torch.long, device="cpu"),
        )

    def __len__(self) -> int:
        return self.temperature.shape[0]


def _fusable(p: SamplingParams, V: int, has_eos: bool) -> bool:
    """Whether a row's pipeline is only temperature (> 0) and top-p, the request most clients send: those
    rows are sampled by the fused native kernel (``native.sample_top_p``), whatever their neighbours."""
    off = {name: getattr(p, name) == value for name, value in _TRUNCATION_OFF.items()}
    return (p.temperature > 0 and p.mirostat == 0 and not p.dynatemp_range and not p.explain
            and all(ok for name, ok in off.items() if name not in ("top_p", "top_k", "xtc_probability"))
            and (p.top_k == 0 or p.top_k >= V) and (p.xtc_probability == 0 or p.xtc_threshold > 0.5)
            and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
            and not p.temperature_frequency_penalty and not p.temperature_presence_penalty
            and not (p.dry_multiplier > 0 and p.dry_penalty_last_n != 0) and p.no_repeat_ngram_size == 0
            and not p.logit_bias and p.allowed_token_ids is None and not p.banned_token_ids
            and not (has_eos and p.min_tokens > 0))


def _triples(items, device="cpu") -> tuple[torch.Tensor, torch.Tensor, list]:
    """(row, token, value) triples -> (rows, tokens) index tensors on ``device`` and the values, for one
    index_put."""
    rows, ids, vals = [], [], []
    for r, t, v in items:
        rows.append(r)
        ids.append(t)
        vals.append(v)
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(ids, dtype=torch.long, device=device), vals


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] long, always a valid id
    logprobs: torch.Tensor  # [B] float32, of the chosen token, in each row's logprobs mode
    raw_logprobs: torch.Tensor  # [B] the model's own log-softmax
    processed_logprobs: torch.Tensor  # [B] log of the distribution actually sampled
    top_ids: torch.Tensor | None  # [B, N] long, in each row's mode (None when num_logprobs = 0)
    top_logprobs: torch.Tensor | None  # [B, N] float32
    failed: torch.Tensor  # [B] bool: no token was left (or the logits were all NaN / -inf)
    trace: list[list[dict]] | None = None  # per row: stage dicts, then the final dict
    mirostat_mu: torch.Tensor | None = None  # [B] float64: Mirostat's mu after this token (None: unused)


class _Tracer:
    """Per-stage statistics for the explainer, kept as tensors over the batch until the end."""

    def __init__(self, enabled: bool):
        self.enabled, self.stages = enabled, []

    def __call__(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        if not self.enabled:
            return
        prev = torch.softmax(before, -1).nan_to_num(0.0)
        removed = torch.isfinite(before) & ~torch.isfinite(after)
        self.stages.append((name, torch.isfinite(after).sum(-1), (prev * removed).sum(-1)))


def _resolve_posinf(x: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Rows holding +inf keep only their +inf tokens, equally likely (as logits 0); others unchanged."""
    rows = torch.isposinf(row_max).unsqueeze(-1)
    only = torch.where(torch.isposinf(x), 0.0, NEG_INF)
    return torch.where(rows, only, x)


def _counts(b: SamplingBatch, output_counts, prompt_counts, like: torch.Tensor):
    """(counts for frequency/presence and temperature penalties, seen mask for repetition)."""
    out = output_counts if output_counts is not None else torch.zeros_like(like, dtype=torch.int32)
    counts = out
    if prompt_counts is not None and bool(b.penalize_prompt.any()):
        counts = out + prompt_counts * b.penalize_prompt.unsqueeze(-1)
    seen = out > 0
    if prompt_counts is not None:
        seen = seen | (prompt_counts > 0)
    return counts, seen


class _Raw:
    """The model's own distribution (step 0), as its logits and their per-row log-sum-exp: a token's raw
    log-probability is ``x[t] - lse``, and no [B, V] log-softmax is written unless top alternatives are
    asked for (``full``). ``empty`` [B] bool marks rows without a finite logit (None: none): -inf there."""

    def __init__(self, x: torch.Tensor, empty: torch.Tensor | None):
        self.x, self.empty = x, empty
        m = x.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0) if empty is not None else m
        self.lse = (x - m).exp_().sum(-1, keepdim=True).log_().add_(m)  # [B, 1]

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        lp = self.x.gather(-1, tokens.unsqueeze(-1)).sub_(self.lse).squeeze(-1)
        return lp if self.empty is None else lp.masked_fill(self.empty, NEG_INF)

    def full(self) -> torch.Tensor:
        lp = self.x - self.lse
        return lp if self.empty is None else lp.masked_fill(self.empty.unsqueeze(-1), NEG_INF)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of ``x [B, V]``: the first index of each row's maximum (no NaN in ``x``). On the CPU
    the native top-1 (one vectorised pass, ties to the lowest id, ~10 us for 49,152 logits), where torch's
    argmax walks the row element by element (~85 us)."""
    return P.topk(x, 1)[1].squeeze(-1) if P.native_topk(x, 1) else x.argmax(-1)


@dataclass
class _Final:
    """The final distribution as unnormalised logits ``x`` (-inf where removed), over the whole vocabulary
    (``ids`` None) or over compact candidate columns ``ids [B, K]`` in token-id order (after top-k, or
    greedy's one column; a column repeating an id is -inf).
    Failed rows hold zeros in ``x`` (finite arithmetic) and are reported all -inf."""

    x: torch.Tensor  # [B, V] or [B, K]
    ids: torch.Tensor | None
    failed: torch.Tensor  # [B] bool
    any_failed: bool
    vocab_size: int
    mirostat_mu: torch.Tensor | None = None  # [B] the mu Mirostat rows truncated with (None: no such row)

    def logprobs(self) -> torch.Tensor:
        """[B, V] normalised log-probabilities (what ``process`` returns)."""
        lp = torch.log_softmax(self.x, -1)
        if self.ids is not None:
            full = lp.new_full((lp.shape[0], self.vocab_size), NEG_INF)
            lp = full.scatter_reduce_(-1, self.ids, lp, reduce="amax")
        return lp.masked_fill(self.failed.unsqueeze(-1), NEG_INF) if self.any_failed else lp

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        return columns if self.ids is None else self.ids.gather(-1, columns.unsqueeze(-1)).squeeze(-1)


def _row_uniforms(b: SamplingBatch, counters: torch.Tensor, host_counters: torch.Tensor | None,
                  stream: int = 0) -> torch.Tensor:
    """The rows' uniforms ``hash(seed, counter, stream)`` on the batch's device. A batch on another device
    hashes on the host (its ``host_seeds``, the counters as the caller made them) and moves the [B]
    result: the same numbers as on the CPU, and no copy back to the host."""
    if b.host_seeds is None:
        return rng_uniforms(b.seeds, counters, stream=stream)
    host = host_counters if host_counters is not None else counters.to("cpu")
    return rng_uniforms(b.host_seeds, host, stream=stream).to(b.seeds.device)


def _counters(num_generated: torch.Tensor | None, B: int, device: torch.device):
    """(the rows' counters on ``device``, the caller's host tensor when it made them on the host, else None)."""
    if num_generated is None:
        return torch.zeros(B, dtype=torch.long, device=device), None
    if num_generated.device != device:  # made on the host for logits on a device: moved once, kept for hashing
        return num_generated.to(device), num_generated
    return num_generated, None


def _pipeline(logits: torch.Tensor, b: SamplingBatch, output_counts, prompt_counts, num_generated,
              tracer: _Tracer, want_raw: bool = True, history=None, mirostat_mu=None, host_counters=None):
    """Steps 0-5. Returns (final distribution, the raw distribution (``_Raw``) or None, failed [B])."""
    if logits.dim() != 2 or logits.shape[0] != len(b):
        raise ValueError(f"logits must be [B={len(b)}, V], got {tuple(logits.shape)}")
    B, V = logits.shape
    if num_generated is not None and num_generated.device != logits.device:
        num_generated, host_counters = _counters(num_generated, B, logits.device)
    x = logits.float().nan_to_num(nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)  # a new tensor
    raw = None
    if want_raw:
        raw_max = x.amax(-1)
        special = bool(torch.isinf(raw_max).any())  # rare: +inf logits, or rows without a finite logit
        raw = _Raw(_resolve_posinf(x, raw_max) if special else x, torch.isneginf(raw_max) if special else None)
    if num_generated is None:
        num_generated = torch.zeros(B, dtype=torch.long, device=x.device)

    def stage(name, fn):
        nonlocal x
        y = fn(x)
        tracer(name, x, y)
        x = y

    u = b.uses
    if "mask" in u:
        stage("allowed/banned", lambda v: P.mask_tokens(v, b.allowed, b.banned))
    if "min_tokens" in u:
        stage("min_tokens", lambda v: P.mask_eos(v, b.eos_mask, num_generated, b.min_tokens))
    if "logit_bias" in u:
        stage("logit_bias", lambda v: P.logit_bias(v, b.bias))
    if {"repetition_penalty", "frequency_presence", "temperature_penalty"} & u:
        counts, seen = _counts(b, output_counts, prompt_counts, x)
        if "repetition_penalty" in u:
            stage("repetition", lambda v: P.repetition_penalty(v, seen, b.repetition_penalty))
        if "frequency_presence" in u:
            stage("freq/presence",
                  lambda v: P.frequency_presence_penalty(v, counts, b.frequency_penalty, b.presence_penalty))
        if "temperature_penalty" in u:
            stage("temp_penalty", lambda v: P.temperature_penalty(
                v, counts, b.temperature_frequency_penalty, b.temperature_presence_penalty))
    if history is not None:  # without a history nothing has been repeated yet
        if "dry" in u:
            stage("dry", lambda v: H.dry(v, history, b.dry_breakers, b.dry_multiplier, b.dry_base,
                                         b.dry_allowed_length, b.dry_penalty_last_n))
        if "no_repeat_ngram" in u:
            stage("no_repeat_ngram", lambda v: H.no_repeat_ngram(v, history, b.no_repeat_ngram_size))

    row_max = x.amax(-1)
    failed = torch.isneginf(row_max)  # NaN is gone, so max = -inf <=> no finite logit left
    any_failed = False
    if bool(torch.isinf(row_max).any()):  # rare: one check for both kinds
        x = _resolve_posinf(x, row_max)
        any_failed = bool(failed.any())
        if any_failed:  # keep the arithmetic finite; these rows come out as all -inf
            x = x.masked_fill(failed.unsqueeze(-1), 0.0)
    argmax = first_argmax(x) if "greedy" in u else None  # greedy: argmax of the processed logits
    if argmax is not None and not tracer.enabled and "mirostat" not in u and bool(b.greedy.all()):
        # Every row greedy: the final distribution is the one-hot at the argmax, kept in the compact form
        # as one candidate column per row (what the one-hot below amounts to, without [B, V] of work).
        return _Final(torch.zeros(B, 1, device=x.device), argmax.unsqueeze(-1), failed, any_failed, V), raw, failed

    ids = None
    K = 0 if tracer.enabled or b.vocab_size != V else b.compact_k
    if K:
        # Compact path: top-k first (it commutes with temperature), then everything else on [B, K] columns
        # put back in token-id order, so that a uniform picks the same token as over the whole row.
        # Top-n-sigma needs the whole row's sigma; its kept set is a prefix of the sorted order that does
        # not depend on the temperature, so applying it before top-k gives the same result.
        if "top_n_sigma" in u:
            x = P.top_n_sigma(x, b.top_n_sigma)
        vals, cand = P.topk(x, K + 1)  # K < V
        k = torch.where(b.greedy, torch.full_like(b.top_k, K), b.top_k).unsqueeze(-1)
        kth, nxt = vals.gather(-1, k - 1), vals.gather(-1, k)
        if bool(((kth == nxt) & torch.isfinite(kth) & ~b.greedy.unsqueeze(-1)).any()):
            K = 0  # a tie at some row's k-th value: the full path resolves it by token id
        else:
            vals, cand = vals[:, :K], cand[:, :K]
            beyond = torch.arange(K, device=x.device) >= b.top_k.unsqueeze(-1)
            vals = vals.masked_fill(beyond & ~b.greedy.unsqueeze(-1), NEG_INF)
            ids, perm = cand.sort(-1)
            x = vals.gather(-1, perm)
    if "dynatemp" in u:
        stage("temperature", lambda v: P.dynamic_temperature(v, b.temperature, b.dynatemp_range,
                                                             b.dynatemp_exponent))
    elif "temperature" in u:
        stage("temperature", lambda v: P.temperature(v, b.temperature))
    for name, fn in (("top_n_sigma", P.top_n_sigma), ("top_k", P.top_k), ("top_p", P.top_p), ("min_p", P.min_p),
                     ("typical_p", P.typical), ("epsilon", P.epsilon), ("eta", P.eta)):
        if name in u and not (name in ("top_k", "top_n_sigma") and ids is not None):
            param = getattr(b, name)
            stage(name, lambda v, fn=fn, param=param: fn(v, param))
    if "xtc_probability" in u:
        fire = _row_uniforms(b, num_generated, host_counters, XTC_STREAM) < b.xtc_probability
        stage("xtc", lambda v: P.xtc(v, fire, b.xtc_threshold))
    mu = None
    if "mirostat" in u:
        mu = M.initial_mu(b.mirostat_tau) if mirostat_mu is None else mirostat_mu.double()
        stage("mirostat", lambda v: M.mirostat(v, b.mirostat, mu, V))
    if argmax is not None:
        g = b.greedy.unsqueeze(-1)
        if ids is None:
            if bool(b.greedy.all()):
                stage("greedy", lambda v: _onehot(v, argmax))
            else:
                stage("greedy", lambda v: torch.where(g, _onehot(v, argmax), v))
        else:  # one-hot in the compact form: the argmax in every column, 0 in the first, -inf elsewhere
            ids = torch.where(g, argmax.unsqueeze(-1).expand_as(ids), ids)
            x = torch.where(g, _onehot(x, torch.zeros_like(argmax)), x)

    return _Final(x, ids, failed, any_failed, V, mu), raw, failed


def _onehot(like: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """0 at ``columns[b]`` of each row, -inf elsewhere."""
    return torch.full_like(like, NEG_INF).scatter(-1, columns.unsqueeze(-1), 0.0)


def process(logits: torch.Tensor, batch: SamplingBatch, output_counts: torch.Tensor | None = None,
            prompt_counts: torch.Tensor | None = None,
            num_generated: torch.Tensor | None = None, history: torch.Tensor | None = None,
            mirostat_mu: torch.Tensor | None = None) -> torch.Tensor:
    """The final normalised log-probabilities ``[B, V]`` the pipeline samples from: -inf where removed,
    greedy rows one-hot at their argmax (0 there), failed rows all -inf. Used by speculative decoding,
    beam search and the distribution views; ``draw(process(...), u)`` is what ``sample`` does (XTC's coin
    is a function of (seed, num_generated) too, so both see the same one). ``history`` and
    ``mirostat_mu`` as in ``sample``."""
    final, _, _ = _pipeline(logits, batch, output_counts, prompt_counts, num_generated, _Tracer(False),
                            want_raw=False, history=history, mirostat_mu=mirostat_mu)
    return final.logprobs()


DRAW_BLOCK = 256


def draw(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one uniform in [0, 1) per row: the first column whose cumulative mass (float64)
    exceeds u * total. ``logprobs`` [B, C] need not be normalised; NaN counts as -inf, +inf as the
    largest float. Only a column with positive probability is returned; a row with no mass returns 0."""
    lp = logprobs.nan_to_num(nan=NEG_INF, neginf=NEG_INF)  # +inf -> the dtype's max
    return _draw(torch.softmax(lp, dim=-1).nan_to_num_(0.0), uniforms)  # softmax: fast with -inf


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of non-negative ``probs [B, C]`` in two levels: the cumulative sum (float64) of the
    sums of blocks of DRAW_BLOCK columns picks the block, the cumulative sum (float64) inside that block
    picks the column -- the column one flat float64 cumsum would pick, up to rounding at a boundary, and
    without any [B, C] float64 tensor. (Block sums are float32 cascade sums: relative error ~1e-7, the
    precision of the float32 probabilities themselves; a flat float32 cumsum would drift by ~C * 6e-8.)"""
    B, C = probs.shape
    S = min(DRAW_BLOCK, C)
    nb = -(-C // S)
    if nb * S != C:
        probs = torch.nn.functional.pad(probs, (0, nb * S - C))
    blocks = probs.reshape(B, nb, S)
    bcdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [B, nb]
    target = u.to(probs.device, torch.float64).reshape(B, 1) * bcdf[:, -1:]
    bi = torch.searchsorted(bcdf, target, right=True)  # [B, 1]: first block whose cumulative mass > target
    bi = torch.where(bi >= nb, bcdf.argmax(-1, keepdim=True), bi)  # u * total rounded up: last block w/ mass
    before = torch.where(bi > 0, bcdf.gather(-1, (bi - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, bi.unsqueeze(-1).expand(B, 1, S)).squeeze(1).to(torch.float64).cumsum(-1)
    j = torch.searchsorted(inner, target - before, right=True)
    j = torch.where(j >= S, inner.argmax(-1, keepdim=True), j)  # rounding: the block's last column w/ mass
    return (bi * S + j).squeeze(-1)


def sample(logits: torch.Tensor, batch: SamplingBatch, *, output_counts: torch.Tensor | None = None,
           prompt_counts: torch.Tensor | None = None, num_generated: torch.Tensor | None = None,
           num_logprobs: int = 0, explain: bool = False,
           uniforms: torch.Tensor | None = None, history: torch.Tensor | None = None,
           mirostat_mu: torch.Tensor | None = None) -> SamplerOutput:
    """Run the pipeline on ``logits [B, V]`` and draw one token per row.

    ``output_counts`` / ``prompt_counts`` ``[B, V]`` (integers) count each row's generated / prompt tokens
    (penalties); ``num_generated`` ``[B]`` is the number of tokens each row generated so far (min_tokens,
    and the RNG counter). ``uniforms`` overrides the per-row uniforms (tests, drivers with own streams).
    ``num_logprobs``: N top alternatives per row in its logprobs mode. ``explain``: per-stage trace.
    ``history`` ``[B, T]`` long: each row's prompt + generated tokens from column 0, padded with -1 (DRY and
    no_repeat_ngram_size; without it they see nothing repeated). ``mirostat_mu`` ``[B]``: each Mirostat
    row's state (None: the initial 2 tau); the updated state is ``SamplerOutput.mirostat_mu``."""
    B, V = logits.shape
    num_generated, host_counters = _counters(num_generated, B, logits.device)
    u = None  # the rows' uniforms, made when a draw needs them
    if batch.fused is not None:
        u = _uniforms(batch, num_generated, host_counters, uniforms, logits.device)
    fused = _sample_fused(logits, batch, u)
    if fused is not None and fused[0] is None and not num_logprobs and not explain:
        # every row fused and nothing else asked for (no alternatives, no trace): the kernel's result is whole
        return replace(fused[1], mirostat_mu=mirostat_mu)
    tracer = _Tracer(explain)
    final, raw, failed = _pipeline(logits, batch, output_counts, prompt_counts, num_generated, tracer,
                                   history=history, mirostat_mu=mirostat_mu, host_counters=host_counters)
    if final.x.shape[1] == 1:  # one candidate per row (greedy): it is the token; no uniform is needed
        cols = torch.zeros(B, dtype=torch.long, device=logits.device)
        proc_lp = torch.zeros(B, device=logits.device)
    else:
        if u is None:
            u = _uniforms(batch, num_generated, host_counters, uniforms, logits.device)
        probs = torch.softmax(final.x, -1)  # final.x has no NaN / +inf, and a finite entry in every row
        cols = _draw(probs, u)
        # log of the final distribution without a [B, V] log_softmax: lse = max_i x_i - log(max_i p_i)
        lse = final.x.amax(-1) - probs.amax(-1).log()
        proc_lp = final.x.gather(-1, cols.unsqueeze(-1)).squeeze(-1) - lse
    tokens = final.tokens(cols)
    if final.any_failed:  # no token was allowed: a valid id all the same, the model's own favourite
        tokens = torch.where(failed, first_argmax(raw.x), tokens)
        proc_lp = proc_lp.masked_fill(failed, NEG_INF)
    raw_lp = raw.at(tokens)
    mode = batch.processed_logprobs
    top_ids = top_lps = None
    n = min(int(num_logprobs), V)
    if n > 0:
        if not bool(mode.any()):
            top_lps, top_ids = P.topk(raw.full(), n)
        else:
            p_v, p_i = P.topk(final.logprobs(), n)
            if bool(mode.all()):
                top_lps, top_ids = p_v, p_i
            else:
                (r_v, r_i), m = P.topk(raw.full(), n), mode.unsqueeze(-1)
                top_ids, top_lps = torch.where(m, p_i, r_i), torch.where(m, p_v, r_v)
    trace = _trace(tracer, final.logprobs(), tokens) if explain else None
    mu = mirostat_mu
    if final.mirostat_mu is not None:  # the surprise of the drawn token, in the distribution it came from
        mu = M.update_mu(final.mirostat_mu, proc_lp, batch.mirostat_tau, batch.mirostat_eta,
                         (batch.mirostat > 0) & ~failed)
    if fused is not None:  # the fused rows take the kernel's draw, as they would alone
        rows, f = fused
        rows = torch.arange(B, device=logits.device) if rows is None else rows
        tokens, raw_lp, proc_lp, failed = (t.index_put((rows,), v) for t, v in
                                           ((tokens, f.tokens), (raw_lp, f.raw_logprobs),
                                            (proc_lp, f.processed_logprobs), (failed, f.failed)))
    return SamplerOutput(tokens=tokens, logprobs=torch.where(mode, proc_lp, raw_lp), raw_logprobs=raw_lp,
                         processed_logprobs=proc_lp, top_ids=top_ids, top_logprobs=top_lps, failed=failed,
                         trace=trace, mirostat_mu=mu)


def _uniforms(b: SamplingBatch, num_generated: torch.Tensor, host_counters, uniforms: torch.Tensor | None,
              device: torch.device) -> torch.Tensor:
    """The rows' draw uniforms on ``device``: the caller's own, or hashed from (seed, counter)."""
    if uniforms is None:
        return _row_uniforms(b, num_generated, host_counters)
    return uniforms if uniforms.device == device else uniforms.to(device)


def _sample_fused(logits: torch.Tensor, b: SamplingBatch, u: torch.Tensor):
    """The rows that only use temperature and top-p (``SamplingBatch.fused``), sampled by the native fused
    kernel: the same distribution and draw as the pipeline below, in three passes over a row instead of
    some twenty tensor ops, and always by the kernel, so a row's token does not depend on its neighbours.
    Returns None (no such row, or not on this CPU), else (their row indices, or None for every row; their
    output, without alternatives or trace)."""
    if (b.fused is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or b.vocab_size != logits.shape[1]):
        return None
    from ..model import native

    if not native.available():
        return None
    every = bool(b.fused.all())
    rows = None if every else b.fused.nonzero().squeeze(-1)
    pick = (lambda t: t) if every else (lambda t: t.index_select(0, rows))
    out = native.sample_top_p(pick(logits).contiguous(), pick(b.temperature), pick(b.top_p), pick(u.to(torch.float64)))
    if out is None:  # a +inf or NaN logit (a broken model): the pipeline's own rules for them
        return None
    tokens, raw_lp, proc_lp, failed = out
    mode = pick(b.processed_logprobs)
    res = SamplerOutput(tokens=tokens, logprobs=torch.where(mode, proc_lp, raw_lp), raw_logprobs=raw_lp,
                        processed_logprobs=proc_lp, top_ids=None, top_logprobs=None, failed=failed)
    return rows, res


def _trace(tracer: _Tracer, final: torch.Tensor, tokens: torch.Tensor) -> list[list[dict]]:
    """Per row: {"stage", "kept", "mass_removed"} for each stage that ran, then {"entropy", "token",
    "rank", "prob"} of the final distribution (rank 1 = most probable). Tensor ops, one to-list each."""
    probs = final.exp()
    p_tok = probs.gather(-1, tokens.unsqueeze(-1))
    rank = (probs > p_tok).sum(-1) + 1
    ent = (-torch.where(probs > 0, probs * final, torch.zeros_like(final)).sum(-1)).clamp(min=0.0)
    cols = [(name, kept.tolist(), mass.tolist()) for name, kept, mass in tracer.stages]
    ent_l, tok_l, rank_l, p_l = ent.tolist(), tokens.tolist(), rank.tolist(), p_tok.squeeze(-1).tolist()
    return [
        [{"stage": name, "kept": kept[i], "mass_removed": mass[i]} for name, kept, mass in cols]
        + [{"entropy": ent_l[i], "token": tok_l[i], "rank": rank_l[i], "prob": p_l[i]}]
        for i in range(len(tok_l))
    ]


BENCH_SETTINGS = {
    "default (T=1)": SamplingParams(),
    "greedy": SamplingParams(temperature=0),
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top_k=50": SamplingParams(top_k=50),
    "top_p=0.9": SamplingParams(top_p=0.9),
    "top_k=50+top_p=0.9+T=0.8": SamplingParams(top_k=50, top_p=0.9, temperature=0.8),
    "min_p=0.05": SamplingParams(min_p=0.05),
    "typical_p=0.9": SamplingParams(typical_p=0.9),
    "epsilon+eta": SamplingParams(epsilon=3e-4, eta=3e-4),
    "freq/presence+rep+T=0.9,top_p=0.9": SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.5,
                                                        presence_penalty=0.5, repetition_penalty=1.2),
    "everything + trace + logprobs=5": SamplingParams(temperature=0.9, top_k=100, top_p=0.9, min_p=0.01,
                                                      typical_p=0.95, epsilon=1e-4, eta=1e-4,
                                                      frequency_penalty=0.3, temperature_presence_penalty=0.5,
                                                      logit_bias={1: 2.0}, banned_token_ids=[2],
                                                      logprobs=5, explain=True),
}


def bench_sampler(batch: int = 1, vocab: int = 49152, repeats: int = 50,
                  settings: dict[str, SamplingParams] | None = None) -> dict[str, dict[str, float]]:
    """Milliseconds per ``sample`` call (``batch`` rows, ``vocab`` entries) for common settings: the median
    wall time and the median CPU time of this process (the latter is robust to a busy machine). A
    micro-benchmark, not a test: ``python -c "from logitlab.sampling.sampler import bench_sampler as b;
    print(b())"``."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g) * 3
    counts = torch.randint(0, 2, (batch, vocab), generator=g, dtype=torch.int32)
    num_generated = torch.full((batch,), 10, dtype=torch.long)
    out = {}
    for name, p in (settings or BENCH_SETTINGS).items():
        b = SamplingBatch.build([p] * batch, list(range(batch)), vocab, [0])
        kw = dict(output_counts=counts, prompt_counts=counts, num_generated=num_generated,
                  num_logprobs=p.logprobs or 0, explain=p.explain)
        for _ in range(3):
            sample(logits, b, **kw)
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            sample(logits, b, **kw)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[name] = {"wall_ms": sorted(wall)[repeats // 2] * 1e3, "cpu_ms": sorted(cpu)[repeats // 2] * 1e3}
    return out
