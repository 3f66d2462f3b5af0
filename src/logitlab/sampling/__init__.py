"""The one sampling pipeline: validated parameters, per-row processors, the draw."""

from .params import ParamError, SamplingParams
from .rng import derive_seed, uniforms
from .sampler import SamplerOutput, SamplingBatch, draw, process, sample

__all__ = ["ParamError", "SamplingParams", "SamplingBatch", "SamplerOutput", "sample", "process", "draw",
           "uniforms", "derive_seed"]
