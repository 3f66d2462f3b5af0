"""Tiny random Llama-architecture models for tests where the real model adds nothing."""

from __future__ import annotations

import torch

from logitlab.model.config import ModelConfig
from logitlab.model.transformer import Transformer


def tiny_config(vocab_size: int = 101, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=16, context_length=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


def tiny_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or "layernorm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) * (0.5 if "embed" in name else 0.15)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def tiny_model(seed: int = 0, **kw) -> Transformer:
    cfg = tiny_config(**kw)
    return Transformer.from_state_dict(cfg, tiny_state_dict(cfg, seed))
