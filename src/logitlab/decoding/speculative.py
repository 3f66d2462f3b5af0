"""Speculative decoding (seed 003; Leviathan et al. 2023, Chen et al. 2023): faster, same distribution.

Each round, a cheap *draft* proposes ``gamma`` tokens ``d_1..d_gamma``, drawing ``d_j ~ q_j``. The
*target* then runs ONE forward over ``[last token, d_1 .. d_gamma]`` (``gamma + 1`` positions; on a
CPU a forward over 8 tokens costs about as much as over 1) and yields its distributions
``p_1 .. p_{gamma+1}``. Going left to right, draft token ``d_j`` is accepted with probability
``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the token is redrawn from the residual
``normalise(max(0, p_j - q_j))`` and the round ends; if all ``gamma`` are accepted, a bonus token is drawn
from ``p_{gamma+1}``. Every committed token is then distributed exactly as ``p`` (the pipeline's final
distribution — temperature, truncation, penalties included), so the output has the distribution of plain
sampling; with temperature 0, ``p`` and ``q`` are one-hot and the output is plain greedy, token for token.

``p`` and ``q`` both come from the same sampling pipeline (``sampling.process``) with the same
parameters, the verification positions seeing the penalty counts of the drafted tokens before them.

KV caches: target and draft each have their own. A rejected token's keys/values stay in the cache at
positions past the committed length; the cache is position-addressed and every forward attends only to
positions <= its queries', so "rewinding" is just the next round overwriting those positions.

Drafts (``make_draft``): another model with the same tokenizer, the target's own first ``k`` layers
(early exit through the final norm and LM head, ``early-exit:K``), an int8 copy of the target (``int8``),
the target's GGUF file computed on its own blocks (``gguf``: the same weights, activations to ~16 bits, so
nearly every draft is accepted, at a fraction of a float32 step) and n-gram prompt lookup (``ngram``: copy
what followed the last occurrence of the current suffix in the context; a deterministic draft, ``q``
one-hot). A model draft keeps a paged KV cache of its own (memory as its tokens grow), so its one-token
steps are the model's fused decode step where it has one.

Rows: ``n`` samples (or several prompts) are decoded together, each row with its own seed, acceptance
count and length; a row's randomness depends only on its seed and round, not on its neighbours.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..model.paged_cache import PagedKVCache
from ..model.quant import pack_for_gemm, quantize_int8
from ..sampling import ParamError, SamplingParams
from ..sampling.rng import uniforms
from .constraints import PipelineRows, resolve_model, sample_seeds, stop_token_set

# random streams of one row (uniforms are counter-based: seed x counter x stream)
_DRAFT, _ACCEPT, _RESIDUAL = 11, 12, 13


# ---- drafts ----------------------------------------------------------------------------------------

class Draft:
    """Proposes ``gamma`` tokens per row and the distributions ``q`` they were drawn from."""

    name = "draft"
    deterministic = False

    def start(self, prompts: list[list[int]], max_len: int) -> None:
        """A new generation of ``len(prompts)`` rows; sequences will not exceed ``max_len`` positions."""
        raise NotImplementedError

    def propose(self, seqs, gamma, rows: PipelineRows, counters: torch.Tensor):
        """-> (tokens [B, gamma] long, logq [B, gamma, V] or None when deterministic)."""
        raise NotImplementedError

    def commit(self, seqs: list[list[int]], accepted: torch.Tensor) -> None:
        """The round committed; ``accepted[b]`` of the row's drafted tokens were kept."""


class ModelDraft(Draft):
    """A language model as draft: a separate model, the target's own first ``num_layers`` layers (early
    exit), or a quantized copy. It keeps its own paged KV cache: blocks as its rows' tokens grow, and
    one-token steps in the model's fused decode step where it has one (``decode_step.py``)."""

    BLOCK = 16  # positions per KV block

    def __init__(self, model, num_layers: int | None = None, name: str | None = None):
        self.model, self.num_layers = model, num_layers
        self.name = name or (f"early-exit:{num_layers}" if num_layers else "model")
        self.cache: PagedKVCache | None = None
        self.tables: list[list[int]] = []  # per row: its blocks
        self.cached: list[int] = []  # per row: positions in the draft cache that hold committed tokens
        self.forwards = 0

    def start(self, prompts, max_len):
        cfg = self.model.config
        if self.num_layers:
            from dataclasses import replace

            cfg = replace(cfg, num_layers=self.num_layers)  # the cache only needs the layers it runs
        per_row = -(-max_len // self.BLOCK) + 1  # (a round may draft a little past max_len)
        self.cache = PagedKVCache(cfg, capacity=len(prompts) * per_row + 1, block_size=self.BLOCK,
                                  dtype=self.model.dtype, initial_blocks=len(prompts) * 2, device=self.model.device)
        self.tables = [[] for _ in prompts]
        self.cached = [0] * len(prompts)

    def forward(self, tokens, positions, valid=None):
        self.forwards += 1
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        for b, table in enumerate(self.tables):  # blocks for the new positions (rewritten ones have theirs)
            if valid[b].any():
                for p in range(len(table) * self.BLOCK, int(positions[b][valid[b]].max()) + 1, self.BLOCK):
                    self.cache.ensure_writable(table, p)
        return self.model(tokens, positions, self.cache, valid=valid, num_layers=self.num_layers,
                          block_tables=PagedKVCache.table_tensor(self.tables))

    def _feed(self, feed: list[list[int]]) -> torch.Tensor:
        """Run each row's unfed tokens; the logits after each row's last one [B, V]. Two or fewer tokens a
        row go one at a time, right-aligned (every row's last token in the last step), so each is a decode
        step; more (the prompt) go in one forward."""
        B, width = len(feed), max(len(f) for f in feed)
        stepped = width <= 2
        tokens = torch.zeros(B, width, dtype=torch.long)
        positions = torch.zeros(B, width, dtype=torch.long)
        valid = torch.zeros(B, width, dtype=torch.bool)
        for b, f in enumerate(feed):
            at = width - len(f) if stepped else 0
            tokens[b, at : at + len(f)] = torch.tensor(f)
            positions[b, at : at + len(f)] = torch.arange(self.cached[b], self.cached[b] + len(f))
            valid[b, at : at + len(f)] = True
        if not stepped:
            return self.forward(tokens, positions, valid)
        for j in range(width):
            logits = self.forward(*(t[:, j : j + 1].contiguous() for t in (tokens, positions, valid)))
        return logits

    def propose(self, seqs, gamma, rows, counters):
        B = len(seqs)
        feed = [s[c:] for s, c in zip(seqs, self.cached, strict=True)]  # 1 token, 2 after a full accept
        logits = self._feed(feed)
        lengths = torch.tensor([len(s) for s in seqs])
        draft_rows = _Lookahead(rows)
        # greedy rows: q is one-hot (all -inf if nothing is allowed), and the draw of a one-hot row is its
        # hot column (of an all -inf row, 0): the argmax, without the draw's [B, V] softmax and cumsums
        greedy = bool(rows.batch().greedy.all())
        out_t, out_q = [], []
        for j in range(gamma):
            logq = draft_rows.logprobs(logits)
            tok = logq.argmax(-1) if greedy else _draw(logq, rows.uniforms(counters + j, _DRAFT))
            out_t.append(tok)
            out_q.append(logq)
            draft_rows.push(tok)
            if j < gamma - 1:
                logits = self.forward(tok.view(B, 1), (lengths + j).view(B, 1))
        self._fed = [len(s) + gamma - 1 for s in seqs]  # committed + d_1..d_{gamma-1} now in the cache
        self._base = [len(s) for s in seqs]
        return torch.stack(out_t, 1), torch.stack(out_q, 1)

    def commit(self, seqs, accepted):
        # valid: the old sequence plus the accepted drafts that were fed (d_gamma never is)
        self.cached = [min(b + int(a), f) for b, a, f in zip(self._base, accepted.tolist(), self._fed, strict=True)]


class NgramDraft(Draft):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last ``n`` tokens
    (``n = max_ngram .. 1``) and propose the tokens that followed it. No model, no cache; the proposal is
    deterministic (``q`` one-hot), so acceptance is simply ``p(d)``. Strong on repetitive text and on
    outputs that copy from the prompt."""

    name = "ngram"
    deterministic = True

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.forwards = 0

    def start(self, prompts, max_len):
        pass

    def lookup(self, seq: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` tokens that followed the most recent earlier occurrence of the longest matching
        suffix; [] when nothing matches (the round is then a plain decode step)."""
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            suffix = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # most recent earlier match first
                if seq[i : i + n] == suffix:
                    return seq[i + n : i + n + gamma]
        return []

    def propose(self, seqs, gamma, rows, counters):
        found = [self.lookup(s, gamma) for s in seqs]
        width = max(len(f) for f in found)
        tokens = torch.empty(len(seqs), width, dtype=torch.long)
        for b, (f, s) in enumerate(zip(found, seqs, strict=True)):
            # a row with a shorter match is padded with its last proposal (or token): any proposal keeps
            # the output exact, a poor one is merely rejected
            f = f or s[-1:]
            tokens[b] = torch.tensor((f + f[-1:] * width)[:width], dtype=torch.long)
        return tokens, None


def gguf_copy(target):
    """The target's GGUF file computed on its own blocks (``--dtype gguf``) with two-level activations: the
    same weights, logits within ~1e-3 nats of a float32 target's (tests/test_gguf_dtype.py). Made on first
    use and kept with the target, so every request's draft shares it."""
    from ..model.gguf_model import BlockLinear, set_activations
    from ..weights import load_gguf_model

    if any(isinstance(m, BlockLinear) for m in target.modules()):
        raise ParamError("speculative", "the gguf draft is for a float32, bfloat16 or int8 target; this one already "
                                        "computes on the GGUF blocks (use ngram)")
    found = target.__dict__.get("_gguf_draft")
    if found is None:
        source = getattr(target, "gguf_source", None)
        if source is None:
            raise ParamError("speculative", "the gguf draft needs a target loaded from a GGUF file")
        found = target.__dict__["_gguf_draft"] = set_activations(load_gguf_model(source, progress=False)[0], "int8x2")
    return found


def make_draft(spec: str | Draft | object, target, load=None) -> Draft:
    """``early-exit:K`` | ``int8`` | ``gguf`` | ``ngram`` / ``ngram:N`` | a model name (loaded with ``load(name)``,
    e.g. ``Engine.load``) | a Transformer | an Engine | a Draft."""
    if isinstance(spec, Draft):
        return spec
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("early-exit"):
            k = _int_suffix(s, "speculative", "early-exit:K")
            if not 1 <= k < target.config.num_layers:
                raise ParamError("speculative", f"early-exit:K needs 1 <= K < {target.config.num_layers}, got {k}")
            return ModelDraft(target, num_layers=k)
        if s == "int8":
            return ModelDraft(pack_for_gemm(quantize_int8(copy.deepcopy(target))), name="int8")
        if s == "gguf":
            return ModelDraft(gguf_copy(target), name="gguf")
        if s == "ngram" or s.startswith("ngram:"):
            n = _int_suffix(s, "speculative", "ngram:N") if ":" in s else 3
            if n < 1:
                raise ParamError("speculative", f"ngram:N needs N >= 1, got {n}")
            return NgramDraft(n)
        if load is None:
            raise ParamError("speculative", f"unknown draft {spec!r} (early-exit:K, int8, gguf, ngram or a model)")
        spec = load(s)
    model = spec.model if hasattr(spec, "tokenizer") else spec  # an Engine, or a Transformer itself
    if model.config.vocab_size != target.config.vocab_size:
        raise ParamError("speculative", f"the draft's vocabulary ({model.config.vocab_size}) differs from the "
                         f"target's ({target.config.vocab_size}): it needs the same tokenizer")
    return ModelDraft(model, name=getattr(spec, "name", "model"))


def _int_suffix(s: str, field_name: str, form: str) -> int:
    try:
        return int(s.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ParamError(field_name, f"expected {form}, got {s!r}") from None


class _Lookahead:
    """Pipeline rows advanced along a draft (penalty counts and token counters), leaving the originals."""

    def __init__(self, rows: PipelineRows):
        self.rows = rows
        self.counts = rows.output_counts.clone()
        self.num = rows.num_generated.clone()

    def logprobs(self, logits):
        saved = self.rows.output_counts, self.rows.num_generated
        self.rows.output_counts, self.rows.num_generated = self.counts, self.num
        try:
            return self.rows.logprobs(logits)
        finally:
            self.rows.output_counts, self.rows.num_generated = saved

    def push(self, tokens):
        self.counts[torch.arange(len(tokens)), tokens] += 1
        self.num = self.num + 1


def _draw(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    from ..sampling import draw

    return draw(logprobs, u)


# ---- the driver --------------------------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed (over live rows)
    accepted: int = 0  # of which accepted by the target
    rounds: int = 0  # target verification forwards
    generated: int = 0  # tokens committed
    target_forwards: int = 0  # including the prefill
    draft_forwards: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "rounds": self.rounds, "generated": self.generated, "tokens_per_round": self.tokens_per_round,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "seconds": self.seconds}


@dataclass
class SpeculativeOutput:
    token_ids: list[list[int]]  # per row, generated tokens only
    finish_reasons: list[str]
    stats: SpeculativeStats
    texts: list[str] | None = None
    per_round: list[list[int]] = field(default_factory=list)  # accepted counts per round (per row)


def accept_round(logits: torch.Tensor, drafted: torch.Tensor, logq: torch.Tensor | None, rows: PipelineRows,
                 counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification: the target's ``logits`` [B, g + 1, V] over [last token, d_1 .. d_g] -> (leading
    accepted drafts per row [B], the next token per row [B]: the residual draw at the first rejection, or
    the bonus draw from p_{g+1}). ``logq`` [B, g, V] (None: a deterministic draft, q one-hot)."""
    B, g = drafted.shape
    logp = rows.logprobs_ahead(logits, drafted)  # [B, g + 1, V]
    # accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), left to right
    lp_d = logp[:, :g].gather(2, drafted.unsqueeze(-1)).squeeze(-1).double()  # [B, g]
    if bool(rows.batch(g + 1).greedy.all()):
        return _accept_greedy(logp, lp_d)
    return _accept_general(logp, lp_d, drafted, logq, rows, counters)


def _accept_general(logp, lp_d, drafted, logq, rows: PipelineRows, counters) -> tuple[torch.Tensor, torch.Tensor]:
    """``accept_round``'s rule for any rows: ``logp`` [B, g + 1, V] the pipeline's log-probabilities,
    ``lp_d`` [B, g] (float64) those of the drafted tokens."""
    B, g = drafted.shape
    if logq is None:  # deterministic draft: q(d) = 1
        ratio = lp_d.exp()
    else:
        lq_d = logq.gather(2, drafted.unsqueeze(-1)).squeeze(-1).double()
        ratio = (lp_d - lq_d).exp()
    if g:
        # [B, g]: u[b, j] = hash(seed_b, counters_b + j, _ACCEPT), all in one call (the hash is elementwise)
        u = uniforms(rows.seeds.view(B, 1).expand(B, g), counters.view(B, 1) + torch.arange(g), _ACCEPT)
        n_acc = (u < ratio).long().cumprod(1).sum(1)  # leading accepts per row
    else:
        n_acc = torch.zeros(B, dtype=torch.long)
    # the next token: from the residual at the first rejection, or the bonus from p_{g+1}
    idx = n_acc.view(B, 1, 1).expand(B, 1, logp.shape[-1])
    p_next = logp.gather(1, idx).squeeze(1).double().exp()  # [B, V]
    if logq is None:
        q_next = torch.zeros_like(p_next)
        rej = n_acc < g
        q_next[rej.nonzero().squeeze(1), drafted[rej, n_acc[rej]]] = 1.0
    else:
        q_ext = torch.cat([logq, torch.full_like(logq[:, :1], float("-inf"))], 1)
        q_next = q_ext.gather(1, idx).squeeze(1).double().exp()
    resid = (p_next - q_next).clamp_min(0.0)
    mass = resid.sum(1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-300), p_next)  # p == q: never rejected
    nxt = _draw(resid.log().float(), rows.uniforms(counters, _RESIDUAL))
    return n_acc, nxt


def _accept_greedy(logp: torch.Tensor, lp_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``accept_round`` when every row is greedy, without its [B, V] float64 residual and draw (a few
    milliseconds a round at a 49k vocabulary). A greedy row's p is one-hot (log-probability 0 at the
    pipeline's argmax, -inf elsewhere; a row with nothing allowed is all -inf), so the general rule reduces
    exactly to: d_j is accepted iff p_j(d_j) = 1, i.e. ``lp_d == 0`` (u < 1 = ratio always, u < 0 = ratio
    never, whatever q); the residual ``max(0, p - q)`` at a rejection is p itself (p(d_j) = 0 there) and the
    bonus is p_{g+1}, so the next token is the argmax of p at the first rejection (0 for an all -inf row,
    as the inverse-CDF draw of no mass gives) -- token for token what the general path draws."""
    B, g = lp_d.shape
    n_acc = (lp_d == 0).long().cumprod(1).sum(1) if g else torch.zeros(B, dtype=torch.long)
    at = logp.gather(1, n_acc.view(B, 1, 1).expand(B, 1, logp.shape[-1])).squeeze(1)  # [B, V]
    return n_acc, at.argmax(-1)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    prompt,
    params: SamplingParams | None = None,
    num_speculative_tokens: int = 4,
    max_tokens: int | None = None,
    n: int | None = None,
    seed: int | None = None,
    eos_token_ids=None,
    seeds: list[int] | None = None,
) -> SpeculativeOutput:
    """Generate with speculative decoding. ``target``: Engine or Transformer; ``draft``: a spec string
    (``early-exit:K``, ``int8``, ``ngram``), a Draft, a Transformer or Engine with the same vocabulary.
    ``n`` rows (default ``params.n``) sample independently from seeds derived from ``seed``
    (default ``params.seed``, else 0) — or pass explicit per-row ``seeds``."""
    params = params or SamplingParams()
    model, tokenizer, prompt_ids, eos = resolve_model(target, prompt, eos_token_ids)
    gamma = num_speculative_tokens
    if not isinstance(gamma, int) or not 1 <= gamma <= 64:
        raise ParamError("num_speculative_tokens", f"must be an integer in [1, 64], got {gamma!r}")
    if max_tokens is not None and max_tokens != params.max_tokens:
        from dataclasses import replace

        params = replace(params, max_tokens=max_tokens)
    if seeds is None:
        seeds = sample_seeds(params, params.n if n is None else n, seed)
    ctx = model.config.context_length
    d = make_draft(draft, model, load=_loader(target))
    # The rounds run in a scheduler of their own (``SpecGroup``, the mode the engine's scheduler runs for
    # the CLI and the server): the same code, so this function is the mode, not a second loop.
    from .scheduler import Request, Scheduler

    group = SpecGroup(prompt_ids, params, seeds, d, gamma, eos, model.config.vocab_size, ctx)
    B = len(seeds)
    sched = Scheduler.standalone(model, tokenizer, eos, B, ctx, group.cache_len + gamma + 16)
    group.requests = [Request(list(prompt_ids), params, seeds[i], index=i, spec=group) for i in range(B)]
    sched.add(group.requests)
    while not all(r.finished for r in group.requests):
        sched.step()
    stop_ids = stop_token_set(params, eos)
    out = [list(r.output_ids) for r in group.requests]
    texts = [tokenizer.decode([t for t in o if t not in stop_ids]) for o in out] if tokenizer else None
    return SpeculativeOutput(out, [r.finish_reason for r in group.requests], group.stats, texts, group.per_round)


def _loader(target):
    """Load a draft model by name the way the target was loaded (an Engine's class)."""
    if hasattr(target, "tokenizer") and hasattr(type(target), "load"):
        return lambda name: type(target).load(name)
    return None


@torch.inference_mode()
def plain_generate(
    target,
    prompt,
    params: SamplingParams | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    seed: int | None = None,
    eos_token_ids=None,
    seeds: list[int] | None = None,
) -> SpeculativeOutput:
    """The baseline: the same rows decoded plainly, one target forward per token, by a scheduler of their
    own (the path ``logitlab generate`` takes; not a second decode loop). Arguments as
    ``speculative_generate``'s."""
    params = params or SamplingParams()
    model, tokenizer, prompt_ids, eos = resolve_model(target, prompt, eos_token_ids)
    if max_tokens is not None and max_tokens != params.max_tokens:
        from dataclasses import replace

        params = replace(params, max_tokens=max_tokens)
    if seeds is None:
        seeds = sample_seeds(params, params.n if n is None else n, seed)
    from .scheduler import Request, Scheduler

    ctx = model.config.context_length
    t0 = time.perf_counter()
    sched = Scheduler.standalone(model, tokenizer, eos, len(seeds), ctx, min(ctx, len(prompt_ids) + params.max_tokens))
    requests = [Request(list(prompt_ids), params, s, index=i) for i, s in enumerate(seeds)]
    out, texts = sched.run_to_end(requests, tokenizer)
    stats = SpeculativeStats(generated=sum(len(o) for o in out))
    stats.target_forwards = max(len(o) for o in out)  # the prompt's forward gives the first token
    stats.rounds = stats.target_forwards - 1
    stats.seconds = time.perf_counter() - t0
    if texts is not None:  # without stop ids (run_to_end strips end-of-sequence ids only)
        stop_ids = stop_token_set(params, eos)
        texts = [tokenizer.decode([t for t in o if t not in stop_ids]) for o in out]
    return SpeculativeOutput(out, [r.finish_reason for r in requests], stats, texts)


def benchmark_speculative(target, drafts=("ngram", "early-exit:8", "int8"), prompt="Once upon a time, there was a",
                          max_tokens: int = 64, num_speculative_tokens: int = 4, params: SamplingParams | None = None,
                          repeats: int = 1) -> list[dict]:
    """Acceptance rate and speed-up of speculative decoding against plain decoding of the same target with
    the same pipeline (greedy by default), one sequence. Returns one dict per draft (for the benchmark and
    BENCHMARKS.md): tokens/s plain and speculative, speed-up, acceptance rate, tokens per target forward,
    and whether the greedy output was identical."""
    params = params or SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def best_of(fn):
        runs = [fn() for _ in range(max(1, repeats))]
        return min(runs, key=lambda r: r.stats.seconds)

    base = best_of(lambda: plain_generate(target, prompt, params, max_tokens=max_tokens, n=1))
    base_tps = base.stats.generated / base.stats.seconds
    model = target.model if hasattr(target, "tokenizer") else target
    rows = []
    for spec in drafts:
        draft = make_draft(spec, model, load=_loader(target)) if isinstance(spec, str) else spec
        name = spec if isinstance(spec, str) else getattr(draft, "name", "draft")
        res = best_of(lambda draft=draft: speculative_generate(target, draft, prompt, params, num_speculative_tokens,
                                                               max_tokens=max_tokens, n=1))
        tps = res.stats.generated / res.stats.seconds
        rows.append({
            "draft": name, "gamma": num_speculative_tokens, "tokens": res.stats.generated,
            "plain_tok_s": base_tps, "spec_tok_s": tps, "speedup": tps / base_tps,
            "acceptance_rate": res.stats.acceptance_rate,
            "tokens_per_target_forward": res.stats.generated / max(1, res.stats.target_forwards),
            "drafted": res.stats.drafted, "accepted": res.stats.accepted,
            "same_as_plain": res.token_ids == base.token_ids,
        })
    return rows


# ---- speculative decoding as a mode of the scheduler -----------------------------------------------------

def rides_decode(sched) -> bool:
    """Whether speculative verification rides in ``sched``'s one decode forward: each round's W x (g + 1)
    drafted positions go in as one-token rows beside the plain and beam rows, each over its sequence's
    block table. Exact where the model decodes in its native kernels: every layer writes all rows' keys and
    values before any row attends, and a row attends to positions <= its own, so a drafted token sees the
    ones before it as in a (g + 1)-token forward. Cheaper too: measured with SmolLM2-135M at a 400-token
    context, 5 positions cost 2.1x a one-token step as flat rows against 2.4x as a 5-token forward in
    float32 (int8, 4 positions: 1.6x vs 2.5x), before they shared the batch's forward at all."""
    return sched.use_cache and _native_decode(sched.model, sched.cache)


def _native_decode(model, cache) -> bool:
    """Whether ``model`` runs a one-token step over ``cache`` in its native kernels (the conditions of
    ``Transformer.forward``'s native decode: RoPE, float32 activations and cache, the kernels built)."""
    from ..model import native

    cfg = getattr(model, "config", None)
    return (cfg is not None and getattr(cfg, "position", None) == "rope" and getattr(model, "dtype", None) ==
            torch.float32 and cache.dtype == torch.float32 and not torch.is_grad_enabled() and native.available())


class SpecGroup:
    """Speculative decoding inside the scheduler: the ``n`` samples of one prompt are rows that, once per
    step, propose drafts (``prepare``), have them verified over the paged KV cache (rows of their own block
    tables; in the scheduler's one decode forward where the model decodes natively, else a forward of the
    round's own), commit what the acceptance rule (``accept_round``) keeps (``commit``), and stream it
    through the scheduler's one stop policy (EOS, stop ids, stop strings, ``min_tokens``, ``max_tokens``).
    ``speculative_generate`` runs one of these in a scheduler of its own."""

    kind = "speculative"

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seeds: list[int], draft: Draft, gamma: int,
                 eos_token_ids, vocab_size: int, context_length: int):
        if not isinstance(gamma, int) or not 1 <= gamma <= 64:
            raise ParamError("num_speculative_tokens", f"must be an integer in [1, 64], got {gamma!r}")
        self.prompt_ids, self.params, self.gamma, self.draft = list(prompt_ids), params, gamma, draft
        self.W = len(seeds)  # rows of the batch it takes
        self.max_tokens = params.max_tokens
        P = len(self.prompt_ids)
        self.cache_len = min(context_length, P + self.max_tokens + gamma + 1)
        if P + 1 > self.cache_len:
            raise ParamError("prompt", f"has {P} tokens; the context holds {context_length}")
        self.rows = PipelineRows(params, self.prompt_ids, vocab_size, list(eos_token_ids), self.W, seeds=seeds)
        self.seqs = [list(self.prompt_ids) for _ in range(self.W)]
        self.tables: list[list[int]] = [[] for _ in range(self.W)]
        self.live_rows = [True] * self.W
        self.stats = SpeculativeStats()
        self.per_round: list[list[int]] = []  # accepted drafts per round, per row
        self.rnd = 0
        self.requests: list = []  # the scheduler's visible requests, one per row
        self.reserved = 0
        self._pending = None  # (drafted, logq, counters) between prepare and commit
        self.done = self.aborted = False
        self._t0 = time.perf_counter()

    def prefill(self, sched) -> None:
        """Every prompt token but the last into the cache (the last opens the first verification), shared
        by the rows; the draft starts."""
        cache, P = sched.cache, len(self.prompt_ids)
        (table,), last = sched.prefill_prompts([self.prompt_ids], [P - 1])
        self.stats.target_forwards += last is not None
        self.tables = [cache.share(table) for _ in range(self.W)]
        cache.release(table)
        self.draft.start(self.seqs, self.cache_len)

    def round(self, sched) -> list:
        """One draft-and-verify round in a (g + 1)-token target forward of its own (where verification cannot
        ride in the scheduler's decode forward: see ``rides_decode``); returns the scheduler's events of the
        committed tokens."""
        tokens, positions, valid = self.prepare(sched)
        logits = sched.model(tokens, positions, sched.cache, valid=valid, logits_at="all",
                             block_tables=sched.cache.table_tensor(self.tables))  # [W, g + 1, V]
        return self.commit(sched, logits)

    def prepare(self, sched) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Propose this round's drafts and make their cache positions writable. Returns the verification
        input: tokens, positions (clamped into the cache) and valid, each [W, g + 1]; ``commit`` takes the
        target's logits at them."""
        cache, B, rows = sched.cache, self.W, self.rows
        lengths = torch.tensor([len(s) for s in self.seqs])
        g = max(1, min(self.gamma, int((self.cache_len - lengths).min()) - 1))  # room left in the caches
        counters = torch.full((B,), self.rnd * (self.gamma + 2), dtype=torch.long)
        drafted, logq = self.draft.propose(self.seqs, g, rows, counters)
        g = drafted.shape[1]
        tokens = torch.cat([torch.tensor([s[-1] for s in self.seqs]).view(B, 1), drafted], 1)  # [B, g + 1]
        positions = (lengths - 1).view(B, 1) + torch.arange(g + 1)
        for t, pos in zip(self.tables, positions.tolist(), strict=True):
            for p in pos:
                if p < self.cache_len:
                    cache.ensure_writable(t, p)
        self._pending = (drafted, logq, counters)
        return tokens, positions.clamp(max=self.cache_len - 1), positions < self.cache_len

    def commit(self, sched, logits: torch.Tensor) -> list:
        """Accept from the target's ``logits`` [W, g + 1, V] at the prepared positions, commit, and return the
        scheduler's events of the committed tokens."""
        cache, B, rows = sched.cache, self.W, self.rows
        (drafted, logq, counters), self._pending = self._pending, None
        g = drafted.shape[1]
        self.stats.target_forwards += 1
        n_acc, nxt = accept_round(logits, drafted, logq, rows, counters)
        raw = torch.log_softmax(logits.float(), dim=-1)
        events, committed, acc = [], [], n_acc.tolist()
        for b in range(B):
            r = self.requests[b]
            if not self.live_rows[b]:
                committed.append(0)
                continue
            new = drafted[b, : acc[b]].tolist() + [int(nxt[b])]
            self.stats.drafted += g
            self.stats.accepted += acc[b]
            take = 0
            for j, t in enumerate(new):
                k = r.params.logprobs
                top = None
                if k is not None:
                    vals, ids = raw[b, j].topk(k) if k else (raw[b, j][:0], raw[b, j][:0].long())
                    top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                events.append(sched._append(r, t, float(raw[b, j, t]), top))
                take += 1
                if r.finished:
                    self.live_rows[b] = False
                    break
            self.seqs[b].extend(new[:take])
            committed.append(take)
        for j in range(max(committed)):  # the committed tokens in the pipeline's penalty state
            col = torch.tensor([self.seqs[b][len(self.seqs[b]) - committed[b] + j] if j < committed[b] else 0
                                for b in range(B)])
            rows.append(col, active=torch.tensor([j < c for c in committed]))
        self.stats.generated += sum(committed)
        self.stats.rounds += 1
        self.per_round.append(acc)
        self.draft.commit(self.seqs, n_acc)
        self.rnd += 1
        if not any(self.live_rows):
            self.finish(cache)
        return events

    def live(self) -> int:
        return 0

    def finish(self, cache) -> None:
        for t in self.tables:
            cache.release(t)
        self.tables, self.done = [], True
        self.stats.seconds = time.perf_counter() - self._t0
        self.stats.draft_forwards = getattr(self.draft, "forwards", 0)

    def abort(self, cache) -> None:
        if cache is not None:
            for t in self.tables:
                cache.release(t)
        self.tables, self.done, self.aborted = [], True, True
