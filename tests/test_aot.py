"""Arrow-of-time experiments: the data generators, the natural-language cache, the summary statistics, the
held-out scoring, and `logitlab aot` end to end on a tiny model."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from logitlab.cli import main
from logitlab.train import aot, datasets
from logitlab.train.datasets import (
    DebText,
    f2_inverse,
    make_linear,
    make_primes,
    parse_linear_line,
    random_invertible_f2,
)
from logitlab.weights.registry import ChecksumError


def _is_prime(n: int) -> bool:  # trial division: independent of the sieve under test
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


# ---- primes -------------------------------------------------------------------------------------

def test_primes_lines_are_products_of_ordered_primes():
    ds = make_primes(10, 60, test=30, seed=3)
    lines = ds.train + ds.test
    expected_primes = [p for p in range(10, 60) if _is_prime(p)]
    assert len(lines) == len(expected_primes) * (len(expected_primes) + 1) // 2  # every pair p1 <= p2 once
    assert len(set(lines)) == len(lines) and not set(ds.train) & set(ds.test)
    assert len(ds.test) == 30
    for line in lines:
        lhs, n = line.split("=")
        p1, p2 = map(int, lhs.split("*"))
        assert _is_prime(p1) and _is_prime(p2) and 10 <= p1 <= p2 < 60
        assert int(n) == p1 * p2


def test_primes_little_endian_writes_every_number_reversed():
    big = make_primes(10, 40, test=5, seed=0)
    little = make_primes(10, 40, test=5, seed=0, digit_order="little")
    assert little.name == "primes-little" and len(little.train) == len(big.train)
    for b, l in zip(big.train + big.test, little.train + little.test, strict=True):
        lhs, n = l.split("=")
        p1, p2 = (int(v[::-1]) for v in lhs.split("*"))
        assert p1 * p2 == int(n[::-1]) and b == f"{p1}*{p2}={int(n[::-1])}"


def test_primes_bad_range_is_a_field_error():
    with pytest.raises(ValueError, match="^primes: "):
        make_primes(50, 10)


# ---- linear languages over F2 ----------------------------------------------------------------------

def _apply(a: np.ndarray, x: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sum(int(a[i, j]) * x[j] for j in range(len(x))) % 2 for i in range(a.shape[0]))


@pytest.mark.parametrize("m,density", [(4, 0.25), (6, 0.3), (8, 0.2), (8, 0.5), (10, 0.15)])
def test_f2_inverse_against_brute_force(m, density):
    a = random_invertible_f2(m, density, np.random.default_rng(m))
    inv = f2_inverse(a)
    assert np.array_equal((a.astype(int) @ inv.astype(int)) % 2, np.eye(m, dtype=int))
    # independently: x -> A x is a bijection of F2^m, and column j of A^-1 is the x with A x = e_j
    table = {_apply(a, x): x for x in itertools.product((0, 1), repeat=m)}
    assert len(table) == 2**m
    for j in range(m):
        e = tuple(int(i == j) for i in range(m))
        assert tuple(int(v) for v in inv[:, j]) == table[e]


def test_f2_inverse_rejects_singular_matrices():
    a = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.uint8)  # row0 + row1 = row2 over F2
    with pytest.raises(ValueError, match="singular"):
        f2_inverse(a)
    assert np.linalg.matrix_rank(a.astype(float)) == 3  # invertible over the reals: F2 is what matters


@pytest.mark.parametrize("m,density", [(16, 0.0625), (16, 0.15), (16, 0.3), (12, 0.2), (32, 0.1)])
def test_density_is_as_asked(m, density):
    a = random_invertible_f2(m, density, np.random.default_rng(0))
    assert set(np.unique(a)) <= {0, 1}
    assert abs(a.mean() - density) <= 0.5 / m**2 + 1e-12  # the nearest count of ones
    f2_inverse(a)  # invertible


def test_density_below_a_permutation_is_refused():
    with pytest.raises(ValueError, match="^density: "):
        random_invertible_f2(8, 0.05, np.random.default_rng(0))


def test_linear_lines_satisfy_y_equals_a_x():
    ds = make_linear(m=10, density=0.2, n=300, test=50, seed=1)
    a = np.array([[int(c) for c in row] for row in ds.info["matrix"]], dtype=np.uint8)
    assert abs(ds.info["density"] - 0.2) < 0.01
    assert ds.info["inverse_density"] == pytest.approx(f2_inverse(a).mean())
    lines = ds.train + ds.test
    assert len(lines) == 300 and len(ds.test) == 50
    xs = set()
    for line in lines:
        x, y = parse_linear_line(line)
        assert len(x) == len(y) == 10
        assert _apply(a, tuple(int(v) for v in x)) == tuple(int(v) for v in y)
        xs.add(tuple(x))
    assert len(xs) == 300  # distinct x


def test_permutation_density_gives_an_equally_sparse_inverse():
    ds = make_linear(m=16, density=1 / 16, n=100, test=20)
    assert ds.info["density"] == ds.info["inverse_density"] == 1 / 16


# ---- natural language: the fetched archive and its cache -------------------------------------------------

def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_deb(tmp_path: Path) -> Path:
    root = "./usr/share/games/fortunes/xx/"
    data = _tar_xz({
        root + "sprueche": "Erste Weisheit.\n%\nZweite\nüber zwei Zeilen.\n%\n".encode(),
        root + "sprueche.dat": b"\x00\x01binary index",
        root + "off/boese": b"nicht hier\n%\n",
        root + "banner": b"#####\n%\n",
        "./usr/share/doc/fortunes-xx/README": b"not a fortune\n",
    })
    deb = tmp_path / "fortunes-xx_1.0_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"x"}),
                         "data.tar.xz": data}))
    return deb


@pytest.fixture
def fake_text_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path / "home"))
    deb = _fake_deb(tmp_path)
    spec = DebText("fortunes-xx", "1.0", datasets.sha256_of(deb), deb.stat().st_size,
                   "usr/share/games/fortunes/xx", "xx")
    monkeypatch.setitem(datasets.TEXT_DATASETS, "fortunes-xx", spec)
    calls = []

    def fake_download(s, dest):  # what apt-get download would leave in dest
        calls.append(s.package)
        target = Path(dest) / s.filename
        target.write_bytes(deb.read_bytes())
        return target

    monkeypatch.setattr(datasets, "_apt_download", fake_download)
    return spec, calls


def test_text_dataset_is_fetched_verified_and_cached_once(fake_text_dataset):
    spec, calls = fake_text_dataset
    assert datasets.load_text_dataset("fortunes-xx") == ["Erste Weisheit.", "Zweite\nüber zwei Zeilen."]
    assert datasets.load_text_dataset("fortunes-xx") == ["Erste Weisheit.", "Zweite\nüber zwei Zeilen."]
    assert calls == ["fortunes-xx"]  # the second use reads the cache
    cached = datasets.cache_dir() / "datasets" / "fortunes-xx" / spec.filename
    assert datasets.sha256_of(cached) == spec.sha256
    assert (cached.parent / (cached.name + ".sha256")).read_text().split()[0] == spec.sha256


def test_a_corrupted_cache_is_fetched_again(fake_text_dataset):
    spec, calls = fake_text_dataset
    datasets.fetch_text_dataset("fortunes-xx")
    cached = datasets.cache_dir() / "datasets" / "fortunes-xx" / spec.filename
    raw = bytearray(cached.read_bytes())
    raw[-5] ^= 0xFF  # same size, other bytes
    cached.write_bytes(bytes(raw))
    (cached.parent / (cached.name + ".sha256")).unlink()
    datasets.fetch_text_dataset("fortunes-xx")
    assert calls == ["fortunes-xx", "fortunes-xx"]
    assert datasets.sha256_of(cached) == spec.sha256


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(fake_text_dataset, monkeypatch):
    spec, _ = fake_text_dataset
    bad = DebText(spec.package, spec.version, "0" * 64, spec.size, spec.root, spec.language)
    monkeypatch.setitem(datasets.TEXT_DATASETS, "fortunes-xx", bad)
    with pytest.raises(ChecksumError, match="^dataset: .*sha256"):
        datasets.fetch_text_dataset("fortunes-xx")
    d = datasets.cache_dir() / "datasets" / "fortunes-xx"
    assert [p.name for p in d.iterdir()] == []


def test_without_apt_get_the_cli_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path))
    monkeypatch.setattr(datasets.shutil, "which", lambda name: None)
    assert main(["aot-data", "fetch", "fortunes-de"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset: ") and "apt-get" in err[0]


def test_make_text_holds_out_documents(fake_text_dataset, monkeypatch):
    monkeypatch.setattr(datasets, "load_text_dataset", lambda name: [f"doc {i}" for i in range(40)])
    ds = datasets.make_text("fortunes-xx", test=5, seed=0)
    assert len(ds.test) == 5 and len(ds.train) == 35 and not set(ds.test) & set(ds.train)
    assert ds.answer_sep is None


# ---- the summary's statistics ------------------------------------------------------------------------

def test_summary_math_by_hand():
    s = aot.summarize([1.0, 1.2, 1.1], [1.1, 1.26, 1.21])
    assert s["forward"]["val_loss"] == pytest.approx(1.1)
    assert s["backward"]["val_loss"] == pytest.approx(1.19)
    assert s["forward"]["std"] == pytest.approx(0.1)  # sample std of 1.0, 1.2, 1.1
    assert s["gap"] == pytest.approx((1.19 - 1.1) / 1.1)
    # per-seed gaps 0.1, 0.05, 0.1: mean 1/12, sd sqrt(1/1200), t_{.975,2} = 4.302653
    half = 4.302653 * math.sqrt(1 / 1200) / math.sqrt(3)
    assert s["gap_per_seed"] == pytest.approx([0.1, 0.05, 0.1])
    assert s["ci95"] == pytest.approx([1 / 12 - half, 1 / 12 + half], abs=1e-5)


def test_summary_with_one_seed_uses_the_bootstrap_spread():
    boot = [0.01, 0.03, 0.02, 0.04]
    s = aot.summarize([2.0], [2.05], boot)
    sd = math.sqrt(sum((b - 0.025) ** 2 for b in boot) / 3)
    assert s["gap"] == pytest.approx(0.025)
    assert s["ci95"] == pytest.approx([0.025 - 1.96 * sd, 0.025 + 1.96 * sd])
    assert s["forward"]["std"] == 0.0
    with pytest.raises(ValueError, match="^seeds: "):
        aot.summarize([2.0], [2.05])


def test_t_quantiles_match_scipy():
    from scipy import stats

    for df in list(range(1, 40)) + [50, 100, 1000]:
        assert aot.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_paired_bootstrap_gaps():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 20, size=50).astype(float)
    fw = counts * rng.uniform(1, 2, size=50)
    assert np.allclose(aot.paired_bootstrap_gaps(fw, 1.1 * fw, counts, draws=100), 0.1)  # paired: no spread
    gaps = aot.paired_bootstrap_gaps(fw, fw + counts * rng.normal(0, 0.2, size=50), counts, draws=500)
    assert np.std(gaps) > 0.001


# ---- scoring held-out documents ----------------------------------------------------------------------

def test_frame_reverses_the_whole_row_backwards():
    from logitlab.train.data import build_tokenizer

    tok = build_tokenizer("bytes", [])
    fw, = aot.frame(tok, ["ab=c"], "forward")
    bw, = aot.frame(tok, ["ab=c"], "backward")
    assert fw.tolist() == [256, 97, 98, 61, 99, 257]  # <|bos|> a b = c <|eos|>
    assert bw.tolist() == fw.tolist()[::-1]


@torch.no_grad()
def test_document_nll_matches_a_direct_computation():
    from tiny import tiny_model

    model = tiny_model(seed=1, vocab_size=300, context_length=32)  # longer than the pieces: they must be cut
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, size=n) for n in (5, 9, 16, 17, 40)]  # the last two need several pieces
    nll, cnt = aot.document_nll(model, seqs, seq_len=16, batch=2)
    assert cnt.tolist() == [len(s) - 1 for s in seqs]
    for s, got in zip(seqs, nll, strict=True):
        want = 0.0
        for a in range(0, len(s) - 1, 16):  # independent: one piece at a time, no batching, no padding
            piece = torch.from_numpy(s[a : a + 17])[None]
            logits = model(piece[:, :-1], torch.arange(piece.shape[1] - 1)[None], logits_at="all")
            want -= float(torch.log_softmax(logits, -1)[0].gather(-1, piece[0, 1:, None]).sum())
        assert got == pytest.approx(want, rel=1e-4)


class _CountingModel:
    """Greedy next token = last token + 1: the sequences that continue that way after '=' are 'right'."""

    config = type("C", (), {"context_length": 64})()

    def __call__(self, tokens, positions, cache=None, logits_at="last"):
        return torch.nn.functional.one_hot((tokens[:, -1] + 1) % 100, 100).float()


def test_exact_match_scores_the_part_after_the_separator():
    sep = 50
    seqs = [np.array(s) for s in (
        [1, 2, sep, 51, 52, 53],  # right
        [7, sep, 51, 52],  # right, other prompt length
        [1, 2, sep, 51, 60, 61],  # wrong in the middle
        [9, 9, sep, 51],  # right, shorter answer
        [3, sep, 40],  # wrong first token
    )]
    assert aot.exact_match(_CountingModel(), seqs, sep, batch=2) == pytest.approx(3 / 5)


# ---- the command line, end to end --------------------------------------------------------------------

def test_aot_bad_input_is_one_line(tmp_path, capsys):
    for argv, field in ((["--dataset", "nope"], "dataset"), (["--dataset", "linear", "--density", "0"], "density"),
                        (["--dataset", "primes", "--density", "0.2"], "density"),
                        (["--dataset", "primes", "--seeds", "0"], "seeds")):
        assert main(["aot", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {field}: "), err


def test_aot_end_to_end_on_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("logitlab.train.loop", reason="the train API (train/loop.py) is not there yet")
    out = tmp_path / "aot"
    rc = main(["aot", "--dataset", "primes", "--primes-range", "2:60", "--test", "20", "--seeds", "2",
               "--steps", "4", "--eval-every", "2", "--preset", "tiny", "--seq-len", "32", "--batch", "4",
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    s = json.loads(captured.out)
    assert s["dataset"] == "primes" and s["seeds"] == 2
    for d in ("forward", "backward"):
        assert len(s[d]["per_seed"]) == 2 and all(0 < v < 10 for v in s[d]["per_seed"])
        assert s[d]["val_loss"] == pytest.approx(np.mean(s[d]["per_seed"]))
        assert 0 <= s[d]["exact_match"] <= 1
    assert s["gap"] == pytest.approx((s["backward"]["val_loss"] - s["forward"]["val_loss"]) / s["forward"]["val_loss"])
    assert s["ci95"][0] <= np.mean(s["gap_per_seed"]) <= s["ci95"][1]
    png = (out / "aot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((out / "summary.json").read_text())["gap"] == pytest.approx(s["gap"])
