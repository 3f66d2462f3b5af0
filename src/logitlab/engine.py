"""Engine: model + tokenizer + scheduler, the single entry point for every front end.

    from logitlab import Engine, SamplingParams
    engine = Engine.load()                     # the default model, SmolLM2-135M-Instruct
    out = engine.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=0))
    print(out[0].choices[0].text)
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decoding.scheduler import Request, Scheduler, TokenEvent
from .model.gguf_model import set_activations
from .model.paged_cache import kv_budget_tokens
from .model.qblocks import ACTIVATION_LEVELS
from .model.store import load_or_build
from .model.transformer import Transformer
from .sampling import ParamError, SamplingParams
from .sampling.rng import derive_seed
from .tokenizer import Tokenizer
from .weights import DEFAULT_MODEL, load_gguf_model, load_weights
from .weights.registry import cache_dir

# "int8": weight-only int8 matmuls (model/quant.py); "gguf": the GGUF file's own quantized blocks
# (model/gguf_model.py; GGUF files only)
DTYPES = ("float32", "bfloat16", "int8", "gguf")
# dtypes only a GPU runs: "float16" (weights, activations and KV cache in half precision)
DEVICE_DTYPES = ("float16",)


def resolve_device(device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (or a torch.device) -> a torch.device; ParamError, one line, for anything
    else or for a GPU this machine does not have (checked before anything is loaded or allocated)."""
    text = str(device)
    if not isinstance(device, str | torch.device) or not (
            text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ParamError("device", f"must be cpu, cuda or cuda:N, got {device!r}")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamError("device", f"{text} was asked for but this machine has no usable CUDA device "
                                       f"(torch.cuda.is_available() is False; torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParamError("device", f"{text} does not exist (this machine has {torch.cuda.device_count()} "
                                       f"CUDA device(s))")
        if dev.index is None:  # "cuda": the current device, by number (as tensors report theirs)
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass
class Completion:
    """One sampled continuation (one of the ``n`` choices of a prompt)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list | None = None
    trace: list[dict] | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    prompt: str
    prompt_ids: list[int]
    choices: list[Completion] = field(default_factory=list)


@dataclass
class ScoreResult:
    """log P(text | context): per-token logprobs of ``text``'s tokens, their sum, and perplexity."""

    tokens: list[int]
    token_logprobs: list[float]
    # what the first token was predicted from: {"kind": "bos" | "eos" | "context" | "first_token", ...}
    conditioned_on: dict | None = None

    @property
    def total_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / max(1, len(self.tokens)))


def start_token(tokenizer) -> dict:
    """The token a text with no context is conditioned on (``Engine.score``, the summarization game): the
    tokenizer's BOS, or where it declares none its EOS (lm-eval-harness's ``prefix_token_id``); ``id`` None
    when it has neither."""
    for kind, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if tid is not None:
            return {"kind": kind, "token": tokenizer.decode([tid]), "id": int(tid)}
    return {"kind": "none", "token": None, "id": None}


def _keep_freed_memory() -> None:
    """Stop glibc from returning freed memory to the OS after every step: each decode step allocates
    [batch, vocab] tensors, and re-faulting their pages cost more than the sampling itself (~4-5 ms per
    step at batch 8, measured). Trim threshold 256 MiB; mmap threshold 32 MiB (glibc's maximum), so
    per-step tensors come from the heap and stay mapped. A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_mmap_threshold, 32 << 20)
    except (OSError, AttributeError):
        pass


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model",
                 max_batch: int = 32, max_len: int = 2048, use_cache: bool = True, kv_memory: float | None = None,
                 device: str | torch.device | None = None):
        """kv_memory: the KV cache's budget in GB (default: what ``max_batch`` sequences of ``max_len``
        tokens need, capped at half the memory available now: the host's, or the GPU's free memory). On the
        CPU the pool grows to it as blocks are used; on a GPU it is allocated whole.
        device: "cpu", "cuda" or "cuda:N"; the model is moved there (in place) when it is elsewhere. None:
        where the model is. The KV cache and the sampling pipeline run on the model's device."""
        if device is not None:
            dev = resolve_device(device)
            if model.device != dev:
                model.to(dev)
        _keep_freed_memory()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.config = model.config
        self.device = model.device
        self.max_len = min(max_len, self.config.context_length)
        if kv_memory is not None and not (isinstance(kv_memory, int | float) and 0 < kv_memory < 1e6):
            raise ParamError("kv_memory", f"must be a positive number of GB, got {kv_memory!r}")
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_len=self.max_len,
                                   use_cache=use_cache,
                                   kv_tokens=kv_budget_tokens(model.config, model.dtype, max_batch, self.max_len,
                                                              kv_memory, device=self.device))

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, dtype: str = "float32", exact_head: bool = False,
             device: str | torch.device = "cpu", activations: str | None = None, **kwargs) -> Engine:
        """Load a model by alias, ``.gguf`` path or Hugging Face directory. ``exact_head`` (gguf only): a
        float32 LM head, so the logits carry no activation rounding in the head. ``activations`` (gguf
        only): "int8" (default, llama.cpp's rounding) or "int8x2" (two int8 levels, about 16 bits: greedy
        text equal to float32's, prefill and large batches at about half the speed). ``device``: "cpu" (default),
        "cuda" or "cuda:N": the model, its KV cache and the sampling pipeline run there ("float16": GPU only;
        "gguf": CPU only). Everything is checked before anything is loaded."""
        if dtype not in DTYPES + DEVICE_DTYPES:
            raise ParamError("dtype", f"must be one of {', '.join(DTYPES + DEVICE_DTYPES)}, got {dtype!r}")
        dev = resolve_device(device)
        if dtype in DEVICE_DTYPES and dev.type == "cpu":
            raise ParamError("dtype", f"{dtype} runs on a GPU only (device cuda); on the CPU use bfloat16 or float32")
        if dtype == "gguf" and dev.type != "cpu":
            raise ParamError("dtype", f"gguf (block-quantized weights in native CPU kernels) runs on the CPU only; "
                                      f"on {dev} use float16, bfloat16 or int8")
        if exact_head and dtype != "gguf":
            raise ParamError("exact_head", f"applies to --dtype gguf only (the {dtype} head is not block-quantized)")
        if activations is not None and dtype != "gguf":
            raise ParamError("activations", f"applies to --dtype gguf only ({dtype} does not round activations)")
        if activations is not None and activations not in ACTIVATION_LEVELS:
            raise ParamError("activations", f"must be one of {', '.join(ACTIVATION_LEVELS)}, got {activations!r}")
        if dtype == "gguf":
            net, tokenizer, name = load_gguf_model(model, exact_head)
            return cls(set_activations(net, activations or "int8"), tokenizer, name=name, **kwargs)
        w = load_weights(model)
        # a GGUF file: for the gguf speculative draft (speculative.gguf_copy)
        source = w.source if w.source is not None and Path(w.source).is_file() else None
        if dtype == "float16":  # the float32 build (cached), halved on the device
            net = load_or_build(w.config, lambda: w.state_dict, "float32", w.source, cache_dir())
            net = net.to(dev, torch.float16)
        else:
            net = load_or_build(w.config, lambda: w.state_dict, dtype, w.source, cache_dir())
        net.gguf_source = source
        if dev.type == "cpu":  # (byte for byte the CPU engine as it always was)
            return cls(net, w.tokenizer, name=w.name, **kwargs)
        return cls(net, w.tokenizer, name=w.name, device=dev, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ---- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            V = self.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V]
            if bad:
                raise ParamError("prompt", f"token ids must be integers in [0, {V}), got {bad[0]!r}")
        if not ids:
            raise ParamError("prompt", "must not be empty")
        return ids

    def amateur(self, spec: str):
        """A contrastive amateur for ``make_requests``: K for ``early-exit:K`` (the model's own first K
        layers), else the named model, loaded once and kept (``contrastive.Amateur``, with a KV pool the
        size of this engine's)."""
        from .decoding.contrastive import Amateur, parse_amateur

        found = self.__dict__.setdefault("_amateurs", {}).get(spec)
        if found is not None:
            return found
        model, layers = parse_amateur(spec, self.model, lambda name: Engine.load(name).model)
        if layers:
            return layers
        cache = self.scheduler.cache
        tokens = (cache.capacity - 1) * cache.block_size if cache is not None else self.max_len
        found = self._amateurs[spec] = Amateur(model, tokens, name=spec)
        return found

    def make_requests(self, prompt: str | list[int], params: SamplingParams, constraint=None,
                      contrastive: tuple[object, float, float] | None = None) -> list[Request]:
        """Validate and turn one prompt into its ``n`` requests (one shared prefill). ``constraint``
        (a compiled ``decoding.constraints.Constraint``) restricts every sample to its grammar;
        ``contrastive`` = (amateur, alpha, amateur temperature) samples from contrastive scores against
        the model's own first K layers (amateur = K) or a separate model (``Engine.amateur(name)``), in the
        same batched step as everything else."""
        ids = self.encode_prompt(prompt)
        params.validate(self.vocab_size, context_length=self.max_len, prompt_len=len(ids),
                        eos_token_ids=sorted(self.tokenizer.eos_token_ids))
        self.scheduler.check_fits(len(ids), params.max_tokens)
        base = params.seed if params.seed is not None else secrets.randbits(63)
        group = next(_groups)
        if contrastive is not None:
            k, alpha, temp = contrastive
            if isinstance(k, int) and not 1 <= k < self.config.num_layers:
                raise ParamError("contrastive_amateur", f"early-exit:K needs 1 <= K < {self.config.num_layers}, "
                                                        f"got {k!r}")
            if not isinstance(k, int) and not hasattr(k, "logits"):
                raise ParamError("contrastive_amateur", f"must be early-exit:K or a model, got {k!r}")
            if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
                raise ParamError("contrastive_alpha", f"must be in (0, 1], got {alpha!r}")
            if not (isinstance(temp, int | float) and 0 < temp < 1e6):
                raise ParamError("amateur_temperature", f"must be > 0, got {temp!r}")
        return [Request(ids, params, derive_seed(base, i), group=group, index=i,
                        constraint=constraint.start() if constraint is not None else None,
                        contrastive=contrastive)
                for i in range(params.n)]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, constraint=None, contrastive=None) -> list[GenerationResult]:
        """Generate for one prompt or a batch of prompts (str or token ids), with one SamplingParams
        for all or one per prompt. All prompts run together in one continuous batch."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ParamError("params", f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        groups = [self.make_requests(p, sp, constraint, contrastive) for p, sp in zip(prompts, plist, strict=True)]
        for g in groups:
            self.scheduler.add(g)
        self._run([r for g in groups for r in g], progress)
        return [self._result(p, g) for p, g in zip(prompts, groups, strict=True)]

    def stream(self, prompt, params: SamplingParams | None = None, constraint=None) -> Iterator[TokenEvent]:
        """Yield one event per generated token (text delta, logprob, finish reason) as it is made."""
        requests = self.make_requests(prompt, params or SamplingParams(), constraint)
        self.scheduler.add(requests)
        mine = {r.id for r in requests}
        try:
            while any(not r.finished for r in requests):
                for ev in self.scheduler.step():
                    if ev.request.id in mine:
                        yield ev
        finally:  # the consumer stopped early: free the slots
            for r in requests:
                if not r.finished:
                    self.scheduler.abort(r)
            while any(not r.finished for r in requests):
                self.scheduler.step()

    def _run(self, requests: list[Request], progress: bool) -> None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(r.params.max_tokens for r in requests), unit="tok", leave=False)
        while any(not r.finished for r in requests):
            events = self.scheduler.step()
            if bar is not None:
                bar.update(sum(ev.token_id is not None for ev in events))
        if bar is not None:
            bar.close()

    def _result(self, prompt, requests: list[Request]) -> GenerationResult:
        res = GenerationResult(prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt),
                               requests[0].prompt_ids)
        for r in requests:
            res.choices.append(Completion(
                index=r.index, text=r.text, token_ids=list(r.output_ids), finish_reason=r.finish_reason,
                token_logprobs=r.token_logprobs,
                top_logprobs=r.top_logprobs if r.params.logprobs is not None else None,
                prompt_logprobs=r.prompt_logprobs, prompt_top_logprobs=r.prompt_top_logprobs,
                trace=r.trace if r.params.explain else None, error=r.error,
            ))
        return res

    # ---- the distribution itself -------------------------------------------------------------
    @torch.inference_mode()
    def next_token_logits(self, prompt: str | list[int]) -> torch.Tensor:
        """The model's raw next-token logits [V] after ``prompt``."""
        ids = self.encode_prompt(prompt)
        if len(ids) > self.max_len:
            raise ParamError("prompt", f"has {len(ids)} tokens; the context holds {self.max_len}")
        tokens = torch.tensor([ids])
        logits = self.model(tokens, torch.arange(len(ids)).unsqueeze(0))[0]
        return logits if logits.device.type == "cpu" else logits.to("cpu")  # [V]: on the host, wherever the model is

    @torch.inference_mode()
    def score(self, text: str, context: str | list[int] | None = None, progress: bool = False) -> ScoreResult:
        """log P(text | context), one logprob for every token of ``text``.

        Without a context (None or ""), the first token is predicted from a start token, as lm-eval-harness
        does: the model's BOS when the tokenizer declares one, else its end-of-text (EOS) token, which is what
        a document follows in a packed training stream. ``context`` may also be token ids, used as they are
        (no start token is added). The result's ``conditioned_on`` says what the text was conditioned on.
        Texts longer than the context window are scored with a sliding window that keeps half a window of
        history."""
        if context is not None and not isinstance(context, str):
            try:
                ctx = self.encode_prompt(list(context))  # validated ids
            except ParamError as e:
                raise ParamError("context", e.reason) from None
            target = self.tokenizer.encode(text, add_special_tokens=False)
            conditioned = {"kind": "context", "num_tokens": len(ctx)}
        elif context:
            ctx = self.tokenizer.encode(context)
            target = self.tokenizer.encode(text, add_special_tokens=False)
            conditioned = {"kind": "context", "text": context, "num_tokens": len(ctx)}
        else:
            target = self.tokenizer.encode(text, add_special_tokens=False)
            conditioned = start_token(self.tokenizer)
            if conditioned["id"] is not None:
                ctx = [conditioned["id"]]
            else:  # no BOS and no EOS: nothing to predict the first token from, so it is context, not scored
                ctx, target = target[:1], target[1:]
                conditioned = {"kind": "first_token", "id": ctx[0] if ctx else None,
                               "token": self.tokenizer.decode(ctx) if ctx else None}
        if not target:
            raise ParamError("text", "has no tokens to score")
        seq = ctx + target
        lps: list[float] = []
        window, stride = self.max_len, max(1, self.max_len // 2)
        starts = range(len(ctx), len(seq), stride) if len(seq) > window else [len(ctx)]
        bar = None
        if progress and len(starts) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(target), unit="tok", leave=False)
        for first in starts:  # predict seq[first : first + stride] from up to a window of history
            last = min(len(seq), first + stride) if len(seq) > window else len(seq)
            lo = max(0, last - window)
            chunk = torch.tensor([seq[lo:last]])
            logits = self.model(chunk, torch.arange(last - lo).unsqueeze(0), logits_at="all")[0]
            lp = torch.log_softmax(logits, dim=-1)
            pos = torch.arange(first - lo - 1, last - lo - 1, device=lp.device)
            lps += lp[pos].gather(1, torch.tensor(seq[first:last], device=lp.device)[:, None]).squeeze(1).tolist()
            if bar is not None:
                bar.update(last - first)
        if bar is not None:
            bar.close()
        return ScoreResult(target, lps, conditioned)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation as text, for display. To run it, use ``chat_prompt_ids``: re-encoding this text
        would read special tokens written in a message as real ones."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation's prompt ids: the template's markup as special tokens, message content as text
        (so ``<|im_end|><|im_start|>system`` in a user message cannot open a system turn)."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)


_groups = iter(range(1 << 62))


def next_group() -> int:
    """A fresh group id (requests of one group share a prefill: the n samples, a beam search's hypotheses)."""
    return next(_groups)
