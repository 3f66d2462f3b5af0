"""The one sampling pipeline. Every decoding path (CLI, API, server, beam, speculative) calls it.

Order, per step, for all rows at once (each row with its own parameters):

    1. allowed / banned tokens, end-of-sequence masked until min_tokens   (mask)
    2. logit bias                                                           (logit_bias)
    3. penalties: repetition (x), frequency/presence (+), seed-000 temperature penalty   (penalties)
    4. temperature; T = 0 rows are greedy: argmax of the logits after 1-3   (temperature)
    5. truncation: top-k -> top-p -> min-p -> typical -> epsilon -> eta
    6. draw: inverse CDF of the final distribution at a per-request uniform u = hash(seed, step)

Stages no row uses are skipped. NaN logits count as -inf; a row with +inf logits samples among those
tokens; a row left with no finite logit is reported in ``failed`` (never NaN, never an invalid id).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import processors as P
from .params import SamplingParams
from .rng import uniforms as rng_uniforms


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors, built once per batch composition."""

    temperature: torch.Tensor
    greedy: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    typical_p: torch.Tensor
    epsilon: torch.Tensor
    eta: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    temperature_frequency_penalty: torch.Tensor
    temperature_presence_penalty: torch.Tensor
    penalize_prompt: torch.Tensor
    min_tokens: torch.Tensor
    processed_logprobs: torch.Tensor  # row wants logprobs of the processed distribution
    seeds: torch.Tensor
    eos_ids: torch.Tensor
    bias: torch.Tensor | None
    allowed: torch.Tensor | None
    banned: torch.Tensor | None
    uses: frozenset  # names of the stages some row needs

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], vocab_size: int,
              eos_token_ids=(), device="cpu") -> SamplingBatch:
        B, V = len(params), vocab_size

        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        bias = allowed = banned = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros(B, V, device=device)
            for i, p in enumerate(params):
                for tok, b in (p.logit_bias or {}).items():
                    bias[i, int(tok)] = float(b)
        if any(p.allowed_token_ids is not None for p in params):
            allowed = torch.ones(B, V, dtype=torch.bool, device=device)
            for i, p in enumerate(params):
                if p.allowed_token_ids is not None:
                    allowed[i] = False
                    allowed[i, torch.tensor(list(p.allowed_token_ids), dtype=torch.long)] = True
        if any(p.banned_token_ids for p in params):
            banned = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, p in enumerate(params):
                if p.banned_token_ids:
                    banned[i, torch.tensor(list(p.banned_token_ids), dtype=torch.long)] = True
        uses = set()
        if bias is not None:
            uses.add("logit_bias")
        if allowed is not None or banned is not None:
            uses.add("mask")
        if any(p.min_tokens > 0 for p in params) and len(eos_token_ids):
            uses.add("min_tokens")
        if any(p.repetition_penalty != 1.0 for p in params):
            uses.add("repetition_penalty")
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            uses.add("frequency_presence")
        if any(p.temperature_frequency_penalty or p.temperature_presence_penalty for p in params):
            uses.add("temperature_penalty")
        for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0),
                          ("epsilon", 0.0), ("eta", 0.0)):
            if any(getattr(p, name) != off and p.temperature > 0 for p in params):
                uses.add(name)
        return cls(
            temperature=col("temperature"), greedy=col("temperature") == 0, top_k=col("top_k", torch.long),
            top_p=col("top_p"), min_p=col("min_p"), typical_p=col("typical_p"), epsilon=col("epsilon"),
            eta=col("eta"), repetition_penalty=col("repetition_penalty"),
            frequency_penalty=col("frequency_penalty"), presence_penalty=col("presence_penalty"),
            temperature_frequency_penalty=col("temperature_frequency_penalty"),
            temperature_presence_penalty=col("temperature_presence_penalty"),
            penalize_prompt=col("penalize_prompt", torch.bool), min_tokens=col("min_tokens", torch.long),
            processed_logprobs=torch.tensor([p.logprobs_mode == "processed" for p in params], device=device),
            seeds=torch.tensor([int(s) & ((1 << 63) - 1) for s in seeds], dtype=torch.long, device=device),
            eos_ids=torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device),
            bias=bias, allowed=allowed, banned=banned, uses=frozenset(uses),
        )

    def __len__(self) -> int:
        return self.temperature.shape[0]


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor  # [B] of the chosen token, in each row's logprobs mode
    raw_logprobs: torch.Tensor  # [B] model's own log-softmax
    processed_logprobs: torch.Tensor  # [B] log of the distribution actually sampled
    top_ids: torch.Tensor | None  # [B, N] in each row's mode
    top_logprobs: torch.Tensor | None
    failed: torch.Tensor  # [B] bool
    trace: list[list[dict]] | None = None


def _sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf; a row holding +inf keeps only those tokens (equally likely)."""
    x = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    posinf = torch.isposinf(x)
    if bool(posinf.any()):
        rows = posinf.any(-1, keepdim=True)
        x = torch.where(rows, torch.where(posinf, 0.0, float("-inf")), x)
    return x


class _Tracer:
    """Per-stage statistics for the explainer, computed with tensor ops over the batch."""

    def __init__(self, enabled: bool):
        self.enabled, self.stages = enabled, []

    def __call__(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        if not self.enabled:
            return
        prev = torch.softmax(before, -1).nan_to_num(0.0)
        removed = torch.isfinite(before) & ~torch.isfinite(after)
        self.stages.append((name, torch.isfinite(after).sum(-1), (prev * removed).sum(-1)))


def _pipeline(logits, b: SamplingBatch, output_counts, prompt_counts, num_generated, tracer: _Tracer):
    """Steps 1-5. Returns (final logits, raw log-softmax, failed rows)."""
    x = _sanitize(logits)
    raw = torch.log_softmax(x, -1)
    B = x.shape[0]
    if num_generated is None:
        num_generated = torch.zeros(B, dtype=torch.long)

    def stage(name, fn):
        nonlocal x
        y = fn(x)
        tracer(name, x, y)
        x = y

    if "mask" in b.uses:
        stage("allowed/banned", lambda v: P.mask_tokens(v, b.allowed, b.banned))
    if "min_tokens" in b.uses:
        stage("min_tokens", lambda v: P.mask_eos_before_min_tokens(v, b.eos_ids, num_generated, b.min_tokens))
    if "logit_bias" in b.uses:
        stage("logit_bias", lambda v: P.logit_bias(v, b.bias))
    penalties = {"repetition_penalty", "frequency_presence", "temperature_penalty"} & b.uses
    if penalties:
        out_c = output_counts if output_counts is not None else torch.zeros_like(x, dtype=torch.int32)
        counts = out_c
        if prompt_counts is not None and bool(b.penalize_prompt.any()):
            counts = out_c + prompt_counts * b.penalize_prompt.unsqueeze(-1)
        if "repetition_penalty" in b.uses:
            seen = out_c > 0
            if prompt_counts is not None:
                seen = seen | (prompt_counts > 0)
            stage("repetition", lambda v: P.repetition_penalty(v, seen, b.repetition_penalty))
        if "frequency_presence" in b.uses:
            stage("freq/presence", lambda v: P.frequency_presence_penalty(
                v, counts, b.frequency_penalty, b.presence_penalty))
        if "temperature_penalty" in b.uses:
            stage("temp_penalty", lambda v: P.temperature_penalty(
                v, counts, b.temperature_frequency_penalty, b.temperature_presence_penalty))
    failed = ~torch.isfinite(x).any(-1)
    if bool(failed.any()):
        x = torch.where(failed.unsqueeze(-1), torch.zeros_like(x), x)
    greedy = b.greedy
    if bool(greedy.any()):  # one-hot at the argmax (ties -> lowest id), before temperature
        onehot = torch.full_like(x, float("-inf")).scatter(-1, x.argmax(-1, keepdim=True), 0.0)
        greedy_x = onehot
    stage("temperature", lambda v: P.temperature(v, b.temperature))
    for name, fn, param in (("top_k", P.top_k, b.top_k), ("top_p", P.top_p, b.top_p),
                            ("min_p", P.min_p, b.min_p), ("typical_p", P.typical, b.typical_p),
                            ("epsilon", P.epsilon, b.epsilon), ("eta", P.eta, b.eta)):
        if name in b.uses:
            stage(name, lambda v, fn=fn, param=param: fn(v, param))
    if bool(greedy.any()):
        y = torch.where(greedy.unsqueeze(-1), greedy_x, x)
        tracer("greedy", x, y)
        x = y
    return x, raw, failed


def process(logits, batch: SamplingBatch, output_counts=None, prompt_counts=None, num_generated=None):
    """The final normalised log-probabilities [B, V] the pipeline samples from (-inf where removed;
    greedy rows are one-hot at their argmax)."""
    x, _, _ = _pipeline(logits, batch, output_counts, prompt_counts, num_generated, _Tracer(False))
    return torch.log_softmax(x, -1)


def draw(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one uniform per row: the first token whose cumulative mass exceeds u * total.
    Only tokens with positive probability can be returned."""
    probs = logprobs.double().exp()
    cdf = probs.cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_positive = cdf.argmax(-1)  # first index reaching the total = last token with mass
    return torch.minimum(idx, last_positive)


def sample(logits, batch: SamplingBatch, *, output_counts=None, prompt_counts=None, num_generated=None,
           num_logprobs: int = 0, explain: bool = False, uniforms: torch.Tensor | None = None) -> SamplerOutput:
    """Run the pipeline on logits [B, V] and draw one token per row."""
    B = logits.shape[0]
    if num_generated is None:
        num_generated = torch.zeros(B, dtype=torch.long)
    tracer = _Tracer(explain)
    x, raw, failed = _pipeline(logits, batch, output_counts, prompt_counts, num_generated, tracer)
    final = torch.log_softmax(x, -1)
    u = uniforms if uniforms is not None else rng_uniforms(batch.seeds, num_generated)
    tokens = draw(final, u)
    rows = torch.arange(B)
    raw_lp, proc_lp = raw[rows, tokens], final[rows, tokens]
    mode = batch.processed_logprobs
    top_ids = top_lps = None
    if num_logprobs > 0:
        r_v, r_i = raw.topk(num_logprobs, -1)
        p_v, p_i = final.topk(num_logprobs, -1)
        m = mode.unsqueeze(-1)
        top_ids, top_lps = torch.where(m, p_i, r_i), torch.where(m, p_v, r_v)
    trace = None
    if explain:
        probs = final.exp()
        p_tok = probs[rows, tokens]
        rank = (probs > p_tok.unsqueeze(-1)).sum(-1) + 1
        ent = -(probs * torch.where(probs > 0, final, torch.zeros_like(final))).sum(-1)
        cols = [(n, k.tolist(), m.tolist()) for n, k, m in tracer.stages]
        ent_l, tok_l, rank_l, p_l = ent.tolist(), tokens.tolist(), rank.tolist(), p_tok.tolist()
        trace = [
            [{"stage": n, "kept": k[i], "mass_removed": m[i]} for n, k, m in cols]
            + [{"entropy": ent_l[i], "token": tok_l[i], "rank": rank_l[i], "prob": p_l[i]}]
            for i in range(B)
        ]
    return SamplerOutput(tokens=tokens, logprobs=torch.where(mode, proc_lp, raw_lp), raw_logprobs=raw_lp,
                         processed_logprobs=proc_lp, top_ids=top_ids, top_logprobs=top_lps, failed=failed,
                         trace=trace)


def bench_sampler(batch: int = 1, vocab: int = 49152, repeats: int = 50) -> dict[str, float]:
    """Milliseconds per ``sample`` call for common settings (not a test; see BENCHMARKS.md)."""
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    settings = {
        "greedy": SamplingParams(temperature=0),
        "temperature": SamplingParams(temperature=0.8),
        "top_k=50": SamplingParams(top_k=50),
        "top_p=0.9": SamplingParams(top_p=0.9),
        "min_p=0.05": SamplingParams(min_p=0.05),
        "top_k+top_p+penalties": SamplingParams(top_k=40, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5),
    }
    out = {}
    counts = torch.zeros(batch, vocab, dtype=torch.int32)
    for name, p in settings.items():
        b = SamplingBatch.build([p] * batch, list(range(batch)), vocab, [0])
        for _ in range(3):
            sample(logits, b, output_counts=counts)
        t0 = time.perf_counter()
        for _ in range(repeats):
            sample(logits, b, output_counts=counts)
        out[name] = (time.perf_counter() - t0) / repeats * 1e3
    return out
