"""The arrow-of-time experiments (seed 001): the same model trained forwards and backwards on the same data.

For each seed, one tokenizer (built once from the training documents) and two runs of ``train(...)`` that differ
only in ``direction``: the train API then gives both the same val split and the same batches, the backward run
seeing each batch flipped along time. Reported per direction, over the seeds: the final validation loss (nats per
token, the train API's own number), and on documents held out of training altogether the loss again and, for
``p1*p2=n`` / ``x=y`` lines, the exact-match accuracy of greedily completing the part after ``=`` (backwards: the
reversed sequence, so the model completes the reversed factors given the reversed ``=n``).

The summary's ``gap`` is (mean backward - mean forward) / mean forward of the validation losses. Its ``ci95``:
with K >= 2 seeds, the Student-t interval (K - 1 degrees of freedom) of the K per-seed relative gaps; with K = 1,
gap +- 1.96 standard errors, the standard error being that of the relative gap over 2000 paired bootstrap
resamples of the held-out documents (each resample scores the same documents in both directions).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import TEXT_DATASETS, AotDataset, fetch_text_dataset, known_datasets, make_dataset

DIRECTIONS = ("forward", "backward")

# Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the Cornish-Fisher expansion, error < 1e-4).
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"seeds: a t-interval needs at least 2 seeds, got {df + 1}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


# ---- the summary's statistics ---------------------------------------------------------------------

def summarize(forward: list[float], backward: list[float], bootstrap_gaps: list[float] | None = None) -> dict:
    """Mean and spread of the per-seed validation losses, the relative gap and its 95% interval (see the module
    docstring). ``bootstrap_gaps`` (relative gaps of resamples) is only needed, and only used, when K = 1."""
    fw, bw = np.asarray(forward, float), np.asarray(backward, float)
    if len(fw) != len(bw) or len(fw) == 0:
        raise ValueError("seeds: need one forward and one backward loss per seed")
    k = len(fw)
    mean_fw, mean_bw = float(fw.mean()), float(bw.mean())
    gap = (mean_bw - mean_fw) / mean_fw
    per_seed = (bw - fw) / fw
    if k >= 2:
        half = t975(k - 1) * float(per_seed.std(ddof=1)) / math.sqrt(k)
        centre, method = float(per_seed.mean()), f"t-interval of the {k} per-seed relative gaps (df={k - 1})"
    else:
        if not bootstrap_gaps:
            raise ValueError("seeds: with one seed the interval needs bootstrap resamples of held-out documents")
        half = 1.96 * float(np.std(bootstrap_gaps, ddof=1))
        centre = gap
        method = f"gap +- 1.96 bootstrap SE ({len(bootstrap_gaps)} paired resamples of held-out documents)"

    def spread(x: np.ndarray) -> float:
        return float(x.std(ddof=1)) if len(x) > 1 else 0.0

    return {
        "forward": {"val_loss": mean_fw, "std": spread(fw), "per_seed": fw.tolist()},
        "backward": {"val_loss": mean_bw, "std": spread(bw), "per_seed": bw.tolist()},
        "gap": gap,
        "ci95": [centre - half, centre + half],
        "ci95_method": method,
        "gap_per_seed": per_seed.tolist(),
    }


def paired_bootstrap_gaps(nll_fw: np.ndarray, nll_bw: np.ndarray, counts: np.ndarray, draws: int = 2000,
                          seed: int = 0) -> list[float]:
    """Relative gaps (bw - fw) / fw of per-token losses over documents resampled with replacement (the same
    documents for both directions: the two losses are paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(draws, len(counts)))
    fw = nll_fw[idx].sum(1) / counts[idx].sum(1)
    bw = nll_bw[idx].sum(1) / counts[idx].sum(1)
    return ((bw - fw) / fw).tolist()


# ---- scoring a trained model on held-out documents --------------------------------------------------

def frame(tok, texts: list[str], direction: str) -> list[np.ndarray]:
    """``<|bos|> ids <|eos|>`` as in training (train/data.py); backwards the whole row reversed, as the train
    API reverses each row: ``<|eos|> reversed ids <|bos|>``."""
    from .data import frame_ids

    bos, eos = frame_ids(tok)
    enc = tok.backend.encode_batch(list(texts), add_special_tokens=False)
    seqs = [np.array([bos, *e.ids, eos], dtype=np.int64) for e in enc]
    return [s[::-1].copy() for s in seqs] if direction == "backward" else seqs


@torch.no_grad()
def document_nll(model, seqs: list[np.ndarray], seq_len: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per document: summed next-token NLL (nats) and the number of predicted tokens. A document longer than
    the training rows is scored in consecutive pieces of ``seq_len`` + 1 tokens sharing one token, so every
    token but the first is predicted exactly once (as the train API's padded rows do), and no position is
    used that training never reached (the position table may be longer than ``seq_len``)."""
    ctx = seq_len
    pieces = [(d, s[a : a + ctx + 1]) for d, s in enumerate(seqs) for a in range(0, len(s) - 1, ctx)]
    nll, cnt = np.zeros(len(seqs)), np.zeros(len(seqs))
    pieces.sort(key=lambda p: len(p[1]))  # similar lengths together: little padding
    for i in range(0, len(pieces), batch):
        chunk = pieces[i : i + batch]
        width = max(len(p) for _, p in chunk)
        tokens = torch.zeros((len(chunk), width), dtype=torch.long)
        ok = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (_, p) in enumerate(chunk):
            tokens[r, : len(p)] = torch.from_numpy(p)
            ok[r, : len(p)] = True
        # right padding under a causal mask changes nothing before it, so no valid mask is needed
        positions = torch.arange(width - 1).expand(len(chunk), -1)
        logits = model(tokens[:, :-1], positions, cache=None, logits_at="all")
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        lp = (lp * ok[:, 1:]).sum(1)
        for r, (d, p) in enumerate(chunk):
            nll[d] -= float(lp[r])
            cnt[d] += len(p) - 1
    return nll, cnt


@torch.no_grad()
def exact_match(model, seqs: list[np.ndarray], sep_id: int, batch: int = 256) -> float:
    """Fraction of sequences whose part after the first ``sep_id`` token (through the end token) is what greedy
    decoding produces from the part up to it. Prompts of equal length are decoded together, no cache."""
    groups: dict[int, list[np.ndarray]] = {}
    for s in seqs:
        cut = int(np.nonzero(s == sep_id)[0][0]) + 1
        groups.setdefault(cut, []).append(s)
    hits = 0
    for cut, group in groups.items():
        for i in range(0, len(group), batch):
            rows = group[i : i + batch]
            n_new = max(len(s) for s in rows) - cut
            tokens = torch.from_numpy(np.stack([s[:cut] for s in rows]))
            for _ in range(n_new):
                t = tokens.shape[1]
                logits = model(tokens, torch.arange(t).expand(len(rows), -1), cache=None, logits_at="last")
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
            for r, s in enumerate(rows):
                hits += bool(np.array_equal(tokens[r, cut : len(s)].numpy(), s[cut:]))
    return hits / len(seqs)


# ---- the experiment ------------------------------------------------------------------------------

@dataclass
class AotRun:
    seed: int
    direction: str
    val_loss: float
    curve: list[dict]  # the train API's metrics
    test_nll: np.ndarray
    test_count: np.ndarray
    exact_match: float | None
    seconds: float


def run_experiment(ds: AotDataset, out: Path, seeds: int = 2, steps: int | None = None, preset: str = "tiny",
                   tokenizer: str = "bytes", log=print, **train_kw) -> tuple[dict, list[AotRun]]:
    from .data import build_tokenizer
    from .loop import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(tokenizer, ds.train)  # one tokenizer for every run: same ids in both directions
    sep_id = None
    if ds.answer_sep is not None:
        sep_ids = tok.backend.encode(ds.answer_sep, add_special_tokens=False).ids
        if len(sep_ids) != 1:
            raise ValueError(f"tokenizer: {ds.answer_sep!r} must be one token for the exact-match score")
        sep_id = sep_ids[0]
    kw = dict(train_kw)
    if steps is not None:
        kw["steps"] = steps
    runs: list[AotRun] = []
    for seed in range(seeds):
        for direction in DIRECTIONS:
            t0 = time.perf_counter()
            cfg = TrainConfig(out=out / f"seed{seed}-{direction}", preset=preset, direction=direction, seed=seed,
                              tokenizer=tokenizer, **kw)
            res = train(cfg, texts=ds.train, tokenizer=tok)
            model = res.model.eval()
            seqs = frame(tok, ds.test, direction)
            nll, cnt = document_nll(model, seqs, cfg.seq_len)
            em = exact_match(model, seqs, sep_id) if sep_id is not None else None
            runs.append(AotRun(seed, direction, float(res.final_val_loss), list(res.metrics), nll, cnt, em,
                               time.perf_counter() - t0))
            log(f"aot {ds.name}: seed {seed} {direction}: val loss {res.final_val_loss:.4f}, held-out "
                f"{nll.sum() / cnt.sum():.4f} nats/token" + ("" if em is None else f", exact match {em:.3f}")
                + f" ({runs[-1].seconds:.0f} s)")
    settings = {"preset": preset, "tokenizer": tokenizer, **{k: v for k, v in kw.items() if k != "progress"}}
    return summary_of(ds, runs, **settings), runs


def summary_of(ds: AotDataset, runs: list[AotRun], **settings) -> dict:
    by = {d: [r for r in runs if r.direction == d] for d in DIRECTIONS}
    boot = None
    if len(by["forward"]) == 1:
        fw, bw = by["forward"][0], by["backward"][0]
        boot = paired_bootstrap_gaps(fw.test_nll, bw.test_nll, fw.test_count)
    s = summarize([r.val_loss for r in by["forward"]], [r.val_loss for r in by["backward"]], boot)
    for d in DIRECTIONS:
        s[d]["heldout_loss"] = float(np.mean([r.test_nll.sum() / r.test_count.sum() for r in by[d]]))
        if by[d][0].exact_match is not None:
            s[d]["exact_match"] = float(np.mean([r.exact_match for r in by[d]]))
            s[d]["exact_match_per_seed"] = [r.exact_match for r in by[d]]
    s["heldout_gap"] = (s["backward"]["heldout_loss"] - s["forward"]["heldout_loss"]) / s["forward"]["heldout_loss"]
    info = {k: v for k, v in ds.info.items() if k != "matrix"}
    return {"dataset": ds.name, **s, "seeds": len(by["forward"]), **settings, "data": info,
            "seconds": round(sum(r.seconds for r in runs), 1)}


# ---- the figure -------------------------------------------------------------------------------------

def plot_aot(runs: list[AotRun], summary: dict, path: Path) -> None:
    """Validation (left) and training (right) loss against step: one thin line per seed and direction, the
    mean over seeds thick, +-1 standard deviation shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"forward": "tab:blue", "backward": "tab:orange"}
    for ax, key in zip(axes, ("val_loss", "train_loss"), strict=True):
        later: list[float] = []  # values after the first evaluation: the y-range (the start is far above)
        for d in DIRECTIONS:
            curves = []
            for r in (r for r in runs if r.direction == d):
                pts = [(m["step"], m[key]) for m in r.curve if m.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, color=colours[d], lw=0.7, alpha=0.45)
                    curves.append(dict(pts))
                    later += ys[1:]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ys = np.array([[c[s] for s in steps] for c in curves])
                mean, sd = ys.mean(0), ys.std(0)
                ax.plot(steps, mean, color=colours[d], lw=2, label=f"{d} (mean of {len(curves)})")
                ax.fill_between(steps, mean - sd, mean + sd, color=colours[d], alpha=0.15)
        if later:
            lo, hi = min(later), max(later)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key.replace('_', ' ')} (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    lo, hi = summary["ci95"]
    fig.suptitle(f"arrow of time: {summary['dataset']}: (bw - fw) / fw = {100 * summary['gap']:+.2f}% "
                 f"(95% CI {100 * lo:+.2f}% .. {100 * hi:+.2f}%, {summary['seeds']} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------

def _density_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"density: expected numbers separated by commas, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ValueError(f"density: each value must be in (0, 1], got {text!r}")
    return vals


def _prime_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"primes-range: expected LO:HI, got {text!r}") from None
    return lo, hi


def add_aot_command(subparsers) -> None:
    """``logitlab aot`` (the experiment) and ``logitlab aot-data`` (fetch / list its data sets)."""
    a = subparsers.add_parser("aot", help="arrow of time: train forwards and backwards on the same data")
    a.add_argument("--dataset", required=True, help=f"one of: {', '.join(known_datasets())}")
    a.add_argument("--out", required=True, type=Path, help="directory for aot.png, summary.json and the models")
    a.add_argument("--seeds", type=int, default=2, help="seeds 0..K-1, each a forward and a backward run")
    a.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per data set)")
    a.add_argument("--preset", default="tiny", help="model size (the train command's presets)")
    a.add_argument("--tokenizer", default="bytes", help="bytes | bpe:N (built once, shared by all runs)")
    a.add_argument("--seq-len", type=int, default=None)
    a.add_argument("--batch", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--eval-every", type=int, default=None)
    a.add_argument("--device", default="cpu")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a.add_argument("--density", default=None,
                   help="linear: fraction of ones of A; a comma-separated list sweeps it (default 0.2)")
    a.add_argument("--m", type=int, default=8, help="linear: bits per vector")
    a.add_argument("--lines", type=int, default=None, help="linear: number of lines (default: every x, at most "
                   "20000)")
    a.add_argument("--primes-range", default="100:1000", metavar="LO:HI",
                   help="primes: primes in [LO, HI)")
    a.add_argument("--digit-order", default="big", choices=["big", "little"],
                   help="primes: numbers written most (big) or least (little) significant digit first")
    a.add_argument("--packing", default=None, choices=["packed", "padded"],
                   help="rows of the train API (default: padded, one line per row, for primes and linear; "
                   "packed for text)")
    a.add_argument("--test", type=int, default=None, help="held-out documents (default: 1000 primes lines, "
                   "1/8 of the linear lines, 300 texts)")
    a.add_argument("--data-seed", type=int, default=0, help="seed of the data (the same for every run)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    a.set_defaults(func=cmd_aot)

    d = subparsers.add_parser("aot-data", help="fetch or list the arrow-of-time data sets")
    d.add_argument("action", choices=["fetch", "list"])
    d.add_argument("name", nargs="?", help="a natural-language data set (fetch)")
    d.set_defaults(func=cmd_aot_data)


# Sized for a 2-core CPU: `--seeds 2` (four runs) in under 10 minutes with the tiny preset (README).
DEFAULT_STEPS = {"primes": 1000, "linear": 1000}
NATURAL_STEPS = 1000


def cmd_aot(a: argparse.Namespace) -> int:
    if a.seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {a.seeds}")
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"steps: must be >= 1, got {a.steps}")
    if a.dataset not in known_datasets():
        raise ValueError(f"dataset: unknown {a.dataset!r}; known: {', '.join(known_datasets())}")
    if a.density is not None and a.dataset != "linear":
        raise ValueError("density: only for --dataset linear")
    densities = _density_list(a.density) if a.density is not None else [0.2]
    prime_range = _prime_range(a.primes_range)
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    steps = a.steps or DEFAULT_STEPS.get(a.dataset, NATURAL_STEPS)
    train_kw = {k: v for k, v in (("seq_len", a.seq_len), ("batch", a.batch), ("lr", a.lr),
                                  ("eval_every", a.eval_every), ("device", a.device)) if v is not None}
    generated = a.dataset in ("primes", "linear")
    train_kw["packing"] = a.packing or ("padded" if generated else "packed")
    if generated and a.batch is None:
        train_kw["batch"] = 64  # a padded row is one short line: more of them per step
    train_kw["progress"] = False

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    summaries = []
    for density in densities if a.dataset == "linear" else [None]:
        ds = make_dataset(a.dataset, density=density or 0.2, m=a.m, lines=a.lines, prime_range=prime_range,
                          digit_order=a.digit_order, test=a.test, data_seed=a.data_seed)
        out = a.out / ds.name if len(densities) > 1 and a.dataset == "linear" else a.out
        summary, runs = run_experiment(ds, out, seeds=a.seeds, steps=steps, preset=a.preset, tokenizer=a.tokenizer,
                                       log=log, **train_kw)
        plot_aot(runs, summary, out / "aot.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"aot {ds.name}: forward {summary['forward']['val_loss']:.4f} +- {summary['forward']['std']:.4f}, "
            f"backward {summary['backward']['val_loss']:.4f} +- {summary['backward']['std']:.4f} nats/token; "
            f"gap {100 * summary['gap']:+.2f}% (95% CI {100 * summary['ci95'][0]:+.2f}% .. "
            f"{100 * summary['ci95'][1]:+.2f}%); wrote {out / 'aot.png'}")
        summaries.append(summary)
    if a.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    return 0


def cmd_aot_data(a: argparse.Namespace) -> int:
    if a.action == "list":
        print("primes\tgenerated: p1*p2=n")
        print("linear\tgenerated: x=y, y = A x over F2")
        for name, spec in sorted(TEXT_DATASETS.items()):
            print(f"{name}\tDebian {spec.package}={spec.version} ({spec.language}), fetched with apt-get")
        return 0
    if a.name not in TEXT_DATASETS:
        raise ValueError(f"name: fetch needs one of {', '.join(sorted(TEXT_DATASETS))}, got {a.name!r}")
    print(fetch_text_dataset(a.name))
    return 0
