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


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama checkpoint, in Hugging Face names (what our loaders produce), in the
    order a Hugging Face model lists them (lm_head last, listed even when tied)."""
    c, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, c)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c,),
            p + "self_attn.q_proj.weight": (config.num_heads * d, c),
            p + "self_attn.k_proj.weight": (config.num_kv_heads * d, c),
            p + "self_attn.v_proj.weight": (config.num_kv_heads * d, c),
            p + "self_attn.o_proj.weight": (c, config.num_heads * d),
            p + "post_attention_layernorm.weight": (c,),
            p + "mlp.gate_proj.weight": (f, c), p + "mlp.up_proj.weight": (f, c), p + "mlp.down_proj.weight": (c, f),
        })
    shapes["model.norm.weight"] = (c,)
    shapes["lm_head.weight"] = (config.vocab_size, c)
    return shapes


def tiny_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) * (0.5 if "embed" in name else 0.15)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def tiny_model(seed: int = 0, **kw) -> Transformer:
    cfg = tiny_config(**kw)
    return Transformer.from_state_dict(cfg, tiny_state_dict(cfg, seed))
