"""GGUF block matrices (model/qblocks.py, qblocks.c): the repacked weights against gguf's own
dequantization, the block kernels against float64 products, for every code path of the C (AVX-512 VNNI
in the native build, and qblocks.c built here for AVX2 and for plain C)."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from logitlab.model import native, qblocks

SOURCE = Path(qblocks.__file__).with_name("qblocks.c")
# (bytes, elements) per block; offsets of the float16 scales within a block
BLOCK = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q8_0": (34, 32), "Q4_K": (144, 256), "Q6_K": (210, 256)}
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
KIND = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32), "Q4_K": (4, 32), "Q6_K": (8, 16)}
INS = {"Q4_0": (32, 96, 256, 576, 1536), "Q4_1": (32, 96, 256, 576, 1536), "Q8_0": (32, 96, 256, 576, 1536),
       "Q4_K": (256, 768, 1536), "Q6_K": (256, 768, 1536)}
OUTS = (1, 3, 17, 65)


def random_blocks(kind: str, out: int, n_in: int, seed: int) -> np.ndarray:
    """Random bytes (every code value occurs) with finite float16 scales of varied magnitude."""
    rng = np.random.default_rng(seed)
    nbytes, nelem = BLOCK[kind]
    nblk = out * (n_in // nelem)
    raw = rng.integers(0, 256, size=(nblk, nbytes), dtype=np.uint8)
    for at in F16_AT[kind]:
        s = (rng.uniform(0.2, 1.0, nblk) * 10.0 ** rng.integers(-4, 0, nblk)).astype(np.float16)  # some subnormal
        s[rng.random(nblk) < 0.1] *= -1
        raw[:, at:at + 2] = s.view(np.uint8).reshape(nblk, 2)
    return raw.reshape(out, -1)


def gguf_weights(raw: np.ndarray, kind: str) -> np.ndarray:
    """The independent reference: gguf-py's dequantization of the file's bytes."""
    return quants.dequantize(raw, T[kind]).astype(np.float32)


# ---- the libraries: the native build (as the model loads it) and qblocks.c alone for AVX2 and plain C --


def _has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c"))


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path | str]:
    """qblocks.c alone, for AVX2 and for plain C (-O1: the test builds compile twice as fast), both at
    once: name -> the library, or why there is none."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"avx2": "x86 only", "plain": "x86 only"}
    cc, tmp = os.environ.get("CC", "cc"), tmp_path_factory.mktemp("qblocks")
    flags = {"plain": ["-mno-avx", "-mno-f16c"]}
    if _has_avx2():
        flags["avx2"] = ["-mavx2", "-mfma", "-mf16c"]
    procs, out = {}, {"avx2": "no AVX2 here"}
    for name, f in flags.items():
        cmd = [cc, "-O1", "-fopenmp", "-shared", "-fPIC", *f, str(SOURCE), "-o", str(tmp / f"{name}.so")]
        try:
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            out[name] = f"no C compiler ({e})"
    for name, proc in procs.items():
        err = proc.communicate(timeout=120)[1]
        out[name] = tmp / f"{name}.so" if proc.returncode == 0 else f"{cc}: {err.strip()[-300:]}"
    return out


@pytest.fixture(scope="module", params=["native", "avx2", "plain"])
def lib(request, builds):
    if request.param == "native":
        if not native.available():
            pytest.skip("no native library")
        return native.library()
    built = builds[request.param]
    if isinstance(built, str):
        pytest.skip(built)
    return ctypes.CDLL(str(built))


@pytest.fixture
def one_thread():
    """The sweeps run single-threaded: on a loaded 2-core machine every 2-thread parallel region can wait
    a scheduler slice for its second thread (milliseconds per tiny call). Threads: test_threads_split_rows."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference(xt: torch.Tensor, w_ref: torch.Tensor, qm: qblocks.QMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x~ @ W^T, and the error bound: relative to the sum of the magnitudes the kernel adds
    (|d code| <= |W| + |m| for the weight part, |m| for the offsets), float32 sums of ~in/16 terms."""
    m = qm.m.double().repeat_interleave(qm.group, dim=1)
    return xt @ w_ref.T, 1e-5 * (xt.abs() @ (w_ref.abs() + 2 * m.abs()).T) + 1e-30


def check_matmul(y: torch.Tensor, xt: torch.Tensor, w_ref: torch.Tensor, qm: qblocks.QMatrix, ref=None):
    ref, bound = ref or reference(xt, w_ref, qm)
    R = y.shape[0]
    err = (y.double() - ref[:R]).abs()
    assert (err <= bound[:R]).all(), f"max error {err.max():.3g}, bound {bound.max():.3g}"


def x_tilde(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """The activations as the kernels see them, in float64: the sum of each row's levels."""
    xq, xd, _ = qblocks.quantize_activations(x, levels)
    each = (xq.double().view(xq.shape[0], -1, 32) * xd.double()[..., None]).view(xq.shape)
    return each.view(x.shape[0], levels, -1).sum(1)


# ---- the weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BLOCK))
def test_repacked_weights_are_exactly_gguf_dequantization(kind):
    for n_in in INS[kind]:
        for out in (1, 17):
            raw = random_blocks(kind, out, n_in, seed=n_in + out)
            qm = qblocks.repack(raw, kind, out, n_in)
            assert (qm.bits, qm.group) == KIND[kind] and qm.codes.dtype == torch.uint8
            assert qm.nbytes == qm.codes.numel() + (qm.d.numel() + qm.m.numel()) * qm.d.element_size()
            assert torch.equal(qblocks.dequantize(qm), torch.from_numpy(gguf_weights(raw, kind)))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_repack_of_gguf_quantized_floats(kind):
    w = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32) * 0.05
    raw = quants.quantize(w, T[kind])
    qm = qblocks.repack(raw, kind, 5, 96)
    ref = gguf_weights(raw, kind)
    assert torch.equal(qblocks.dequantize(qm), torch.from_numpy(ref))
    assert np.abs(ref - w).max() < 0.07 * np.abs(w).max()  # the gguf round trip itself is sane (4 bits: d / 2)
    assert qm.d.dtype == torch.float16


def test_the_4bit_layout_is_64_element_chunks():
    """Element i's code sits where the kernels read it: chunk c = i // 64, byte 32c + i % 32, low nibble
    for i % 64 < 32; the trailing 32 of a 96-row in ggml's order (low nibble j, high 16 + j)."""
    codes = torch.from_numpy(np.arange(96, dtype=np.uint8) % 16).reshape(1, 96)
    raw = np.zeros((1, 3, 18), np.uint8)
    raw[0, :, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    q = codes.numpy().reshape(3, 2, 16)
    raw[0, :, 2:] = q[:, 0] | (q[:, 1] << 4)
    qm = qblocks.repack(raw, "Q4_0", 1, 96)
    b = qm.codes[0].numpy()
    for i in range(64):
        assert (b[i % 32] >> (4 * (i // 32))) & 15 == i % 16
    for j in range(16):
        assert b[32 + j] & 15 == (64 + j) % 16 and b[32 + j] >> 4 == (80 + j) % 16


def test_overflowing_float16_offsets_take_float32_scales():
    """m = -8 d (Q4_0) and -128 d (Q8_0) would overflow float16 for large d: the scales become float32,
    still exact."""
    for kind, big in (("Q4_0", 9000.0), ("Q8_0", 600.0)):
        raw = random_blocks(kind, 3, 64, seed=1)
        raw[1, 0:2] = np.array([big], np.float16).view(np.uint8)
        qm = qblocks.repack(raw, kind, 3, 64)
        assert qm.d.dtype == torch.float32
        assert torch.equal(qblocks.dequantize(qm), torch.from_numpy(gguf_weights(raw, kind)))


def test_repack_rejects_bad_input():
    raw = random_blocks("Q4_0", 2, 64, seed=0)
    with pytest.raises(ValueError, match="model: "):
        qblocks.repack(raw[:, :-1], "Q4_0", 2, 64)
    with pytest.raises(ValueError, match="model: "):
        qblocks.repack(raw, "Q4_0", 2, 48)
    with pytest.raises(ValueError, match="model: "):
        qblocks.repack(raw, "Q5_0", 2, 64)
    with pytest.raises(ValueError, match="model: "):
        qblocks.repack(random_blocks("Q4_K", 1, 256, 0), "Q4_K", 2, 128)


def test_from_float_is_q8_0_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 96, generator=g) * torch.logspace(-2, 1, 7)[:, None]
    w[2, 32:64] = 0.0
    qm = qblocks.from_float(w)
    assert (qm.bits, qm.group, qm.d.dtype) == (8, 32, torch.float16)
    d = qm.d.float().repeat_interleave(32, dim=1)
    assert ((qblocks.dequantize(qm) - w).abs() <= d / 2 * (1 + 1e-6)).all()
    assert (qm.codes[2, 32:64] == 128).all() and qm.d[2, 1] == 0
    assert int(qm.codes.min()) >= 1  # codes 1..255: |q| <= 127
    tiny = qblocks.from_float(w * 1e-4)  # scales below float16's normal range: float32 instead
    assert tiny.d.dtype == torch.float32
    assert ((qblocks.dequantize(tiny) - w * 1e-4).abs() <= tiny.d.repeat_interleave(32, 1) / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="model: "):
        qblocks.from_float(torch.zeros(2, 40))


# ---- the activations ----------------------------------------------------------------------------------


def activations(R: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, generator=g) * torch.logspace(-3, 2, n // 32).repeat_interleave(32)
    x[0, :32] = 0.0  # an all-zero block
    if n >= 64:
        x[0, 32:64] = 0.0
        x[0, 40] = -3.0  # one nonzero value
    return x


def test_activation_quantizer_by_hand():
    x = activations(3, 96, 0)
    xq, xd, xs = qblocks.quantize_activations(x)
    blocks = x.view(3, 3, 32)
    want_d = torch.from_numpy(blocks.abs().amax(-1).numpy() / np.float32(127))
    assert torch.equal(xd, want_d)
    xt = xq.float().view(3, 3, 32) * xd[..., None]
    assert ((xt - blocks).abs() <= xd[..., None] / 2 * (1 + 1e-6)).all()
    assert int(xq.abs().max()) == 127 and (xq[0, :32] == 0).all() and xd[0, 0] == 0
    assert xq[0, 40] == -127 and (xq[0, 32:64] != 0).sum() == 1
    assert torch.equal(xs, xd.repeat_interleave(2, 1) * xq.view(3, 6, 16).float().sum(-1))
    # halves round to even: x / xd = k + 1/2 exactly (xd = 1)
    h = torch.zeros(1, 32)
    h[0, :9] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.49])
    hq, hd, _ = qblocks.quantize_activations(h)
    assert hd[0, 0] == 1.0 and hq[0, :9].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, 3]


def test_two_level_quantizer_rounds_the_first_levels_error():
    """levels=2: row r's level 0 is the one-level rounding; level 1 is that rounding's error, rounded the
    same way; together within max|x| / (127 * 254) of x per block, where one level is within max|x| / 254."""
    x = activations(3, 96, 5)
    q1, d1, s1 = qblocks.quantize_activations(x)
    q2, d2, s2 = qblocks.quantize_activations(x, levels=2)
    assert q2.shape == (6, 96) and d2.shape == (6, 3) and s2.shape == (6, 6)
    assert torch.equal(q2[0::2], q1) and torch.equal(d2[0::2], d1) and torch.equal(s2[0::2], s1)
    err = x.double() - (q1.double().view(3, 3, 32) * d1.double()[..., None]).view(3, 96)
    lq, ld, _ = qblocks.quantize_activations(err.float())  # the error, exact in float32 here
    assert torch.equal(q2[1::2], lq) and torch.equal(d2[1::2], ld)
    amax = x.view(3, 3, 32).abs().amax(-1, keepdim=True).double()
    one = (x_tilde(x) - x.double()).view(3, 3, 32).abs()
    two = (x_tilde(x, 2) - x.double()).view(3, 3, 32).abs()
    assert (one <= amax / 254 * (1 + 1e-6)).all() and (two <= amax / (127 * 254) * (1 + 1e-5)).all()
    assert two.max() < one.max() / 50
    assert (q2[0, :32] == 0).all() and (q2[1, :32] == 0).all() and d2[1, 0] == 0  # the zero block stays zero
    with pytest.raises(ValueError, match="levels"):
        qblocks.quantize_activations(x, levels=3)


def test_native_activation_quantizer_equals_the_reference(lib, one_thread):
    for n in (32, 96, 576):
        x = activations(5, n, n)
        for levels in (1, 2):
            got = qblocks.quantize_activations_native(x, lib, levels)
            want = qblocks.quantize_activations(x, levels)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (n, levels)
    h = torch.zeros(1, 32)
    h[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    assert qblocks.quantize_activations_native(h, lib)[0][0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]


# ---- the products -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BLOCK))
def test_block_matmul_equals_float64_product(lib, kind, one_thread):
    """Odd output sizes, rows with a trailing half chunk (96, 576) and several blocks of 16 groups
    (1536); every R from 1 to 16 at one input size, 1, 5 and 16 at the others."""
    for n_in in INS[kind]:
        x = activations(16, n_in, n_in)
        xt = x_tilde(x)
        for out in OUTS:
            raw = random_blocks(kind, out, n_in, seed=7 * n_in + out)
            qm = qblocks.repack(raw, kind, out, n_in)
            w_ref = torch.from_numpy(gguf_weights(raw, kind)).double()
            ref = reference(xt, w_ref, qm)
            for R in range(1, 17) if n_in == INS[kind][-2] else (1, 5, 16):
                check_matmul(qblocks.matmul(x[:R], qm, lib=lib), xt[:R], w_ref, qm, ref)


@pytest.mark.parametrize("kind", list(BLOCK))
def test_two_level_block_matmul_equals_float64_product(lib, kind, one_thread):
    """levels=2: an output row sums the products of its row's two levels (rows of x in passes of 16 never
    split a pair); as exact as one level against its own x~, and ~100x nearer the unrounded product."""
    n_in = INS[kind][-2]
    x = activations(16, n_in, 3)
    xt = x_tilde(x, 2)
    for out in (17, 65):
        raw = random_blocks(kind, out, n_in, seed=out)
        qm = qblocks.repack(raw, kind, out, n_in)
        w_ref = torch.from_numpy(gguf_weights(raw, kind)).double()
        ref = reference(xt, w_ref, qm)
        exact = x.double() @ w_ref.T
        for R in (1, 3, 8, 9, 16):
            y = qblocks.matmul(x[:R], qm, lib=lib, levels=2)
            check_matmul(y, xt[:R], w_ref, qm, ref)
            one = (qblocks.matmul(x[:R], qm, lib=lib) - exact[:R]).abs().max()
            assert (y.double() - exact[:R]).abs().max() < one / 30
        y = torch.full((5, out + 3), 0.5)  # accumulating into a strided output, as the fused step does
        qblocks.matmul_rows(x[:5], qm, y, accumulate=True, lib=lib, levels=2)
        assert (y[:, out:] == 0.5).all()
        check_matmul(y[:, :out] - 0.5, xt[:5], w_ref, qm, ref)


def test_threads_split_rows(lib):
    """Two threads (the conftest's count) share the output rows: every row written, the same values."""
    for kind, n_in in (("Q4_1", 576), ("Q6_K", 256)):
        raw = random_blocks(kind, 65, n_in, seed=4)
        qm = qblocks.repack(raw, kind, 65, n_in)
        x = activations(16, n_in, 4)
        w_ref = torch.from_numpy(gguf_weights(raw, kind)).double()
        for R in (1, 16):
            check_matmul(qblocks.matmul(x[:R], qm, lib=lib), x_tilde(x[:R]), w_ref, qm)


@pytest.mark.parametrize("kind,dtype", [("Q4_0", torch.float32), ("Q8_0", torch.float32), ("Q6_K", torch.float16)])
def test_block_matmul_other_scale_dtypes(lib, kind, dtype, one_thread):
    """float32 scales for 4- and 8-bit groups of 32, float16 for groups of 16 (the kernels take either)."""
    n_in = 576 if kind != "Q6_K" else 512
    raw = random_blocks(kind, 9, n_in, seed=3)
    qm = qblocks.repack(raw, kind, 9, n_in)
    qm = qblocks.QMatrix(qm.codes, qm.d.to(dtype), qm.m.to(dtype), qm.bits, qm.group, 9, n_in)
    w_ref = qblocks.dequantize(qm).double()  # exact for the converted scales (checked against gguf above)
    x = activations(5, n_in, 1)
    check_matmul(qblocks.matmul(x, qm, lib=lib), x_tilde(x), w_ref, qm)


def test_block_matmul_rows_accumulates_into_strided_output(lib, one_thread):
    raw = random_blocks("Q4_1", 17, 96, seed=5)
    qm = qblocks.repack(raw, "Q4_1", 17, 96)
    w_ref = torch.from_numpy(gguf_weights(raw, "Q4_1")).double()
    for R in (1, 4, 16, 21):  # more than 16 rows: one pass per 16
        x = activations(R, 96, R)
        y = torch.full((R, 40), 0.5)
        qblocks.matmul_rows(x, qm, y, accumulate=False, lib=lib)
        assert (y[:, 17:] == 0.5).all()
        check_matmul(y[:, :17], x_tilde(x), w_ref, qm)
        before = y[:, :17].clone()
        qblocks.matmul_rows(x, qm, y, accumulate=True, lib=lib)
        assert torch.allclose(y[:, :17], 2 * before, rtol=1e-6, atol=0) and (y[:, 17:] == 0.5).all()


def test_block_matmul_of_from_float_weights(lib, one_thread):
    w = torch.randn(49, 576, generator=torch.Generator().manual_seed(2)) * 0.02
    qm = qblocks.from_float(w)
    x = activations(3, 576, 2)
    check_matmul(qblocks.matmul(x, qm, lib=lib), x_tilde(x), qblocks.dequantize(qm).double(), qm)
    assert (qblocks.matmul(x, qm, lib=lib) - x @ w.T).abs().max() < 0.02 * (x @ w.T).abs().max()


@pytest.mark.parametrize("kind", list(BLOCK))
def test_dequant_rows_and_bfloat16_copy(lib, kind, one_thread):
    n_in = INS[kind][1]
    raw = random_blocks(kind, 33, n_in, seed=11)
    qm = qblocks.repack(raw, kind, 33, n_in)
    w_ref = torch.from_numpy(gguf_weights(raw, kind))
    ids = torch.tensor([5, 0, 32, 5])
    assert torch.equal(qblocks.dequant_rows(qm, ids, lib=lib), w_ref[ids])
    assert torch.equal(qblocks.to_bfloat16(qm, lib=lib), w_ref.to(torch.bfloat16))
    with pytest.raises(ValueError, match="model: "):
        qblocks.dequant_rows(qm, torch.tensor([33]), lib=lib)


def test_fallbacks_without_the_native_library():
    raw = random_blocks("Q4_K", 5, 256, seed=2)
    qm = qblocks.repack(raw, "Q4_K", 5, 256)
    x = activations(2, 256, 0)
    with native.switched_off():
        y = qblocks.matmul(x, qm)
        y2 = qblocks.matmul(x, qm, levels=2)
        rows = qblocks.dequant_rows(qm, torch.tensor([4, 1]))
        bf = qblocks.to_bfloat16(qm)
    w_ref = torch.from_numpy(gguf_weights(raw, "Q4_K"))
    check_matmul(y, x_tilde(x), w_ref.double(), qm)
    check_matmul(y2, x_tilde(x, 2), w_ref.double(), qm)
    assert torch.equal(rows, w_ref[[4, 1]]) and torch.equal(bf, w_ref.to(torch.bfloat16))


# ---- the tiled copy (AVX-512 VNNI builds): 16 output rows to a vector ----------------------------------


def _tiled(kind: str, out: int, n_in: int, seed: int):
    raw = random_blocks(kind, out, n_in, seed)
    qm = qblocks.repack(raw, kind, out, n_in)
    if not qm.tile():
        pytest.skip("this build has no tiled kernel (it needs AVX-512 VNNI)")
    return raw, qm


@pytest.fixture
def every_row_count_tiled():
    lib = qblocks._native()
    if lib is None:
        pytest.skip("no native library")
    lib.qb_set_tile_rows(1)
    yield lib
    lib.qb_set_tile_rows(1)


def test_tile_layout_is_four_codes_of_sixteen_rows_a_vector():
    """tile_codes[((t * units + u) * 8 + k) * 64 + 4 j + b] = codes[16 t + j][32 u + 4 k + b]; scales as
    float32 [out / 16][groups][16]."""
    for kind, out, n_in in (("Q4_1", 32, 128), ("Q8_0", 48, 96)):
        _, qm = _tiled(kind, out, n_in, seed=1)
        codes, d, m = qm.tiles
        units = qm.codes.shape[1] // 32
        want = qm.codes.view(out // 16, 16, units, 8, 4).permute(0, 2, 3, 1, 4).reshape(-1)
        assert torch.equal(codes, want)
        ng = n_in // 32
        assert torch.equal(d, qm.d.float().view(out // 16, 16, ng).transpose(1, 2).reshape(-1))
        assert torch.equal(m, qm.m.float().view(out // 16, 16, ng).transpose(1, 2).reshape(-1))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_tiled_kernel_equals_float64_product(kind, every_row_count_tiled, one_thread):
    """Every R from 1 to 16 and in passes of 16 (21, 32), several tiles and units, against the float64
    product of gguf's dequantization; the same values as the row kernel to float32 rounding."""
    for out, n_in in ((16, 256), (48, 576), (64, 1536)) if kind != "Q4_K" else ((16, 256), (48, 768)):
        raw, qm = _tiled(kind, out, n_in, seed=out + n_in)
        w_ref = torch.from_numpy(gguf_weights(raw, kind)).double()
        x = activations(32, n_in, out)
        xt = x_tilde(x)
        ref = reference(xt, w_ref, qm)
        rows_only = qblocks.QMatrix(qm.codes, qm.d, qm.m, qm.bits, qm.group, out, n_in)  # no tiles
        for R in (*range(1, 17), 21, 32):
            y = qblocks.matmul(x[:R], qm)
            check_matmul(y, xt[:R], w_ref, qm, ref)
            y_rows = qblocks.matmul(x[:R], rows_only)
            assert torch.allclose(y, y_rows, rtol=1e-5, atol=1e-5 * float(y_rows.abs().max()))
        xt2 = x_tilde(x, 2)
        ref2 = reference(xt2, w_ref, qm)
        for R in (1, 7, 8, 9, 21):  # two levels: 2R rows of x, in blocks of 16 that never split a pair
            check_matmul(qblocks.matmul(x[:R], qm, levels=2), xt2[:R], w_ref, qm, ref2)


def test_tiled_kernel_accumulates_into_strided_output_and_threads_split_tiles(every_row_count_tiled):
    raw, qm = _tiled("Q4_1", 64, 128, seed=5)
    w_ref = torch.from_numpy(gguf_weights(raw, "Q4_1")).double()
    for R in (1, 16, 21):
        x = activations(R, 128, R)
        y = torch.full((R, 80), 0.5)
        qblocks.matmul_rows(x, qm, y, accumulate=False)
        assert (y[:, 64:] == 0.5).all()
        check_matmul(y[:, :64], x_tilde(x), w_ref, qm)
        before = y[:, :64].clone()
        qblocks.matmul_rows(x, qm, y, accumulate=True)
        assert torch.allclose(y[:, :64], 2 * before, rtol=1e-6, atol=0)
        check_matmul(qblocks.matmul(x, qm), x_tilde(x), w_ref, qm)  # two threads: every tile written


def test_shapes_without_a_tiled_kernel_keep_the_row_kernel():
    """Output rows not a multiple of 16, 4-bit rows ending in half a chunk, groups of 16: no tiles, and the
    matrix computes as before."""
    if qblocks._native() is None or not qblocks.repack(random_blocks("Q8_0", 16, 64, 0), "Q8_0", 16, 64).tile():
        pytest.skip("this build has no tiled kernel")
    for kind, out, n_in in (("Q4_1", 17, 128), ("Q4_1", 16, 96), ("Q6_K", 16, 256)):
        raw = random_blocks(kind, out, n_in, seed=2)
        qm = qblocks.repack(raw, kind, out, n_in)
        assert not qm.tile() and qm.tiles is None
        x = activations(5, n_in, 1)
        check_matmul(qblocks.matmul(x, qm), x_tilde(x), torch.from_numpy(gguf_weights(raw, kind)).double(), qm)
