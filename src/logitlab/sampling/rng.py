"""Counter-based randomness: a request's uniforms are a pure function of (seed, counter, stream).

This is what makes a seeded request reproducible whatever else is in its batch and wherever it sits:
there is no shared generator state to consume, so a row's draws cannot depend on the other rows.

The hash is SplitMix64 (Steele, Lea & Flood 2014) used as a counter-based generator:

    key  = mix(seed + GOLDEN * (stream + 1))          # one independent sequence per (seed, stream)
    u    = mix(key + counter * GOLDEN) >> 11  / 2^53   # the SplitMix64 output number ``counter``
    mix(z) = z ^= z >>> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >>> 27; z *= 0x94D049BB133111EB; z ^ z >>> 31

For a fixed key the numbers over ``counter`` are exactly the SplitMix64 stream seeded with ``key``
(which passes BigCrush). It is computed on int64 tensors for a whole batch at once: addition and
multiplication wrap modulo 2^64 exactly as uint64 arithmetic does, and the logical right shifts ``>>>``
are emulated by masking the arithmetic ``>>`` that torch applies to signed integers.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
_SEED_MASK = (1 << 63) - 1

GOLDEN_U = 0x9E3779B97F4A7C15
MIX1_U = 0xBF58476D1CE4E5B9
MIX2_U = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``c`` (taken modulo 2^64)."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN, MIX1, MIX2 = _signed(GOLDEN_U), _signed(MIX1_U), _signed(MIX2_U)
SMALL_BATCH = 8  # up to this many rows, ``uniforms`` hashes with Python integers (the same numbers)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on signed ints)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per row: ``u[i] = hash(seeds[i], counters[i], stream)``.

    ``seeds`` and ``counters`` are int64 tensors of the same shape (any bit pattern is fine); ``stream``
    is a small non-negative integer naming an independent sequence (e.g. draft / accept / residual draws
    of speculative decoding). The top 53 bits of the hash give the mantissa, so ``u < 1`` always.

    The hash is always computed on the CPU: seeds on another device are brought to the host and the
    uniforms go back to that device, so a row draws the same numbers wherever its logits are. (The
    sampler passes host copies of its seeds and counters, so its hot path copies nothing back.)"""
    s = seeds if isinstance(seeds, torch.Tensor) else torch.as_tensor(seeds, device="cpu")
    if s.device.type != "cpu":
        c = counters if isinstance(counters, torch.Tensor) else torch.as_tensor(counters, device="cpu")
        return uniforms(s.to("cpu"), c.to("cpu"), stream).to(s.device)
    s = s.long()
    c = torch.as_tensor(counters, device=s.device).long()
    if s.numel() <= SMALL_BATCH and c.shape == s.shape:
        # A few rows: the same arithmetic on Python integers (masked to 64 bits) costs a few microseconds
        # a row, where the dozen int64 tensor ops below cost ~80 us whatever the batch (at one stream, a
        # few percent of a decode step).
        add = GOLDEN_U * (int(stream) + 1)
        out = [(_mix_int(_mix_int(seed + add) + counter * GOLDEN_U) >> 11) * 2.0**-53
               for seed, counter in zip(s.flatten().tolist(), c.flatten().tolist(), strict=True)]
        return torch.tensor(out, dtype=torch.float64, device=s.device).view(s.shape)
    key = _mix(s + _signed(GOLDEN_U * (int(stream) + 1)))
    x = _mix(key + c * GOLDEN)
    return _shr(x, 11).double() * (2.0**-53)


def _mix_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * MIX1_U) & _M64
    z = ((z ^ (z >> 27)) * MIX2_U) & _M64
    return z ^ (z >> 31)


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a request seeded with ``seed`` (so the n samples differ).
    Pure Python integers: any int ``seed`` (negative too) and ``index >= 0``."""
    return _mix_int(int(seed) + (int(index) + 1) * GOLDEN_U) >> 1


def canonical_seed(seed: int) -> int:
    """The 63-bit non-negative form a seed takes inside a batch (``seed mod 2^63``)."""
    return int(seed) & _SEED_MASK
