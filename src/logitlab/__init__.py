"""logitlab: a from-scratch PyTorch runtime for decoder-only language models and every decoding
operation on their next-token distribution."""

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "ParamError"]


def __getattr__(name: str):  # lazy, so `import logitlab` stays cheap
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("SamplingParams", "ParamError"):
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(name)
