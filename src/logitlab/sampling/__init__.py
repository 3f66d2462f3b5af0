"""The one sampling pipeline: validated parameters, per-row processors, the draw (see sampler.py)."""

from .params import ParamError, SamplingParams
from .rng import derive_seed, uniforms
from .sampler import SamplerOutput, SamplingBatch, bench_sampler, draw, process, sample

__all__ = ["ParamError", "SamplingParams", "SamplingBatch", "SamplerOutput", "sample", "process", "draw",
           "uniforms", "derive_seed", "bench_sampler"]
