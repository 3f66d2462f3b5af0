"""Using the distribution itself: exact choice among strings, and few-shot prompting as a classifier.

Choice (exact): the log-probability of each whole choice given the prompt,

    log P(c | prompt) = sum_j log p(c_j | prompt, c_<j)

compared across choices — not just its first token, which would e.g. confuse "New York" with "New Delhi".
The prompt is run once, its KV cache is copied to one slot per choice, and every choice is scored in ONE
batched forward. ``probs`` are the choice probabilities renormalised over the choices
(softmax of the logprobs); ``temperature > 0`` samples a choice from softmax(logprob / T).

Few-shot classification (seed 000): labelled examples become a pattern the model continues,

    I loved the movie : Positive
    It was way too long : Negative
    The leading actress did a wonderful job. :

and the label probabilities are the exact choice probabilities of " Positive", " Negative", ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .model.cache import KVCache
from .sampling import ParamError


def _split(model_or_engine):
    if hasattr(model_or_engine, "tokenizer") and hasattr(model_or_engine, "model"):
        return model_or_engine.model, model_or_engine.tokenizer
    return model_or_engine, None


def _ids(tokenizer, x, field_name: str, special: bool) -> list[int]:
    if isinstance(x, str):
        if tokenizer is None:
            raise ParamError(field_name, "text needs an Engine (a bare model takes token ids)")
        return list(tokenizer.encode(x, add_special_tokens=special))
    return [int(t) for t in x]


@torch.inference_mode()
def continuation_logprobs(model_or_engine, prefix, continuations: Sequence) -> list[list[float]]:
    """Per-token log-probabilities of each continuation after ``prefix`` (text or ids): one prefill, then
    all continuations in one batched forward over copies of the prefix's cache."""
    from .decoding.yield_point import yield_point

    yield_point()  # on the server: the scheduler steps before each choice scoring (n samples: n of them)
    model, tok = _split(model_or_engine)
    pre = _ids(tok, prefix, "prompt", special=True)
    conts = [_ids(tok, c, "choice", special=False) for c in continuations]
    if not pre:
        raise ParamError("prompt", "must not be empty")
    if not conts or any(not c for c in conts):
        raise ParamError("choice", "every choice needs at least one token")
    P, C, Lmax = len(pre), len(conts), max(len(c) for c in conts)
    ctx = model.config.context_length
    if P + Lmax > ctx:
        raise ParamError("prompt", f"prompt ({P}) + longest choice ({Lmax}) exceeds the context length {ctx}")
    cache = KVCache(model.config, C, P + Lmax, dtype=model.dtype)
    last = model(torch.tensor([pre]), torch.arange(P).unsqueeze(0), cache, rows=slice(0, 1))  # [1, V]
    for c in range(1, C):
        cache.copy_slot(0, c, P)
    tokens = torch.zeros(C, Lmax, dtype=torch.long)
    valid = torch.zeros(C, Lmax, dtype=torch.bool)
    for i, c in enumerate(conts):
        tokens[i, : len(c)] = torch.tensor(c)
        valid[i, : len(c)] = True
    positions = (P + torch.arange(Lmax)).expand(C, -1)
    out = []
    lp0 = torch.log_softmax(last[0].float(), -1)
    if Lmax > 1:
        logits = model(tokens[:, :-1], positions[:, :-1], cache, rows=slice(0, C), valid=valid[:, :-1],
                       logits_at="all")  # [C, Lmax-1, V]: the prediction of token j+1
        lp = torch.log_softmax(logits.float(), -1)
    for i, c in enumerate(conts):
        vals = [float(lp0[c[0]])]
        vals += [float(lp[i, j, c[j + 1]]) for j in range(len(c) - 1)]
        out.append(vals)
    return out


@dataclass
class ChoiceResult:
    index: int
    choice: str | list[int]
    logprobs: list[float]  # log P(choice | prompt), summed over the choice's tokens
    probs: list[float]  # renormalised over the choices
    num_tokens: list[int]


def choose(model_or_engine, prompt, choices: Sequence, temperature: float = 0.0, seed: int | None = None,
           normalize: str = "sum") -> ChoiceResult:
    """Pick among ``choices`` (strings with an Engine, or token-id lists) by full-sequence probability.
    ``normalize="mean"`` compares mean per-token logprobs instead (less bias toward short choices)."""
    if not choices:
        raise ParamError("choice", "needs at least one choice")
    if normalize not in ("sum", "mean"):
        raise ParamError("normalize", f"must be 'sum' or 'mean', got {normalize!r}")
    if not temperature >= 0:
        raise ParamError("temperature", f"must be >= 0, got {temperature!r}")
    per_token = continuation_logprobs(model_or_engine, prompt, choices)
    return rank_choices(choices, per_token, temperature, seed, normalize)


def rank_choices(choices: Sequence, per_token: list[list[float]], temperature: float = 0.0,
                 seed: int | None = None, normalize: str = "sum") -> ChoiceResult:
    """The pick among ``choices`` from their per-token log-probabilities (``continuation_logprobs``): the
    argmax at temperature 0, else a draw from softmax(score / T) seeded by ``seed``."""
    totals = [sum(v) for v in per_token]
    keys = totals if normalize == "sum" else [t / len(v) for t, v in zip(totals, per_token, strict=True)]
    k = torch.tensor(keys, dtype=torch.float64)
    probs = torch.softmax(k, 0)
    if temperature == 0:
        index = int(k.argmax())
    else:
        g = torch.Generator().manual_seed(seed if seed is not None else 0)
        index = int(torch.multinomial(torch.softmax(k / temperature, 0), 1, generator=g))
    return ChoiceResult(index, choices[index], totals, probs.tolist(), [len(v) for v in per_token])


# ---- few-shot classification -------------------------------------------------------------------------

def parse_example(s: str) -> tuple[str, str]:
    """``"TEXT=LABEL"`` (split at the last '=')."""
    if "=" not in s:
        raise ParamError("example", f"expected TEXT=LABEL, got {s!r}")
    text, label = s.rsplit("=", 1)
    if not text.strip() or not label.strip():
        raise ParamError("example", f"expected TEXT=LABEL with both parts non-empty, got {s!r}")
    return text.strip(), label.strip()


@dataclass
class Classification:
    input: str
    label: str
    probs: dict[str, float]  # label -> probability (renormalised over the labels)
    logprobs: dict[str, float] = field(default_factory=dict)  # label -> log P(" label" | prompt)
    prompt: str = ""


class FewShotClassifier:
    """Build the "text : label" pattern from labelled examples; classify by the exact probability of each
    label as the continuation. ``separator`` sits between text and label, ``joiner`` between examples."""

    def __init__(self, examples: Sequence[tuple[str, str]], labels: Sequence[str] | None = None,
                 separator: str = " :", joiner: str = "\n", instruction: str = ""):
        if not examples:
            raise ParamError("example", "give at least one labelled example")
        self.examples = [(str(t), str(lab)) for t, lab in examples]
        self.labels = list(dict.fromkeys(labels or [lab for _, lab in self.examples]))
        if len(self.labels) < 2:
            raise ParamError("labels", "need at least two distinct labels")
        self.separator, self.joiner, self.instruction = separator, joiner, instruction

    def prompt(self, text: str) -> str:
        lines = [f"{t}{self.separator} {lab}" for t, lab in self.examples] + [f"{text}{self.separator}"]
        return (self.instruction + self.joiner if self.instruction else "") + self.joiner.join(lines)

    def classify(self, engine, inputs: Sequence[str]) -> list[Classification]:
        out = []
        for text in inputs:
            prompt = self.prompt(text)
            res = choose(engine, prompt, [" " + lab for lab in self.labels])
            out.append(Classification(
                input=text, label=self.labels[res.index],
                probs=dict(zip(self.labels, res.probs, strict=True)),
                logprobs=dict(zip(self.labels, res.logprobs, strict=True)), prompt=prompt))
        return out


def classify(engine, examples: Sequence[tuple[str, str] | str], inputs: Sequence[str],
             labels: Sequence[str] | None = None, **fmt) -> list[Classification]:
    """Few-shot classification: ``examples`` as (text, label) pairs or "TEXT=LABEL" strings."""
    pairs = [parse_example(e) if isinstance(e, str) else e for e in examples]
    if not inputs:
        raise ParamError("input", "give at least one text to classify")
    return FewShotClassifier(pairs, labels, **fmt).classify(engine, inputs)


def entropy_bits(probs: dict[str, float]) -> float:
    return -sum(p * math.log2(p) for p in probs.values() if p > 0)
