"""Hugging Face checkpoints: config.json + *.safetensors (+ tokenizer.json). Never pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model.config import ModelConfig


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    arch = cfg.get("model_type", "llama")
    if arch not in ("llama", "mistral", "smollm"):
        raise ValueError(f"model: architecture {arch!r} is not supported (Llama-architecture models only)")
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
        raise ValueError("model: rope_scaling is not supported")
    config = ModelConfig.from_hf_config(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    state = {k: v.float() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state
