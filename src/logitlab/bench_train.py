"""``logitlab bench --train``: training tokens/s of logitlab's GPT-2 against transformers' GPT2LMHeadModel.

Both models have the same shape, the same starting weights (ours are converted from theirs), the same
batch, the same AdamW and the same loss; one training step is forward, cross-entropy, backward, gradient
clipping and an optimizer step. The two are timed in alternating rounds in one process, so a noisy
neighbour slows both alike; the ratio is what counts.

Model FLOPs utilisation uses PaLM's count, ``6 N + 12 L C T`` FLOPs per token (N: parameters of every
matmul, the tied LM head included; the second term is attention's scores and weighted sum), against the
GEMM peak measured in the same run with one large matmul in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

# GPT-2 small's proportions (head size 64, MLP 4x) at sizes that train in seconds here
SHAPES = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096),
    "small-6l": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


def _models(shape: dict, seq_len: int):
    import transformers

    from .model.transformer import Transformer
    from .weights.gpt2 import config_from_hf_gpt2, hf_gpt2_to_ours

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, **shape)
    hf_cfg._attn_implementation = "sdpa"  # transformers' fastest attention on CPU
    hf = transformers.GPT2LMHeadModel(hf_cfg).train()
    config = config_from_hf_gpt2(hf_cfg.to_dict())
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}  # own storage: two optimizers
    ours = Transformer.from_state_dict(config, hf_gpt2_to_ours(state, config)).train()
    return ours, hf


def _step_fn(model, kind: str, opt, tokens, autocast):
    B, T = tokens.shape
    positions = torch.arange(T).expand(B, T)

    def step():
        with autocast():
            if kind == "ours":
                logits = model(tokens, positions, logits_at="all")
            else:
                logits = model(tokens).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """GFLOP/s of one n x n x n matmul in ``dtype`` (best of ``reps``): the GEMM peak MFU is read against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_positions" not in n)
    return 6 * matmul_params + 12 * c.num_layers * c.hidden_size * seq_len


def run(shape_name: str = "small-6l", batch: int = 8, seq_len: int = 256, rounds: int = 3, steps: int = 2,
        dtype: str = "float32", threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    ours, hf = _models(SHAPES[shape_name], seq_len)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.config.vocab_size, (batch, seq_len), generator=g)
    low = torch.bfloat16 if dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast("cpu", dtype=low)) if low else nullcontext
    fns = {}
    for kind, model in (("ours", ours), ("transformers", hf)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False, foreach=True)
        fns[kind] = _step_fn(model, kind, opt, tokens, autocast)
    first = {k: f() for k, f in fns.items()}  # warm-up; also: the two start from the same weights
    times = {k: 0.0 for k in fns}
    for _ in range(rounds):  # alternate, so drift on a shared machine hits both
        for kind, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[kind] += time.perf_counter() - t0
    n_tok = batch * seq_len * rounds * steps
    res = {"shape": shape_name, **SHAPES[shape_name], "batch": batch, "seq_len": seq_len, "dtype": dtype,
           "threads": torch.get_num_threads(), "steps_timed": rounds * steps,
           "first_loss_ours": first["ours"], "first_loss_transformers": first["transformers"]}
    for kind in fns:
        res[f"{kind}_train_tok_s"] = n_tok / times[kind]
    res["ratio_vs_transformers"] = res["ours_train_tok_s"] / res["transformers_train_tok_s"]
    fpt = flops_per_token(ours, seq_len)
    res["gflop_per_token"] = fpt / 1e9
    res["peak_gemm_gflop_s"] = matmul_peak(low or torch.float32)
    for kind in fns:
        res[f"{kind}_mfu"] = res[f"{kind}_train_tok_s"] * fpt / 1e9 / res["peak_gemm_gflop_s"]
    return res


def report(res: dict) -> str:
    lines = [f"{k:<28} {v:10.4g}" if isinstance(v, float) else f"{k:<28} {v}" for k, v in res.items()]
    return "\n".join(lines + ["", f"training tokens/s vs transformers (same run): {res['ratio_vs_transformers']:.2f}x",
                              f"model FLOPs utilisation: ours {res['ours_mfu']:.1%}, "
                              f"transformers {res['transformers_mfu']:.1%}"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="logitlab bench --train",
                                description="training throughput: logitlab's GPT-2 vs transformers' GPT2LMHeadModel")
    p.add_argument("--shape", default="small-6l", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per model per round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    for name in ("batch", "seq_len", "rounds", "steps"):
        if not 1 <= getattr(a, name) <= 4096:
            raise ValueError(f"{name}: must be in [1, 4096], got {getattr(a, name)}")
    print(f"logitlab bench --train: shape={a.shape} batch={a.batch} seq_len={a.seq_len} dtype={a.dtype}",
          file=sys.stderr)
    res = run(a.shape, a.batch, a.seq_len, a.rounds, a.steps, a.dtype, a.threads)
    print(report(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
