"""Training data: texts from files, a tokenizer trained on them, a seeded train/val split, and batches.

The order of batches is a pure function of (seed, step): step ``s`` takes the global sample indices
``s*G .. s*G + G-1`` (``G`` = sequences per optimizer step), and index ``g`` is sample ``perm_e[g % n]``
of epoch ``e = g // n``, where ``perm_e`` is a permutation drawn from ``(seed, e)``. So resuming at a step
needs no data state, and every rank of a distributed run can compute any batch (it takes its slice).

Two ways to make fixed-length rows from documents (each framed as ``<|bos|> text <|eos|>``):
  packed  the training documents concatenated into one stream, cut into windows of ``seq_len + 1``
          tokens (inputs = window[:-1], targets = window[1:]); a window can span documents.
  padded  each document cut into pieces of at most ``seq_len + 1`` tokens, one piece per row, rows
          padded on the right; padding is masked out of the attention and of the loss.
``direction="backward"`` reverses each row's tokens (its valid part) after all of this, so a backward
run sees exactly the forward run's batches flipped along time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..tokenizer import Tokenizer, byte_to_unicode
from .checkpoint import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIALS = (BOS, EOS, PAD)
IGNORE = -100  # target id that cross_entropy skips (padding)
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


# ---- texts ------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data: {path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"data: {path}:{n}: expected an object with a string 'text' field")
            texts.append(obj["text"])
    return texts


def _read_file(path: Path, strict: bool) -> list[str]:
    """The documents of one file. Inside folders (strict=False) files that are not UTF-8 text are skipped."""
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        if strict:
            raise ValueError(f"data: {path} is not UTF-8 text") from None
        return []


def load_texts(paths) -> list[str]:
    """Documents from text files, folders of text (recursive; hidden entries skipped) and JSONL files
    (one document per line, its ``text`` field). Whitespace-only documents are dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("data: no data given (--data PATH)")
    texts: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and f.suffix.lower() in _TEXT_SUFFIXES | {".jsonl"})
            for f in files:
                texts += _read_file(f, strict=False)
        elif p.is_file():
            texts += _read_file(p, strict=True)
        else:
            raise ValueError(f"data: {p} does not exist")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"data: no text found in {', '.join(map(str, paths))}")
    return texts


# ---- tokenizers ---------------------------------------------------------------------------------------

def parse_tokenizer_spec(kind: str) -> int | None:
    """'bytes' -> None; 'bpe:N' -> N. Anything else: ValueError naming the field."""
    if kind == "bytes":
        return None
    if isinstance(kind, str) and kind.startswith("bpe:"):
        try:
            n = int(kind[4:])
        except ValueError:
            n = -1
        if n < 256 + len(SPECIALS):
            raise ValueError(f"tokenizer: bpe:N needs an integer N >= {256 + len(SPECIALS)} "
                             f"(256 bytes + {len(SPECIALS)} specials), got {kind!r}")
        return n
    raise ValueError(f"tokenizer: expected 'bytes' or 'bpe:N', got {kind!r}")


def _wrap(backend: HFTokenizer) -> Tokenizer:
    ids = [backend.token_to_id(t) for t in SPECIALS]
    # add_bos: prompts start the way training documents do, so generation and scoring see <|bos|> first.
    return Tokenizer(backend, ids[0], ids[1], add_bos=True, pad_token_id=ids[2])


def build_tokenizer(kind: str, texts: list[str]) -> Tokenizer:
    """"bytes": the 256 bytes are ids 0..255, then <|bos|> <|eos|> <|pad|>. "bpe:N": a byte-level BPE
    with N tokens (specials first, then the byte alphabet, then merges) trained on ``texts``. Both are
    `tokenizers` byte-level BPE backends, so both save as tokenizer.json."""
    n = parse_tokenizer_spec(kind)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if n is None:
        vocab = {ch: b for b, ch in byte_to_unicode().items()}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(SPECIALS))
        return _wrap(backend)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return _wrap(backend)


def frame_ids(tok: Tokenizer) -> tuple[int, int]:
    """The ids that open and close a document: <|bos|> and <|eos|> when the vocabulary has them (whatever
    a backward checkpoint's config calls them), else the tokenizer's own BOS/EOS."""
    bos = tok.token_to_id(BOS)
    eos = tok.token_to_id(EOS)
    bos = tok.bos_token_id if bos is None else bos
    eos = tok.eos_token_id if eos is None else eos
    if bos is None or eos is None:
        raise ValueError("tokenizer: needs a beginning- and an end-of-sequence token to frame documents")
    return bos, eos


def for_direction(tok: Tokenizer, direction: str) -> Tokenizer:
    """The tokenizer as a model of this direction uses it: a backward model's sequences open with
    <|eos|> and close with <|bos|> (what ``save_tokenizer`` writes for it)."""
    if direction == "forward":
        return tok
    bos, eos = frame_ids(tok)
    return Tokenizer(tok.backend, eos, bos, add_bos=True, pad_token_id=tok.pad_token_id)


def save_tokenizer(tok: Tokenizer, out_dir, direction: str = "forward", model_max_length: int | None = None) -> None:
    """tokenizer.json + tokenizer_config.json, readable by ``Tokenizer.from_hf_dir`` and transformers.

    A backward model reads documents from their end: its sequences start with <|eos|> and end with
    <|bos|>, so its config names them the other way round (a prompt then starts, and generation stops,
    where the model learnt that they do)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first, last = frame_ids(tok)
    if direction == "backward":
        first, last = last, first
    pad = tok.pad_token_id if tok.pad_token_id is not None else last
    name = tok.backend.id_to_token
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(first), "eos_token": name(last),
           "pad_token": name(pad), "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False}
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    atomic_write_text(out / "tokenizer.json", tok.backend.to_str(pretty=True))
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")


# ---- the split -------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Token sequences (each a framed document, or one part of a single document's stream)."""

    train: list[np.ndarray]
    val: list[np.ndarray]

    def fingerprint(self) -> str:
        """sha256 of every token of both splits: a resumed run checks that its data is the same."""
        h = hashlib.sha256()
        for part in (self.train, self.val):
            h.update(len(part).to_bytes(8, "little"))
            for seq in part:
                h.update(len(seq).to_bytes(8, "little"))
                h.update(np.ascontiguousarray(seq, dtype=np.int32).tobytes())
        return h.hexdigest()


def split_corpus(texts: list[str], tok: Tokenizer, seed: int, val_fraction: float = 0.1) -> Corpus:
    """Documents -> ``<|bos|> ids <|eos|>``, split into train/val by a permutation drawn from the seed:
    ``round(val_fraction * n)`` documents (at least 1 each side) go to val. A single document's token
    stream is split instead (its last ``val_fraction``)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    bos, eos = frame_ids(tok)
    # A "<|eos|>" written in a document is text, not a document boundary.
    backend, literal = tok.backend, tok.backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encoded = backend.encode_batch(list(texts), add_special_tokens=False)
    finally:
        backend.encode_special_tokens = literal
    seqs = [np.array([bos, *e.ids, eos], dtype=np.int32) for e in encoded]
    if len(seqs) == 1:
        s = seqs[0]
        cut = min(len(s) - 2, max(2, round(len(s) * (1 - val_fraction))))
        return Corpus([s[:cut]], [s[cut:]])
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(seqs))
    n_val = min(len(seqs) - 1, max(1, round(val_fraction * len(seqs))))
    return Corpus([seqs[i] for i in order[n_val:]], [seqs[i] for i in order[:n_val]])


# ---- samples -------------------------------------------------------------------------------------

class PackedSamples:
    """Windows of ``seq_len + 1`` tokens of the concatenated sequences. Training windows of epoch e start
    at a shift drawn from (seed, e) within the slack, so epochs do not repeat the same cuts."""

    def __init__(self, seqs: list[np.ndarray], seq_len: int, ragged_tail: bool = False):
        self.stream = np.concatenate(seqs) if seqs else np.zeros(0, np.int32)
        self.T = seq_len
        self.n = (len(self.stream) - 1) // seq_len
        self.slack = len(self.stream) - 1 - self.n * seq_len
        # for evaluation: a last, shorter window so that a short split still has something to score
        self.tail = ragged_tail and self.slack >= 1
        self.count = self.n + int(self.tail)

    def get(self, i: int, shift: int = 0) -> np.ndarray:
        start = shift + i * self.T
        return self.stream[start: start + self.T + 1]

    def length(self, i: int, shift: int = 0) -> int:
        return len(self.get(i, shift))


class PaddedSamples:
    """Each sequence cut into pieces of at most ``seq_len + 1`` tokens (consecutive pieces share one
    token, so every token but the first is a target exactly once)."""

    def __init__(self, seqs: list[np.ndarray], seq_len: int):
        self.seqs, self.T = seqs, seq_len
        self.index = [(j, start) for j, s in enumerate(seqs) for start in range(0, len(s) - 1, seq_len)]
        self.count = self.n = len(self.index)
        self.slack = 0

    def get(self, i: int, shift: int = 0) -> np.ndarray:
        j, start = self.index[i]
        return self.seqs[j][start: start + self.T + 1]

    def length(self, i: int, shift: int = 0) -> int:
        j, start = self.index[i]
        return min(len(self.seqs[j]) - start, self.T + 1)


def make_samples(seqs: list[np.ndarray], seq_len: int, packing: str, for_eval: bool = False):
    if packing == "packed":
        return PackedSamples(seqs, seq_len, ragged_tail=for_eval)
    if packing == "padded":
        return PaddedSamples(seqs, seq_len)
    raise ValueError(f"packing: expected 'packed' or 'padded', got {packing!r}")


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, IGNORE where padded
    valid: torch.Tensor | None  # [B, T] bool, None when no row is padded (the model's fast causal path)
    positions: torch.Tensor  # [B, T] long

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate(rows: list[np.ndarray], pad_id: int, backward: bool = False) -> Batch:
    """Rows of up to T+1 tokens -> inputs/targets [B, T] padded on the right. ``backward`` reverses each
    row's tokens first (its valid part only: padding stays on the right)."""
    if backward:
        rows = [r[::-1] for r in rows]
    width = max(len(r) for r in rows) - 1
    tokens = torch.full((len(rows), width + 1), pad_id, dtype=torch.long)
    ok = torch.zeros((len(rows), width + 1), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.from_numpy(np.ascontiguousarray(r, dtype=np.int64))
        ok[i, : len(r)] = True
    targets = tokens[:, 1:].masked_fill(~ok[:, 1:], IGNORE)
    valid = ok[:, :-1]
    positions = torch.arange(width).expand(len(rows), width)
    return Batch(tokens[:, :-1].contiguous(), targets.contiguous(), None if bool(valid.all()) else valid.contiguous(),
                 positions.contiguous())


class TrainOrder:
    """Which samples make up the global batch of each optimizer step: a pure function of (seed, step)."""

    def __init__(self, samples, seed: int, global_batch: int):
        if samples.n < 1:
            raise ValueError("data: the training split is too short for one sequence")
        self.samples, self.seed, self.G = samples, seed, global_batch

    @lru_cache(maxsize=4)  # noqa: B019 -- a few epochs' permutations; the object lives as long as the run
    def _epoch(self, e: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, e])
        perm = rng.permutation(self.samples.n)
        shift = int(rng.integers(0, self.samples.slack + 1)) if self.samples.slack else 0
        return perm, shift

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> list[np.ndarray]:
        """Rows ``lo:hi`` of step ``step``'s global batch."""
        hi = self.G if hi is None else hi
        out = []
        for g in range(step * self.G + lo, step * self.G + hi):
            perm, shift = self._epoch(g // self.samples.n)
            out.append(self.samples.get(int(perm[g % self.samples.n]), shift))
        return out

    def num_targets(self, step: int) -> int:
        """Target tokens in the whole global batch (every rank normalises its loss by this)."""
        total = 0
        for g in range(step * self.G, (step + 1) * self.G):
            perm, shift = self._epoch(g // self.samples.n)
            total += self.samples.length(int(perm[g % self.samples.n]), shift) - 1
        return total
