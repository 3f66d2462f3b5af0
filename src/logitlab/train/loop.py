"""Train a GPT-2-architecture model from scratch: teacher forcing, AdamW, warm-up + cosine, DDP.

One optimizer step, whatever the number of processes or micro-batches:

    G rows (--batch) = the global batch of step s, a pure function of (seed, s)   (data.TrainOrder)
    rank r of W takes rows r*G/W .. (r+1)*G/W, cut into --grad-accum micro-batches
    loss  = sum of token NLLs over the global batch / N (its number of target tokens)
    grads: each micro-batch backpropagates  W * nll_sum / N;  DDP averages over the W ranks
    clip the global gradient norm; lr = lr_at(s); AdamW (weight decay on 2-D weights only)

so 1 process and W processes (or 1 and k micro-batches) follow the same trajectory up to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from . import checkpoint
from .data import (
    IGNORE,
    TrainOrder,
    collate,
    for_direction,
    load_texts,
    make_samples,
    parse_tokenizer_spec,
    save_tokenizer,
    split_corpus,
)
from .data import build_tokenizer as _build_tokenizer

# Model shapes (vocab comes from the tokenizer). "small" is nanoGPT's Shakespeare-char model;
# "gpt2-small-shape" is GPT-2 124M's shape.
PRESETS: dict[str, dict] = {
    "micro": dict(num_layers=1, hidden_size=32, num_heads=2, context_length=64),
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, context_length=256),
    "small": dict(num_layers=6, hidden_size=384, num_heads=6, context_length=256),
    "medium": dict(num_layers=8, hidden_size=512, num_heads=8, context_length=512),
    "gpt2-small-shape": dict(num_layers=12, hidden_size=768, num_heads=12, context_length=1024),
}
DIRECTIONS = ("forward", "backward")
PACKINGS = ("packed", "padded")
DTYPES = ("float32", "bfloat16")
# Measured on this machine's CPU (tiny and small presets, see the report of issue 8): bfloat16 autocast
# was slower than float32 there, so float32 is the default; on a GPU pass --dtype bfloat16.
DEFAULT_DTYPE = "float32"
# Settings a resumed run must share with the checkpoint (the others -- steps, evaluation, device, dtype,
# grad_accum and the number of processes -- may change without changing what the run computes).
RESUME_KEYS = ("preset", "direction", "tokenizer", "seq_len", "batch", "lr", "seed", "warmup", "min_lr_ratio",
               "weight_decay", "grad_clip", "norm_placement", "packing", "val_fraction")


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)
    out: Path | str | None = None
    preset: str = "tiny"
    direction: str = "forward"
    tokenizer: str = "bytes"
    seq_len: int = 128
    batch: int = 16  # sequences per optimizer step, over all processes and micro-batches
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    grad_accum: int = 1  # micro-batches per step (per process): memory, not maths
    warmup: int | None = None  # steps of linear warm-up; None: steps // 10
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    norm_placement: str = "pre"
    packing: str = "packed"
    dtype: str = DEFAULT_DTYPE  # "bfloat16": autocast the forward pass
    progress: bool = True
    val_fraction: float = 0.1

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    def validate(self, world: int = 1) -> None:
        """Every setting a user can give, checked before any work: ValueError('field: reason')."""
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        need(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        need(self.direction in DIRECTIONS, "direction", "must be forward or backward")
        need(self.packing in PACKINGS, "packing", "must be packed or padded")
        need(self.norm_placement in ("pre", "post"), "norm_placement", "must be pre or post")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        need(self.device in ("cpu", "cuda") or str(self.device).startswith("cuda:"), "device", "must be cpu or cuda")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device: CUDA is not available on this machine")
        for name in ("seq_len", "batch", "steps", "eval_every", "eval_batches", "grad_accum"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        context = PRESETS[self.preset]["context_length"]
        if self.seq_len > context:
            raise ValueError(f"seq_len: {self.seq_len} is longer than the {self.preset} preset's position table "
                             f"({context} positions)")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.warmup is None or (isinstance(self.warmup, int) and self.warmup >= 0), "warmup",
             "must be an integer >= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        need(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        if isinstance(self.tokenizer, str):
            parse_tokenizer_spec(self.tokenizer)
        if self.batch % (world * self.grad_accum):
            raise ValueError(f"batch: {self.batch} sequences do not split evenly into {world} process(es) x "
                             f"{self.grad_accum} micro-batch(es)")
        if self.resume and not self.out:
            raise ValueError("resume: needs --out, the directory of the run to continue")


@dataclass
class TrainResult:
    out: Path | None
    metrics: list[dict]
    final_val_loss: float
    model: Transformer
    tokenizer: Tokenizer
    losses: list[float] = field(default_factory=list)  # the training loss of every step, nats/token


# ---- the pieces ------------------------------------------------------------------------------------

def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    p = PRESETS[cfg.preset]
    c, h = p["hidden_size"], p["num_heads"]
    return ModelConfig(vocab_size=vocab_size, hidden_size=c, intermediate_size=4 * c, num_layers=p["num_layers"],
                       num_heads=h, num_kv_heads=h, head_dim=c // h, context_length=p["context_length"],
                       rms_norm_eps=1e-5, tie_word_embeddings=True, architecture="gpt2", norm="layernorm",
                       norm_placement=cfg.norm_placement, position="learned", mlp="gelu_tanh", bias=True)


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2's initialisation, drawn from torch.manual_seed(seed): weights N(0, 0.02), the projections
    into the residual stream (o_proj, down_proj) N(0, 0.02 / sqrt(2 L)) so the residual's variance does
    not grow with depth, biases 0, norm gains 1."""
    torch.manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, 0.02)


def build_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    """The initialised model of a run, on the CPU (so the same seed gives the same weights anywhere)."""
    model = Transformer(model_config(cfg, vocab_size))
    init_weights(model, cfg.seed)
    return model.train()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, projections); biases and norm gains are
    not decayed. Parameters in named_parameters order (the tied LM head is the embedding)."""
    params = list(model.named_parameters())
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr over ``warmup`` steps, then a cosine from lr down to lr * min_lr_ratio,
    reached at the last step."""
    w, lr, low = cfg.warmup_steps, cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < w:
        return lr * (step + 1) / w
    progress = min(1.0, (step - w) / max(1, cfg.steps - 1 - w))
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - low)


def token_nll(model, batch, device) -> torch.Tensor:
    """Sum of -log p(target) over the batch's target tokens (teacher forcing)."""
    logits = model(batch.inputs.to(device), batch.positions.to(device),
                   valid=None if batch.valid is None else batch.valid.to(device), logits_at="all")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.to(device).reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class _Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on GPU."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def check_same(self, what: str, digest: str) -> None:
        """Every rank must see the same data and tokenizer (a rank with other files would train on them)."""
        if self.world == 1:
            return
        h = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=self.device)
        lo, hi = h.clone(), h.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise ValueError(f"{what}: the processes of this run read different {what}")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owned:
            torch.distributed.destroy_process_group()


@torch.no_grad()
def evaluate(model, val_samples, cfg: TrainConfig, pad_id: int, dist: _Dist) -> float:
    """Mean NLL per target token over the first ``eval_batches * batch`` validation rows (a fixed set),
    split over the ranks."""
    model.eval()
    n = min(val_samples.count, cfg.eval_batches * cfg.batch)
    mine = list(range(dist.rank, n, dist.world))
    total, count = 0.0, 0
    for i in range(0, len(mine), cfg.batch):
        batch = collate([val_samples.get(j) for j in mine[i: i + cfg.batch]], pad_id,
                        backward=cfg.direction == "backward")
        with _autocast(cfg, dist.device):
            total += float(token_nll(model, batch, dist.device))
        count += batch.num_targets
    model.train()
    total, count = dist.sum(total, count)
    return total / max(count, 1)


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


# ---- what a run leaves on disk ------------------------------------------------------------------

def _export_model(model: Transformer, out: Path, cfg: TrainConfig) -> None:
    """config.json + model.safetensors (a Hugging Face GPT-2 directory), each file replaced atomically."""
    from ..weights.gpt2 import save_gpt2_dir

    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".export."))
    try:
        save_gpt2_dir(model, tmp, extra={"direction": cfg.direction, "norm_placement": cfg.norm_placement,
                                         "trained_with": "logitlab train"})
        for f in sorted(tmp.iterdir(), key=lambda f: f.name != "model.safetensors"):  # weights first
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    checkpoint.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["train_loss"] for m in metrics], marker=".", label="train")
    ax.plot(steps, [m["val_loss"] for m in metrics], marker=".", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")


def _settings(cfg: TrainConfig, tokenizer_given: bool) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k in RESUME_KEYS}
    if tokenizer_given:
        d["tokenizer"] = "given"
    return d


# ---- the run ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, texts: list[str] | None = None, tokenizer: Tokenizer | None = None,
          on_step=None) -> TrainResult:
    """Train (or with ``cfg.resume`` continue) a run; ``texts`` override ``cfg.data``, a ``tokenizer``
    overrides ``cfg.tokenizer``. ``on_step(step, loss)`` is called after every optimizer step (and its
    checkpoint, if it had one)."""
    dist = _Dist(cfg.device)
    try:
        result = _train(cfg, texts, tokenizer, on_step, dist)
        dist.barrier()  # no rank leaves (and tears the group down) while another still writes
        return result
    finally:
        dist.close()


def _prepare_out(cfg: TrainConfig, dist: _Dist) -> Path | None:
    if not cfg.out:
        return None
    out = Path(cfg.out)
    checkpoint.check_out_dir(out)
    if cfg.resume and checkpoint.latest_step(out) is None:
        raise ValueError(f"resume: {out} holds no checkpoint to resume from")
    return out


def _train(cfg: TrainConfig, texts, tokenizer, on_step, dist: _Dist) -> TrainResult:
    cfg.validate(dist.world)
    out = _prepare_out(cfg, dist)
    texts = load_texts(cfg.data) if texts is None else [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("data: no text given")
    given = tokenizer is not None
    if tokenizer is None:
        # resuming: the tokenizer the run was trained with (a BPE is not retrained)
        tokenizer = Tokenizer.from_hf_dir(out) if cfg.resume else _build_tokenizer(cfg.tokenizer, texts)
    corpus = split_corpus(texts, tokenizer, cfg.seed, cfg.val_fraction)
    fingerprint = corpus.fingerprint()
    dist.check_same("data", fingerprint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_samples = make_samples(corpus.train, cfg.seq_len, cfg.packing)
    val_samples = make_samples(corpus.val, cfg.seq_len, cfg.packing, for_eval=True)
    if train_samples.n < 1:
        raise ValueError(f"data: the training split has {sum(map(len, corpus.train))} tokens, fewer than "
                         f"--seq-len + 1 = {cfg.seq_len + 1}; use a smaller --seq-len or more text")
    if val_samples.count < 1:
        raise ValueError("data: the validation split has no tokens to score; give more text")
    order = TrainOrder(train_samples, cfg.seed, cfg.batch)
    backward = cfg.direction == "backward"

    model = build_model(cfg, tokenizer.vocab_size).to(dist.device)
    optimizer = make_optimizer(model, cfg)
    settings = _settings(cfg, given)
    start, metrics, losses, tokens, elapsed0 = 0, [], [], 0, 0.0
    if cfg.resume:
        meta = checkpoint.read_meta(out)
        for k in RESUME_KEYS:
            if meta["settings"].get(k) != settings[k]:
                raise ValueError(f"resume: {k} is {settings[k]!r} but the checkpoint in {out} was trained with "
                                 f"{meta['settings'].get(k)!r}")
        if meta["data"] != fingerprint:
            raise ValueError(f"resume: the data (or tokenizer) differs from the run in {out}")
        meta = checkpoint.load(out, model, optimizer)
        start, metrics, losses = meta["step"], meta["metrics"], meta["losses"]
        tokens, elapsed0 = meta["tokens"], meta["elapsed_s"]
    elif out is not None and dist.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.clear_state(out)
        for stale in ("metrics.jsonl", "loss.png", "model.safetensors", "config.json"):  # an old run's
            (out / stale).unlink(missing_ok=True)
        checkpoint.write_marker(out, {"settings": settings, "data": [str(p) for p in cfg.data]})
        save_tokenizer(tokenizer, out, cfg.direction, model.config.context_length)

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    per_rank = cfg.batch // dist.world
    micro = per_rank // cfg.grad_accum
    params = list(model.parameters())

    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    t0, run_tokens = time.perf_counter(), 0
    step = start
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_global = order.num_targets(step)
            nll_sum = 0.0
            for a in range(cfg.grad_accum):
                lo = dist.rank * per_rank + a * micro
                batch = collate(order.rows(step, lo, lo + micro), pad_id, backward)
                last = a == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if dist.world == 1 or last else net.no_sync()
                with sync:
                    with _autocast(cfg, dist.device):
                        nll = token_nll(net, batch, dist.device)
                    (nll * (dist.world / n_global)).backward()
                nll_sum += float(nll.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            (nll_sum,) = dist.sum(nll_sum)
            loss = nll_sum / n_global
            losses.append(loss)
            tokens += n_global
            run_tokens += n_global
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{run_tokens / (time.perf_counter() - t0):.0f}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val = evaluate(model, val_samples, cfg, pad_id, dist)
                since = losses[metrics[-1]["step"] if metrics else 0:]
                metrics.append({"step": done, "tokens": tokens, "train_loss": sum(since) / len(since),
                                "val_loss": val, "lr": lr,
                                "elapsed_s": round(elapsed0 + time.perf_counter() - t0, 3)})
                if bar is not None:
                    bar.write(f"step {done}: train {metrics[-1]['train_loss']:.4f}  val {val:.4f} nats/token")
                if out is not None and dist.main:
                    checkpoint.save(out, done, model, optimizer, {
                        "settings": settings, "data": fingerprint, "metrics": metrics, "losses": losses,
                        "tokens": tokens, "elapsed_s": metrics[-1]["elapsed_s"]})
                    _export_model(model, out, cfg)
                    _write_metrics(out, metrics)
            if on_step is not None:
                on_step(done, loss)
    except KeyboardInterrupt:
        if dist.main and out is not None:
            last = checkpoint.latest_step(out)
            where = f"the checkpoint of step {last} in {out} is intact" if last else "no checkpoint was written yet"
            print(f"interrupted at step {step + 1}: {where} (--resume continues from it)", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    if not given:  # as Engine.load(out) reads it back
        tokenizer = for_direction(tokenizer, cfg.direction)
    final = metrics[-1]["val_loss"] if metrics else float("nan")
    return TrainResult(out, metrics, final, model, tokenizer, losses)
