"""The ``train`` command's flags: one argparse definition for ``logitlab train`` and ``python -m logitlab.train``.

Bad input prints one line ``error: <field>: <reason>`` (from rank 0 only under torchrun) and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .loop import DEFAULT_DTYPE


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="text file, folder of text files, or JSONL with a 'text' field (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where the checkpoint goes (a Hugging Face GPT-2 directory every logitlab command loads)")
    p.add_argument("--preset", default="tiny", help="model shape: micro, tiny, small, medium, gpt2-small-shape")
    p.add_argument("--direction", default="forward", help="forward | backward (predict the previous token)")
    p.add_argument("--tokenizer", default="bytes", help="bytes | bpe:N (byte-level BPE with N tokens)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=16,
                   help="sequences per optimizer step, over all processes and micro-batches")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches the batch is cut into (memory)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 10)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at lr * this")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data split and batch order")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default=DEFAULT_DTYPE,
                   help=f"float32 | bfloat16 (autocast); default {DEFAULT_DTYPE}, the faster on this CPU")
    p.add_argument("--norm-placement", default="pre", help="pre | post (the original Transformer's)")
    p.add_argument("--packing", default="packed", help="packed (documents concatenated) | padded (one per row)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate and checkpoint every K steps")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace):
    from .loop import TrainConfig

    return TrainConfig(
        data=list(a.data), out=a.out, preset=a.preset, direction=a.direction, tokenizer=a.tokenizer,
        seq_len=a.seq_len, batch=a.batch, steps=a.steps, lr=a.lr, seed=a.seed, device=a.device, resume=a.resume,
        eval_every=a.eval_every, eval_batches=a.eval_batches, grad_accum=a.grad_accum, warmup=a.warmup,
        min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
        norm_placement=a.norm_placement, packing=a.packing, dtype=a.dtype, progress=not a.no_progress,
        val_fraction=a.val_fraction)


def cmd_train(a: argparse.Namespace) -> int:
    from .loop import train

    res = train(config_from_args(a))
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.metrics[-1] if res.metrics else {}
        print(f"wrote {res.out}: step {last.get('step')}, train loss {last.get('train_loss', float('nan')):.4f}, "
              f"val loss {res.final_val_loss:.4f} nats/token", file=sys.stderr)
    return 0


def add_train_command(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train a GPT-2-architecture model from scratch on text files")
    _add_flags(t)
    t.set_defaults(func=cmd_train)
    return t


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise _ArgError(f"arguments: {message}")


def main(argv: list[str] | None = None) -> int:
    """``python -m logitlab.train``: the same flags as ``logitlab train``."""
    p = _Parser(prog="python -m logitlab.train", description="Train a GPT-2-architecture model from scratch.")
    _add_flags(p)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun every rank fails alike: one message
    try:
        return cmd_train(p.parse_args(sys.argv[1:] if argv is None else argv))
    except (_ArgError, ValueError, OSError) as e:
        if not quiet:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}" if ":" in msg.split(" ")[0] else f"error: input: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
