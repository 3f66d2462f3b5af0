"""logitlab's one native kernel, ``q8_matmul.c``: the int8-weight matrix product of decode.

PyTorch's own int8 kernel (``aten._weight_int8pack_mm``) reaches about a third of this CPU's memory
bandwidth at one row and takes bfloat16 activations; decode is bandwidth-bound, so a plain loop that
streams the weights once reaches 1.5-2x more (BENCHMARKS.md) and keeps the activations in float32.

The C file ships inside the package and is compiled on first use with the system C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, about half a second) into
``$LOGITLAB_HOME/kernels``, keyed by the source, the flags and the CPU, then loaded with ctypes. No
compiler, a failed build or ``LOGITLAB_NATIVE=0``: ``q8_matmul()`` returns None and Int8Linear keeps
PyTorch's kernel, so nothing but speed depends on this file.
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

SOURCE = Path(__file__).with_name("q8_matmul.c")
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
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache / "kernels" / f"q8_matmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.part")
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"logitlab: no native int8 kernel ({cc}: {e}); using PyTorch's", file=sys.stderr)
        return None
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"logitlab: no native int8 kernel ({cc}: {err}); using PyTorch's", file=sys.stderr)
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
    # kernel binds to: one thread pool, sized by torch.set_num_threads.
    fn = ctypes.CDLL(str(path)).q8_matmul
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p]
    fn.restype = None
    return fn


_switched_off = False


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
    _library()(x.data_ptr(), rows, n_in, qweight.data_ptr(), scale.data_ptr(), n_out, y.data_ptr())
    return y
