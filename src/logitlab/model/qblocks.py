"""Matrices kept in GGUF's quantized block formats, and the matrix product computed on the blocks.

A GGUF file stores most matrices as blocks of small integer codes with a scale (and an offset) per block
of 32 (Q4_0, Q4_1, Q8_0) or per sub-block of a 256-element super-block (Q4_K, Q6_K). Decode reads every
weight once per token and is bound by memory bandwidth, so computing on the blocks moves a few bits per
weight where float32 moves 32, and the weights stay exactly the file's.

Every supported type is repacked once, at load, into one form, so that a few kernels (``qblocks.c``)
cover them all: ``value = d[g] * code + m[g]`` with an unsigned code and one (d, m) pair per group
of ``group`` elements of a row.

===========  ====  =====  ===============================================================
GGUF type    bits  group  d, m
===========  ====  =====  ===============================================================
Q4_0         4     32     float16: the file's d, m = -8 d (code = q)
Q4_1         4     32     float16: the file's d and m
Q8_0         8     32     float16: the file's d, m = -128 d (code = q + 128)
Q4_K         4     32     float32: d * sc_j, -dmin * m_j (exact in float32, not in float16)
Q6_K         8     16     float32: d * sc_j, -32 d sc_j (code = q, 0..63)
other        8     32     ``from_float``: requantized to the Q8_0 form (lossy; the loader warns)
===========  ====  =====  ===============================================================

Repacked, a weight takes 5 bits (Q4_0, Q4_1: the file's 4.5 and 5), 9 (Q8_0: 8.5), 6 (Q4_K: 4.5) or 12
(Q6_K: 6.6): the price of one unpacking and one multiply-add per group for every type.
(Q4_0 / Q8_0 with scales so large that -8 d / -128 d overflow float16, and ``from_float`` blocks whose
scale would be a float16 subnormal, get float32 scales: still exact, or as precise as Q8_0 can be.)

``codes`` is uint8 [out, in / 2] for 4 bits, [out, in] for 8. A 4-bit row is chunks of 64 elements in
32 bytes, byte j holding element j in its low nibble and element 32 + j in its high one: one 32-byte
load, shifted and masked, gives 64 codes in order (Q4_K's own layout, so its codes are copied as they
are). A trailing 32 elements (``in % 64 == 32``) keep ggml's order: low nibble j, high 16 + j.

The activations are rounded as llama.cpp rounds them: per block of 32, ``xd = max|x| / 127``,
``xq = round(x / xd)`` (int8, half to even) and per group of 16 ``xs = xd * sum(xq)``. Then
``y = sum_g d xd (codes . xq) + sum_g m xs`` is exactly ``W x~`` with ``x~ = xd * xq``: integer dot
products (u8 x s8, AVX-512 VNNI) with one float multiply-add per group. ``matmul_reference`` computes
the same in float64 from the torch references below, which are what the C is tested against.

With ``levels=2`` (``--activations int8x2``) each row of x becomes two int8 rows: the rounding above, and
the same rounding of its error ``x - xd * xq``. Their products are summed into one output row, so ``x~``
is ``x`` to about 16 bits (greedy text equal to float32's, tests/test_gguf_dtype.py) for twice the integer
work: a little at one decode row, which is bound by reading the weights, and twice at prefill and large
batches, which are bound by the dot products (BENCHMARKS.md).

Where the native library cannot be built (``native.available()`` False) every function here runs its
PyTorch reference instead: slower, same results (to float32 rounding in ``matmul``).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from . import native

# Rows one pass of the row kernel serves (more take a pass per 16). Measured against oneDNN's bfloat16 GEMM over
# a dequantized copy (AVX512_BF16, no AMX), one thread: the kernel is faster through 16 rows (1.4-2x at 1-4,
# ~1.1x at 16) and about even at 24-32, so callers may route up to this many rows to it. A matrix with a tiled
# copy (``QMatrix.tile``) takes any number of rows: 2x the GEMM's prefill rate.
MAX_ROWS = 16
KERNELS = ((4, 32), (8, 32), (8, 16))  # (bits, group) the C kernels implement
# How the activations are rounded (``Engine.load(activations=...)``): the int8 levels per block of 32.
# "int8" is llama.cpp's rounding; "int8x2" adds a second int8 level for the first one's error (about 16 bits:
# greedy text equals float32's where int8's parts from it at near-ties) at twice the integer work.
ACTIVATION_LEVELS = {"int8": 1, "int8x2": 2}

# bytes per block and elements per block of each GGUF type computed on as it is
_BLOCK = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q8_0": (34, 32), "Q4_K": (144, 256), "Q6_K": (210, 256)}
_F16_MIN_NORMAL = 2.0**-14


class QbMat(ctypes.Structure):
    """``qb_mat`` in qblocks.c."""

    _fields_ = [("out", ctypes.c_int64), ("in_", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("group", ctypes.c_int32), ("scale_f32", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("codes", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("tile_codes", ctypes.c_void_p), ("tile_d", ctypes.c_void_p), ("tile_m", ctypes.c_void_p)]


class QMatrix:
    """W [out_features, in_features] as ``d * code + m`` per group (see the module docstring)."""

    tiles = None  # (codes, d, m) of the tiled copy (``tile``); also for a QMatrix unpickled from a cache
    _tiled_from = None  # the (codes, d, m) pointers the tiles were made from

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, group: int,
                 out_features: int, in_features: int):
        if (bits, group) not in KERNELS or in_features % 32 or in_features <= 0 or out_features < 0:
            raise ValueError(f"model: no block kernel for {bits}-bit codes in groups of {group} "
                             f"over {in_features} inputs")
        ng = in_features // group
        if (codes.dtype != torch.uint8 or tuple(codes.shape) != (out_features, in_features * bits // 8)
                or d.dtype not in (torch.float16, torch.float32) or m.dtype != d.dtype
                or tuple(d.shape) != (out_features, ng) or tuple(m.shape) != (out_features, ng)):
            raise ValueError(f"model: block matrix tensors {tuple(codes.shape)} {codes.dtype}, d {tuple(d.shape)} "
                             f"{d.dtype}, m {tuple(m.shape)} {m.dtype} for [{out_features}, {in_features}]")
        self.codes, self.d, self.m = codes.contiguous(), d.contiguous(), m.contiguous()
        self.bits, self.group = bits, group
        self.out_features, self.in_features = out_features, in_features
        self.tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see ``tile``
        self._struct: tuple | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m))

    def tile(self, lib=None) -> bool:
        """Make the tiled copy the AVX-512 VNNI kernel computes on (qblocks.c, "tiles": the same codes, 16
        output rows to a vector, the scales as float32), where this build and shape take one; ``BlockLinear``
        makes it on first use. It costs the codes' size again plus 8 bytes per group (~130 MB for SmolLM2-135M
        Q4_1) and buys every row count the tiled kernel: 1.1x at one row, 1.8x at 32, 2x the bfloat16 GEMM's
        prefill. Returns whether the matrix has it."""
        lib = _bind(lib) if lib is not None else _native()
        source = (self.codes.data_ptr(), self.d.data_ptr(), self.m.data_ptr())
        if self.tiles is not None and self._tiled_from != source:  # the weights were replaced: tile again
            self.tiles = None
        if self.tiles is None and lib is not None and self.out_features and lib.qb_tile_ok(ctypes.byref(self.struct())):
            ng = self.in_features // 32
            codes = torch.empty(self.codes.numel(), dtype=torch.uint8)
            d, m = torch.empty(self.out_features * ng), torch.empty(self.out_features * ng)
            lib.qb_tile(ctypes.byref(self.struct()), codes.data_ptr(), d.data_ptr(), m.data_ptr())
            self.tiles, self._tiled_from = (codes, d, m), source
        return self.tiles is not None

    def struct(self) -> QbMat:
        """The C view (``qb_mat``); rebuilt if a tensor was replaced. The tensors must outlive it: they
        do while this QMatrix keeps them."""
        current = self.tiles is not None and self._tiled_from == (self.codes.data_ptr(), self.d.data_ptr(),
                                                                    self.m.data_ptr())
        tiles = tuple(t.data_ptr() for t in self.tiles) if current else (None, None, None)
        key = (self.codes.data_ptr(), self.d.data_ptr(), self.m.data_ptr(), self.out_features, *tiles)
        if self._struct is None or self._struct[0] != key:
            s = QbMat(self.out_features, self.in_features, self.bits, self.group, int(self.d.dtype == torch.float32),
                      0, *key[:3], *tiles)
            self._struct = (key, s)
        return self._struct[1]

    def __repr__(self) -> str:
        return (f"QMatrix([{self.out_features}, {self.in_features}], {self.bits}-bit, group {self.group}, "
                f"{str(self.d.dtype).removeprefix('torch.')} scales)")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_struct"] = None  # raw pointers: rebuilt on use
        state["tiles"] = state["_tiled_from"] = None  # derived, made again where wanted
        return state


# ---- repacking -------------------------------------------------------------------------------------


def _pack4(qs: np.ndarray) -> np.ndarray:
    """ggml 32-element blocks' nibbles (out, nblk, 16: low nibble j, high 16 + j) -> the packed rows:
    two blocks a, b make a chunk whose byte j < 16 is (a_j, b_j) and byte 16 + j is (a_16+j, b_16+j)."""
    out, nblk, _ = qs.shape
    a, b = qs[:, 0:nblk - 1:2], qs[:, 1:nblk:2]
    parts = [np.concatenate([(a & 15) | (b << 4), (a >> 4) | (b & 0xF0)], axis=2).reshape(out, -1)]
    if nblk % 2:  # the trailing 32 stay in ggml's order
        parts.append(qs[:, -1])
    return np.ascontiguousarray(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])


def _f16(a: np.ndarray) -> np.ndarray:
    return a.view(np.float16).reshape(a.shape[:-1])


def _scales(d: np.ndarray, m: np.ndarray, exact_f16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 if both fit exactly, float32 otherwise."""
    if exact_f16:
        with np.errstate(invalid="ignore", over="ignore"):
            d16, m16 = d.astype(np.float16), m.astype(np.float16)
            if np.array_equal(d16.astype(np.float32), d, equal_nan=True) and \
                    np.array_equal(m16.astype(np.float32), m, equal_nan=True):
                return torch.from_numpy(d16), torch.from_numpy(m16)
    return torch.from_numpy(np.ascontiguousarray(d, np.float32)), torch.from_numpy(np.ascontiguousarray(m, np.float32))


def repack(raw: np.ndarray, ggml_type: str, out: int, in_: int) -> QMatrix:
    """The bytes of a GGUF tensor of type ``ggml_type`` holding W [out, in_] (GGUF's ne = [in_, out])
    -> the QMatrix of exactly those weights."""
    if ggml_type not in _BLOCK:
        raise ValueError(f"model: no block kernel for GGUF type {ggml_type} (use from_float)")
    nbytes, nelem = _BLOCK[ggml_type]
    if out <= 0 or in_ <= 0 or in_ % nelem:
        raise ValueError(f"model: a {ggml_type} row of {in_} elements is not whole blocks of {nelem}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    nblk = in_ // nelem
    if raw.size != out * nblk * nbytes:
        raise ValueError(f"model: {ggml_type} [{out}, {in_}] takes {out * nblk * nbytes} bytes, got {raw.size}")
    b = raw.reshape(out, nblk, nbytes)
    if ggml_type in ("Q4_0", "Q4_1"):
        d = _f16(b[:, :, 0:2].copy()).astype(np.float32)
        m = _f16(b[:, :, 2:4].copy()).astype(np.float32) if ggml_type == "Q4_1" else d * np.float32(-8)
        dt, mt = _scales(d, m, exact_f16=True)
        return QMatrix(torch.from_numpy(_pack4(b[:, :, nbytes - 16:])), dt, mt, 4, 32, out, in_)
    if ggml_type == "Q8_0":
        d = _f16(b[:, :, 0:2].copy()).astype(np.float32)
        codes = (b[:, :, 2:] ^ np.uint8(0x80)).reshape(out, in_)  # int8 q -> q + 128
        dt, mt = _scales(d, d * np.float32(-128), exact_f16=True)
        return QMatrix(torch.from_numpy(np.ascontiguousarray(codes)), dt, mt, 8, 32, out, in_)
    if ggml_type == "Q4_K":
        d = _f16(b[:, :, 0:2].copy()).astype(np.float32)[..., None]
        dmin = _f16(b[:, :, 2:4].copy()).astype(np.float32)[..., None]
        s = b[:, :, 4:16].astype(np.uint8)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        dd = (d * sc.astype(np.float32)).reshape(out, -1)  # products of an f16 and a 6-bit integer: exact
        mm = -(dmin * mn.astype(np.float32)).reshape(out, -1)
        codes = np.ascontiguousarray(b[:, :, 16:]).reshape(out, in_ // 2)  # already 64-element chunks
        return QMatrix(torch.from_numpy(codes), torch.from_numpy(dd), torch.from_numpy(mm), 4, 32, out, in_)
    # Q6_K: ql[128] qh[64] scales[16] (int8) d (f16); element 128h + 64s + i (s < 2, i < 64) has its low
    # bits in nibble s of ql[64h + i] and its high two in bits 2k of qh[32h + i % 32], k = (64s + i) // 32
    ql, qh = b[:, :, 0:128].reshape(out, nblk, 2, 64), b[:, :, 128:192].reshape(out, nblk, 2, 1, 32)
    low = np.stack([ql & 15, ql >> 4], axis=3).reshape(out, nblk, 2, 128)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3).reshape(out, nblk, 2, 128)
    codes = (low | (high << 4)).reshape(out, in_)
    sc = b[:, :, 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[:, :, 208:210].copy()).astype(np.float32)[..., None]
    dd = (d * sc).reshape(out, -1)  # f16 times an int8: exact in float32
    return QMatrix(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(dd),
                   torch.from_numpy(dd * np.float32(-32)), 8, 16, out, in_)


def from_float(w: torch.Tensor) -> QMatrix:
    """Any float matrix [out, in] (in a multiple of 32) requantized to the Q8_0 form: per 32, d =
    max|w| / 127 (float16 where every d is a normal float16, else float32), codes round(w / d) + 128."""
    w = w.detach().float().contiguous()
    if w.dim() != 2 or w.shape[1] % 32 or w.shape[1] == 0:
        raise ValueError(f"model: cannot block-quantize a tensor of shape {tuple(w.shape)} (rows of 32s)")
    out, n = w.shape
    blocks = w.view(out, n // 32, 32)
    d = blocks.abs().amax(-1) / 127
    d16 = d.to(torch.float16)
    half = bool(torch.isfinite(d16 * -128).all() and (d16.float()[d != 0] >= _F16_MIN_NORMAL).all())
    if half:
        d = d16.float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127)
    q = torch.where((d == 0)[..., None], torch.zeros_like(q), q)
    codes = (q + 128).to(torch.uint8).reshape(out, n)
    m = d * -128
    if half:
        return QMatrix(codes, d16, m.to(torch.float16), 8, 32, out, n)
    return QMatrix(codes, d, m, 8, 32, out, n)


# ---- torch references ------------------------------------------------------------------------------


def _codes(qm: QMatrix, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Codes in natural order, uint8 [rows, in]."""
    c = qm.codes if rows is None else qm.codes[rows]
    if qm.bits == 8:
        return c
    n = qm.in_features
    full = n // 64 * 64
    body = c[:, : full // 2].reshape(c.shape[0], n // 64, 1, 32)
    parts = [torch.cat([body & 15, body >> 4], dim=2).reshape(c.shape[0], full)]
    if n > full:
        t = c[:, full // 2:]
        parts.append(torch.cat([t & 15, t >> 4], dim=1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def dequantize(qm: QMatrix, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weights in float32 [out, in] (or the given rows): ``d * code + m``, each product exact, so
    this is exactly the file's dequantization."""
    d = qm.d.float() if rows is None else qm.d[rows].float()
    m = qm.m.float() if rows is None else qm.m[rows].float()
    c = _codes(qm, rows).float().view(d.shape[0], -1, qm.group)
    return (c * d[..., None] + m[..., None]).view(d.shape[0], qm.in_features)


def _check_levels(levels: int) -> None:
    if levels not in ACTIVATION_LEVELS.values():
        raise ValueError(f"model: activation levels must be 1 or 2, got {levels!r}")


def quantize_activations(x: torch.Tensor, levels: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, in] float32 (in a multiple of 32) -> (xq int8 [L R, in], xd [L R, in / 32], xs [L R, in / 16]),
    rounded exactly as qb_quantize rounds; L = ``levels``, row r's level j at row L r + j. Level 1 (``levels``
    2) rounds level 0's error, ``x - xd * xq`` (computed in float64, then rounded once to float32: what the
    C's FMA gives), the same way."""
    _check_levels(levels)
    x = x.float().contiguous()
    if levels == 2:
        q0, d0, s0 = quantize_activations(x)
        err = (x.double().view(x.shape[0], -1, 32) - q0.double().view(x.shape[0], -1, 32) * d0.double()[..., None])
        q1, d1, s1 = quantize_activations(err.float().view(x.shape))
        return tuple(torch.stack([a, b], dim=1).flatten(0, 1) for a, b in ((q0, q1), (d0, d1), (s0, s1)))
    R, n = x.shape
    blocks = x.view(R, n // 32, 32)
    amax = blocks.abs().amax(-1)
    xd = amax / torch.full_like(amax, 127.0)  # a true division (a scalar divisor may become a multiply)
    safe = torch.where(xd == 0, torch.ones_like(xd), xd)
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127)
    q = torch.where((xd == 0)[..., None], torch.zeros_like(q), q)
    xq = q.to(torch.int8).view(R, n)
    sums = q.view(R, n // 16, 16).sum(-1)  # integers: exact
    xs = xd.repeat_interleave(2, dim=1) * sums
    return xq, xd, xs


def _rounded(x: torch.Tensor, dtype: torch.dtype, levels: int = 1) -> torch.Tensor:
    """x~ = sum over levels of xd * xq, the activations as the kernels see them, in ``dtype``."""
    xq, xd, _ = quantize_activations(x, levels)
    each = (xq.to(dtype).view(xq.shape[0], -1, 32) * xd.to(dtype)[..., None]).view(xq.shape)
    return each.view(-1, levels, xq.shape[1]).sum(1)


def matmul_reference(x: torch.Tensor, qm: QMatrix, levels: int = 1) -> torch.Tensor:
    """float64 x~ @ W^T, x~ the rounded activations: what ``matmul`` computes, without its float32 sums."""
    return _rounded(x, torch.float64, levels) @ dequantize(qm).double().T


# ---- native ----------------------------------------------------------------------------------------


@functools.cache
def _bind(lib):
    """lib with qblocks.c's argument types declared (once per library)."""
    p, i64, mat = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(QbMat)
    lib.qb_quantize.argtypes = [p, i64, i64, ctypes.c_int, p, p, p]
    lib.qb_matmul_rows.argtypes = [mat, p, p, p, i64, ctypes.c_int, p, i64, ctypes.c_int]
    lib.qb_matmul.argtypes = [mat, p, i64, ctypes.c_int, p]
    lib.qb_dequant_rows.argtypes = [mat, p, i64, p]
    lib.qb_dequant_bf16.argtypes = [mat, p]
    lib.qb_tile.argtypes = [mat, p, p, p]
    lib.qb_tile_ok.argtypes = [mat]
    lib.qb_tile_ok.restype = ctypes.c_int
    lib.qb_set_tile_rows.argtypes = [i64]
    for f in (lib.qb_quantize, lib.qb_matmul_rows, lib.qb_matmul, lib.qb_dequant_rows, lib.qb_dequant_bf16,
              lib.qb_tile, lib.qb_set_tile_rows):
        f.restype = None
    return lib


def _native():
    return _bind(native.library()) if native.available() else None


def _x2(x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != qm.in_features or x.dtype != torch.float32:
        raise ValueError(f"model: block matmul takes float32 x [R, {qm.in_features}], got {tuple(x.shape)} {x.dtype}")
    return x.contiguous()


def matmul(x: torch.Tensor, qm: QMatrix, lib=None, levels: int = 1) -> torch.Tensor:
    """x [R, in] float32 @ W^T -> [R, out] float32, the activations rounded per block of 32 to ``levels``
    int8 levels (module docstring). ``lib``: a library built from qblocks.c (tests); default the native one."""
    x = _x2(x, qm)
    lib = _bind(lib) if lib is not None else _native()
    if lib is None:  # the same product in float32 (slow: the weights are dequantized on every call)
        return _rounded(x, torch.float32, levels) @ dequantize(qm).T
    y = torch.empty(x.shape[0], qm.out_features)
    if x.shape[0] and qm.out_features:
        lib.qb_matmul(ctypes.byref(qm.struct()), x.data_ptr(), x.shape[0], levels, y.data_ptr())
    return y


def matmul_rows(x: torch.Tensor, qm: QMatrix, y: torch.Tensor, accumulate: bool = False, lib=None,
                levels: int = 1) -> torch.Tensor:
    """``qb_matmul_rows`` (quantize here, serial: outside a parallel region) into y [R, >= out] float32,
    rows contiguous, its first ``out`` columns written (``accumulate``: added to). For tests."""
    x = _x2(x, qm)
    lib = _bind(lib if lib is not None else native.library())
    if y.dtype != torch.float32 or y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] < qm.out_features \
            or y.stride(1) != 1:
        raise ValueError("model: matmul_rows writes a float32 y [R, >= out] with contiguous rows")
    xq, xd, xs = quantize_activations_native(x, lib, levels)
    lib.qb_matmul_rows(ctypes.byref(qm.struct()), xq.data_ptr(), xd.data_ptr(), xs.data_ptr(), x.shape[0], levels,
                       y.data_ptr(), y.stride(0), int(accumulate))
    return y


def quantize_activations_native(x: torch.Tensor, lib=None, levels: int = 1) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """``qb_quantize``: the same as ``quantize_activations``."""
    x = x.float().contiguous()
    R, n = x.shape
    if n % 32:
        raise ValueError(f"model: activations of {n} elements are not blocks of 32")
    _check_levels(levels)
    lib = _bind(lib if lib is not None else native.library())
    X = R * levels
    xq, xd, xs = torch.empty(X, n, dtype=torch.int8), torch.empty(X, n // 32), torch.empty(X, n // 16)
    lib.qb_quantize(x.data_ptr(), R, n, levels, xq.data_ptr(), xd.data_ptr(), xs.data_ptr())
    return xq, xd, xs


def dequant_rows(qm: QMatrix, ids: torch.Tensor, lib=None) -> torch.Tensor:
    """Rows ``ids`` (int64 [n]) of W in float32 [n, in]: an embedding lookup on a block table."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < qm.out_features):
        raise ValueError(f"model: a row id is outside the table of {qm.out_features} rows")
    lib = _bind(lib) if lib is not None else _native()
    if lib is None:
        return dequantize(qm, ids)
    out = torch.empty(ids.numel(), qm.in_features)
    lib.qb_dequant_rows(ctypes.byref(qm.struct()), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


def to_bfloat16(qm: QMatrix, lib=None) -> torch.Tensor:
    """W in bfloat16 [out, in] (round to nearest even): the copy the batched GEMM uses."""
    lib = _bind(lib) if lib is not None else _native()
    if lib is None:
        return dequantize(qm).to(torch.bfloat16)
    out = torch.empty(qm.out_features, qm.in_features, dtype=torch.bfloat16)
    if out.numel():
        lib.qb_dequant_bf16(ctypes.byref(qm.struct()), out.data_ptr())
    return out
