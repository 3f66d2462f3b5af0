"""A strict walk over a GGUF file's header, before anything trusts it.

gguf-py's ``GGUFReader`` reads whatever the header says: an array length of 2^62 past the end of the file
loops appending empty views (memory without bound), a tensor offset of 2^64 - 32 wraps in its uint64
arithmetic and maps header bytes as weights, an unaligned offset maps garbage, and most other damage
ends in an IndexError, KeyError or UnicodeDecodeError. ``check_gguf`` reads the same header (GGUF v2/v3,
either byte order) with every length and count bounded by the bytes that are left, and checks the tensor
table: names, at most 4 dimensions, each >= 1, known types whose rows are whole blocks, data offsets
aligned, inside the file and not overlapping. Anything wrong is one line, ``ValueError("model: ...")``.
Only once it passes does the loader hand the file to ``GGUFReader``.

The walk keeps O(1) state per value (it decodes strings to check them, and keeps nothing but the
tensor table and a few scalars), so its memory is bounded by the header's size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 used 32-bit counts; gguf-py reads 2 and 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 bytes with the terminating NUL
MAX_KEY = 1 << 16

# GGUF value types -> size in bytes (scalars); 8 = string, 9 = array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first)
    qtype: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    alignment: int
    data_start: int
    file_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict | None = None  # every key's value (``check_gguf(metadata=True)``), as gguf-py gives them


class _Bad(ValueError):
    pass


class _Reader:
    """Bounded reads over the mapped file; every read names what it was reading when it runs out."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos, self.end = buf, order, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n > self.end - self.pos:
            raise _Bad(f"{what} at byte {self.pos} runs past the end of the file ({self.end} bytes)")
        at = self.pos
        self.pos += n
        return at

    def unpack(self, fmt: str, what: str):
        at = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, at)[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", f"length of {what}")
        if limit is not None and n > limit:
            raise _Bad(f"{what} is {n} bytes long (at most {limit})")
        at = self.take(n, what)
        try:
            return bytes(self.buf[at: at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {at} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.unpack("Q", f"length of {what}")
        at = self.take(n, what)
        try:
            bytes(self.buf[at: at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {at} is not valid UTF-8") from None


def _value(r: _Reader, vtype: int, key: str, keep: bool):
    """Read (or skip) one value of ``vtype``; returned (arrays as lists) when ``keep``."""
    if vtype in _SCALAR_SIZE:
        if keep:
            return r.unpack(_SCALAR_FMT[vtype], f"value of {key}")
        r.take(_SCALAR_SIZE[vtype], f"value of {key}")
        return None
    if vtype == _STRING:
        return r.string(f"value of {key}") if keep else r.skip_string(f"value of {key}")
    if vtype == _ARRAY:
        sub = r.unpack("I", f"element type of {key}")
        count = r.unpack("Q", f"length of {key}")
        if sub in _SCALAR_SIZE:
            at = r.take(count * _SCALAR_SIZE[sub], f"{count} elements of {key}")  # bounded by the bytes left
            if keep:
                import numpy as np

                return np.frombuffer(r.buf, np.dtype(r.order + _SCALAR_FMT[sub]), count, at).tolist()
        elif sub == _STRING:
            if count > (r.end - r.pos) // 8:  # each string takes >= 8 bytes (its length)
                raise _Bad(f"{key} claims {count} strings; the file has room for at most {(r.end - r.pos) // 8}")
            if keep:
                return [r.string(f"{key}[{i}]") for i in range(count)]
            for i in range(count):
                r.skip_string(f"{key}[{i}]")
        elif sub == _ARRAY:
            raise _Bad(f"{key} is an array of arrays (not used by any GGUF model)")
        else:
            raise _Bad(f"{key} has an unknown element type {sub}")
        return None
    raise _Bad(f"{key} has an unknown value type {vtype}")


def check_gguf(path: str | Path, metadata: bool = False) -> GGUFLayout:
    """Walk the header of ``path``; ``ValueError("model: <file>: ...")`` at the first thing wrong.
    ``metadata=True`` also keeps every metadata value (the walk bounds them all the same): the reader
    the block loader uses instead of gguf-py's, whose per-element views take seconds on a vocabulary."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise _Bad(f"is {size} bytes long, too short for a GGUF header (24 bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(buf, size, metadata)
    except _Bad as e:
        raise ValueError(f"model: {path.name}: {e}") from None
    except OSError as e:
        raise ValueError(f"model: cannot read {path.name}: {e.strerror or e}") from None


def _walk(buf, size: int, keep_all: bool = False) -> GGUFLayout:
    import gguf

    if bytes(buf[:4]) != GGUF_MAGIC:
        raise _Bad(f"not a GGUF file (starts with {bytes(buf[:4])!r}, not b'GGUF')")
    version = struct.unpack_from("<I", buf, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (only {', '.join(map(str, VERSIONS))})")
    r = _Reader(buf, order)
    r.pos = 8
    n_tensors = r.unpack("Q", "tensor count")
    n_kv = r.unpack("Q", "metadata count")
    left = r.end - r.pos
    if n_kv > left // 13:  # key length (8) + key (>= 1) + value type (4) + value (>= 0)
        raise _Bad(f"header claims {n_kv} metadata entries; the file has room for at most {left // 13}")
    if n_tensors > left // 32:  # name length (8) + name + dim count (4) + one dim (8) + type (4) + offset (8)
        raise _Bad(f"header claims {n_tensors} tensors; the file has room for at most {left // 32}")

    alignment = DEFAULT_ALIGNMENT
    keys: set[str] = set()
    values: dict = {}
    for _ in range(n_kv):
        key = r.string("metadata key", limit=MAX_KEY)
        if not key:
            raise _Bad("a metadata key is empty")
        if key in keys:
            raise _Bad(f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = r.unpack("I", f"value type of {key}")
        value = _value(r, vtype, key, keep=keep_all or key == "general.alignment")
        if keep_all:
            values[key] = value
        if key == "general.alignment":
            if vtype != _UINT32:
                raise _Bad("general.alignment must be a uint32")
            if value == 0 or value & (value - 1):
                raise _Bad(f"general.alignment must be a power of two, got {value}")
            alignment = value

    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = r.string("tensor name", limit=MAX_TENSOR_NAME)
        if name in names:
            raise _Bad(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.unpack("I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [r.unpack("Q", f"dimensions of {name}") for _ in range(n_dims)]  # innermost first
        qtype = r.unpack("I", f"type of {name}")
        offset = r.unpack("Q", f"data offset of {name}")
        infos.append((name, dims, qtype, offset))
    data_start = -(-r.pos // alignment) * alignment
    if data_start > size:
        raise _Bad(f"the data section would start at byte {data_start}, past the end of the file ({size})")

    tensors = []
    for name, dims, qtype, offset in infos:
        if any(d < 1 for d in dims):
            raise _Bad(f"tensor {name} has a dimension of size 0 ({dims})")
        try:
            t = gguf.GGMLQuantizationType(qtype)
        except ValueError:
            raise _Bad(f"tensor {name} has an unknown type {qtype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[t]
        if dims[0] % block:
            raise _Bad(f"tensor {name} ({t.name}): rows of {dims[0]} values are not whole blocks of {block}")
        n = 1
        for d in dims:
            n *= d  # Python integers: no wrap-around
        nbytes = n // block * type_size
        if offset % alignment:
            raise _Bad(f"tensor {name}: data offset {offset} is not aligned to {alignment} bytes")
        if nbytes > size - data_start or offset > size - data_start - nbytes:
            raise _Bad(f"tensor {name}: {nbytes} bytes at data offset {offset} run past the end of the file "
                       f"({size - data_start} bytes of data)")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise _Bad(f"tensors {a.name} and {b.name} overlap (bytes {a.offset}-{a.offset + a.nbytes} and "
                       f"{b.offset}-{b.offset + b.nbytes})")
    return GGUFLayout(version, alignment, data_start, size, tuple(tensors), values if keep_all else None)
