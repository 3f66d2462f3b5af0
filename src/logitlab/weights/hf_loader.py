"""Hugging Face checkpoints: config.json + *.safetensors (sharded or not) -> ModelConfig + float32 tensors.

Tensors are read with safetensors only: never ``torch.load`` / pickle, which can run code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model.config import ModelConfig
from .gguf_loader import expected_names
from .gpt2 import config_from_hf_gpt2, hf_gpt2_to_ours

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gpt2")


def _check_supported(cfg: dict) -> None:
    arch = cfg.get("model_type", "llama")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: architecture {arch!r} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    scaling = cfg.get("rope_scaling") or {}
    rope_type = (
        scaling.get("rope_type") or scaling.get("type") or (cfg.get("rope_parameters") or {}).get("rope_type")
    )
    if rope_type not in (None, "default"):
        raise ValueError(f"model: RoPE scaling {rope_type!r} is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"model: {flag}=true is not supported")
    window = cfg.get("sliding_window")
    if window and window < cfg.get("max_position_embeddings", 0):
        raise ValueError("model: sliding-window attention is not supported")


def safetensors_files(path: Path) -> list[Path]:
    """The shards named by ``model.safetensors.index.json`` when there is one, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors in {path}")
    return files


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, float32 state dict) for a model directory: Llama checkpoints in Hugging Face Llama names,
    GPT-2 ones (``weights/gpt2.py``) already in ours."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model: {path / 'config.json'} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model: {path / 'config.json'} is not a JSON object")
    _check_supported(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        state.update(load_file(str(f)))
    if cfg.get("model_type") == "gpt2":
        config = config_from_hf_gpt2(cfg)
        return config, hf_gpt2_to_ours(state, config)
    config = ModelConfig.from_hf_config(cfg)
    state = {
        k: v if v.dtype == torch.float32 else v.float()
        for k, v in state.items()
        if not k.endswith("rotary_emb.inv_freq")
    }
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    want = expected_names(config)
    missing, extra = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or extra:
        raise ValueError(
            f"model: {path} does not match its config.json: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    emb = state["model.embed_tokens.weight"].shape
    if tuple(emb) != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"model: embed_tokens is {tuple(emb)}, config.json says ({config.vocab_size}, "
            f"{config.hidden_size})"
        )
    return config, state
