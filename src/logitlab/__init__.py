"""logitlab: a from-scratch PyTorch runtime for decoder-only language models and every decoding
operation on their next-token distribution."""

__version__ = "0.1.0"
