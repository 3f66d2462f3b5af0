"""logitlab's native kernels (``kernels.c``), two hot spots of the decode step:

- ``q8_matmul``: the int8-weight matrix product. PyTorch's own int8 kernel (``aten._weight_int8pack_mm``)
  reaches about a third of this CPU's memory bandwidth at one row and takes bfloat16 activations;
  decode is bandwidth-bound, so a plain loop that streams the weights once is 1.3-1.4x faster end to
  end (BENCHMARKS.md) and keeps the activations in float32.
- ``attend_decode``: one new token's attention over the KV cache. PyTorch spends it in the set-up of
  tiny batched matmuls; one pass over the keys and one over the values per (row, head) is several
  times faster.
- ``f32_matmul``: the same streaming product for float32 weights (the default dtype).
- ``rms_norm``, ``silu_mul``, ``rope_store``: the small ops of a decode layer, each a handful of
  PyTorch ops (and their per-call overhead) in one pass.
- ``topk_rows``: the sampler's top-k over a row of logits (torch's CPU topk costs ~120 us a row
  whatever k is, a good part of a 4 ms decode step).
- ``sample_top_p``: temperature, top-p and the draw of a row fused (the common request: some twenty
  tensor ops, each a pass over the vocabulary, become three).

Two more sources are compiled into the same library: ``qblocks.c`` (matmuls on GGUF quantized blocks,
``--dtype gguf``; bound in qblocks.py) and ``step.c`` (a whole decode step in one call; decode_step.py).

The C files ship inside the package and are compiled on first use with the system C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, about a second) into ``$LOGITLAB_HOME/kernels``,
keyed by the source, the flags and the CPU, then loaded with ctypes. No compiler, a failed build or
``LOGITLAB_NATIVE=0``: ``available()`` is False and the model runs its PyTorch code (the reference the
kernels are tested against), so nothing but speed depends on this file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# Compiled together into one library: the per-op kernels, the GGUF block kernels and the fused decode step.
SOURCES = [Path(__file__).with_name(n) for n in ("kernels.c", "qblocks.c", "step.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(cache: Path) -> Path | None:
    cc = os.environ.get("CC", "cc")
    sources = [p for p in SOURCES if p.exists()]
    headers = sorted(SOURCES[0].parent.glob("*.h"))  # included by the sources: part of the key too
    text = b"".join(p.read_bytes() for p in sources + headers)
    key = hashlib.sha256(text + " ".join([cc, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache / "kernels" / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.part")
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, sources), "-o", str(tmp)], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"logitlab: no native kernels ({cc}: {e}); using PyTorch's", file=sys.stderr)
        return None
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"logitlab: no native kernels ({cc}: {err}); using PyTorch's", file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return None
    tmp.replace(out)
    return out


@functools.cache
def _library():
    if os.environ.get("LOGITLAB_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    from ..weights.registry import cache_dir

    path = _build(cache_dir())
    if path is None:
        return None
    # torch is imported first, so the OpenMP runtime it loaded (soname libgomp.so.1) is the one the
    # kernels bind to: one thread pool, sized by torch.set_num_threads.
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. a symbol left undefined: run the PyTorch code rather than fail
        print(f"logitlab: native kernels unusable ({str(e).splitlines()[0][:200]}); using PyTorch's", file=sys.stderr)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q8_matmul.argtypes = [p, i64, i64, p, p, i64, p]
    lib.q8_matmul.restype = None
    lib.attend_decode.argtypes = [p, i64, p, p, i64, i64, i64, i64, i64, i64, p, ctypes.c_float, p]
    lib.attend_decode.restype = None
    lib.f32_matmul.argtypes = [p, i64, i64, p, i64, p]
    lib.f32_matmul.restype = None
    lib.rms_norm.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.rms_norm.restype = None
    lib.silu_mul.argtypes = [p, i64, i64, p]
    lib.silu_mul.restype = None
    lib.rope_store.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, i64, i64, p]
    lib.rope_store.restype = None
    lib.attend_paged.argtypes = [p, i64, p, p, p, i64, i64, i64, i64, i64, i64, p, ctypes.c_float, p]
    lib.attend_paged.restype = None
    lib.rope_store_paged.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, i64, p, p]
    lib.rope_store_paged.restype = None
    lib.topk_rows.argtypes = [p, i64, i64, i64, p, p]
    lib.topk_rows.restype = ctypes.c_int
    lib.sample_top_p_rows.argtypes = [p, i64, i64, p, p, p, p, p, p, p]
    lib.sample_top_p_rows.restype = ctypes.c_int
    return lib


_switched_off = False


def library():
    """The loaded ctypes library (None where it cannot be built), for callers that checked their
    arguments once and call a kernel many times."""
    return _library()


def available() -> bool:
    return not _switched_off and _library() is not None


@contextlib.contextmanager
def switched_off():
    """Run PyTorch's int8 kernel instead, for a side-by-side measurement in one process (bench)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def q8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [R, in] float32 @ (qweight [out, in] int8 * scale [out] float32)^T -> [R, out] float32.
    Call only when ``available()``."""
    x = x.contiguous()
    rows, n_in = x.shape
    n_out = qweight.shape[0]
    if x.dtype != torch.float32 or qweight.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError("q8_matmul takes float32 x, int8 weights and float32 scales")
    if qweight.shape[1] != n_in or scale.shape != (n_out,) or not (qweight.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"q8_matmul: shapes {tuple(x.shape)} @ {tuple(qweight.shape)} / {tuple(scale.shape)}")
    y = torch.empty(rows, n_out)
    _library().q8_matmul(x.data_ptr(), rows, n_in, qweight.data_ptr(), scale.data_ptr(), n_out, y.data_ptr())
    return y


def f32_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, in] @ weight [out, in]^T, float32, contiguous: the float32 decode matmul (weights streamed
    once; PyTorch's one-row F.linear reaches about half the bandwidth)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or not _f32(x, weight):
        raise ValueError("f32_matmul takes contiguous float32 x [R, in] and weight [out, in]")
    y = torch.empty(x.shape[0], weight.shape[0])
    _library().f32_matmul(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0], y.data_ptr())
    return y


def attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot0: int,
                  lens: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one new token per row, over the first ``lens[b]`` cached
    positions of slot ``slot0 + b``: q [B, H, D] float32 (rows may be strided, heads and D contiguous),
    k_cache / v_cache [slots, K, max_pos, D] float32 contiguous (one layer), lens [B] int64
    -> [B, H * D]. Call only when ``available()``."""
    B, H, D = q.shape
    slots, K, max_pos, Dk = k_cache.shape
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        raise TypeError("attend_decode takes float32 queries and caches")
    if (Dk != D or H % K or v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or q.stride(2) != 1 or q.stride(1) != D or not 0 <= slot0 <= slots - B):
        raise ValueError(f"attend_decode: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, slots from {slot0}")
    lens = lens.to(torch.int64).contiguous()  # the kernel clamps each to [1, max_pos]
    if lens.shape != (B,):
        raise ValueError(f"attend_decode: lens {tuple(lens.shape)} for {B} rows")
    out = torch.empty(B, H * D)
    _library().attend_decode(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slot0, B, H, K,
                             max_pos, D, lens.data_ptr(), D**-0.5, out.data_ptr())
    return out


def attend_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``attend_decode`` over a paged cache: pools [blocks, K, bs, D] float32 contiguous (one layer),
    tables [B, width] int64 block ids (every id < blocks), lens [B] -> [B, H * D]. ``check=False``: the
    caller checked the tables and lens once for all layers (contiguous int64, ids in the pool)."""
    B, H, D = q.shape
    n_blocks, K, bs, Dk = k_pool.shape
    if check:
        tables = tables.to(torch.int64).contiguous()
        lens = lens.to(torch.int64).contiguous()
    if check and (not _f32(k_pool, v_pool) or q.dtype != torch.float32 or Dk != D or H % K
                  or v_pool.shape != k_pool.shape or q.stride(2) != 1 or q.stride(1) != D or tables.dim() != 2
                  or tables.shape[0] != B or lens.shape != (B,)):
        raise ValueError(f"attend_paged: q {tuple(q.shape)}, pool {tuple(k_pool.shape)}, tables {tuple(tables.shape)}")
    if check and tables.numel() and not (0 <= int(tables.min()) and int(tables.max()) < n_blocks):
        raise ValueError("attend_paged: a block id is outside the pool")
    out = torch.empty(B, H * D)
    _library().attend_paged(q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(),
                            tables.shape[1], bs, B, H, K, D, lens.data_ptr(), D**-0.5, out.data_ptr())
    return out


def rope_store_paged(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                     k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor,
                     offsets: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``rope_store`` into a paged cache: row b's key/value go to block ``blocks[b]`` at ``offsets[b]``
    (a negative block stores nothing). ``check=False``: blocks/offsets were checked once per forward."""
    n_blocks, K, bs, D = k_pool.shape
    B = qkv.shape[0]
    if check:
        blocks, offsets = blocks.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous()
    if check and not _f32(qkv, cos, signed_sin, k_pool, v_pool) or v_pool.shape != k_pool.shape:
        raise ValueError("rope_store_paged takes contiguous float32 tensors and equal pools")
    if check and (qkv.shape != (B, (num_heads + 2 * K) * D) or cos.shape != (B, D) or signed_sin.shape != (B, D)
                  or blocks.shape != (B,) or offsets.shape != (B,)):
        raise ValueError(f"rope_store_paged: qkv {tuple(qkv.shape)} for {num_heads} heads, pool {tuple(k_pool.shape)}")
    if check and B and (int(blocks.max()) >= n_blocks or int(offsets.min()) < 0 or int(offsets.max()) >= bs):
        raise ValueError("rope_store_paged: a block or offset is outside the pool")
    q = torch.empty(B, num_heads, D)
    _library().rope_store_paged(qkv.data_ptr(), B, num_heads, K, D, cos.data_ptr(), signed_sin.data_ptr(),
                                q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), bs, blocks.data_ptr(),
                                offsets.data_ptr())
    return q


def _f32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, C] / sqrt(mean(x^2) + eps) * weight [C], float32, contiguous."""
    if x.dim() != 2 or weight.shape != x.shape[1:] or not _f32(x, weight):
        raise ValueError("rms_norm takes contiguous float32 x [N, C] and weight [C]")
    out = torch.empty_like(x)
    _library().rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2F] = (gate | up) -> silu(gate) * up [N, F], float32, contiguous."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not _f32(gate_up):
        raise ValueError("silu_mul takes contiguous float32 [N, 2F]")
    N, F2 = gate_up.shape
    out = torch.empty(N, F2 // 2)
    _library().silu_mul(gate_up.data_ptr(), N, F2 // 2, out.data_ptr())
    return out


def rope_store(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot0: int, positions: torch.Tensor) -> torch.Tensor:
    """One new token per row: qkv [B, (H + 2K) D] -> RoPE'd queries [B, H, D]; the RoPE'd keys and the
    values are written into slots ``slot0 + b`` of the layer's caches [slots, K, max_pos, D] at
    ``positions [B]`` (a position outside [0, max_pos) writes nothing). cos / signed_sin [B, D]
    (model.transformer.rope_tables at each position)."""
    slots, K, max_pos, D = k_cache.shape
    B = qkv.shape[0]
    if not _f32(qkv, cos, signed_sin, k_cache, v_cache) or v_cache.shape != k_cache.shape:
        raise ValueError("rope_store takes contiguous float32 tensors and equal caches")
    if qkv.shape != (B, (num_heads + 2 * K) * D) or cos.shape != (B, D) or signed_sin.shape != (B, D):
        raise ValueError(f"rope_store: qkv {tuple(qkv.shape)} for {num_heads} heads, cache {tuple(k_cache.shape)}")
    positions = positions.to(torch.int64).contiguous()
    if positions.shape != (B,) or not 0 <= slot0 <= slots - B:
        raise ValueError("rope_store: one position per row, slots within the cache")
    q = torch.empty(B, num_heads, D)
    _library().rope_store(qkv.data_ptr(), B, num_heads, K, D, cos.data_ptr(), signed_sin.data_ptr(), q.data_ptr(),
                          k_cache.data_ptr(), v_cache.data_ptr(), slot0, max_pos, positions.data_ptr())
    return q


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``x [B, V]`` (float32, contiguous, no NaN), as
    ``x.topk(k, -1)`` returns them (values descending), ties to the lowest id: (values [B, k], ids [B, k])."""
    if x.dim() != 2 or not _f32(x) or not 0 < k <= x.shape[1]:
        raise ValueError(f"topk_rows takes contiguous float32 [B, V] and 0 < k <= V, got {tuple(x.shape)}, k={k}")
    B, V = x.shape
    vals, ids = torch.empty(B, k, device=x.device), torch.empty(B, k, dtype=torch.int64, device=x.device)
    if _library().topk_rows(x.data_ptr(), B, V, k, vals.data_ptr(), ids.data_ptr()) != 0:
        raise MemoryError("topk_rows: no scratch memory")
    return vals, ids


def sample_top_p(x: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor):
    """Temperature, top-p and the inverse-CDF draw of each row of logits ``x [B, V]`` (float32,
    contiguous), as the sampling pipeline defines them (``kernels.c``): returns (tokens [B] long, raw
    logprobs [B], processed logprobs [B], failed [B] bool), or None where a row holds a +inf or NaN logit
    (the pipeline gives those their own meaning). ``temperature`` [B] float32 > 0, ``top_p`` [B] float64 in
    (0, 1], ``u`` [B] float64 uniforms."""
    if x.dim() != 2 or not _f32(x):
        raise ValueError("sample_top_p takes contiguous float32 logits [B, V]")
    B, V = x.shape
    t = temperature.to(torch.float32).contiguous()
    tp, uu = top_p.to(torch.float64).contiguous(), u.to(torch.float64).contiguous()
    if t.shape != (B,) or tp.shape != (B,) or uu.shape != (B,) or not bool((t > 0).all()):
        raise ValueError("sample_top_p: one temperature > 0, top_p and uniform per row")
    dev = x.device
    tokens, failed = torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.uint8, device=dev)
    raw, proc = torch.empty(B, device=dev), torch.empty(B, device=dev)
    rc = _library().sample_top_p_rows(x.data_ptr(), B, V, t.data_ptr(), tp.data_ptr(), uu.data_ptr(),
                                      tokens.data_ptr(), raw.data_ptr(), proc.data_ptr(), failed.data_ptr())
    if rc & 2:
        raise MemoryError("sample_top_p: no scratch memory")
    return None if rc else (tokens, raw, proc, failed.bool())
