"""Counter-based randomness: a request's uniforms are a pure function of (seed, counter, stream).

This is what makes a seeded request reproducible whatever else is in its batch and wherever it sits:
there is no shared generator state to consume. The hash is SplitMix64's finaliser (Steele et al.,
2014), computed on int64 tensors for a whole batch at once (multiplication wraps modulo 2^64; right
shifts are made logical by masking, since torch's ``>>`` is arithmetic on signed integers).
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)
STREAM = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per row: u = hash(seed, counter, stream)."""
    x = _mix(seeds.long() + GOLDEN * (stream + 1))
    x = _mix(x + counters.long() * GOLDEN)
    return _shr(x, 11).double() * (2.0**-53)


def _mix_int(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return z ^ (z >> 31)


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a request seeded with ``seed`` (the n samples differ)."""
    return _mix_int((seed + (index + 1) * 0x9E3779B97F4A7C15) & _M64) >> 1
