"""Where weights come from: aliases and the cache (registry), GGUF and Hugging Face loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..tokenizer import Tokenizer
from .registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model


@dataclass
class LoadedWeights:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # float32, Hugging Face Llama names
    tokenizer: Tokenizer
    source: Path
    name: str


def load_weights(name_or_path: str = DEFAULT_MODEL) -> LoadedWeights:
    source = resolve_model(name_or_path)
    if source.suffix == ".gguf":
        from .gguf_loader import load_gguf

        config, state, tok_meta = load_gguf(source)
        tokenizer = Tokenizer.from_gguf_metadata(tok_meta)
    else:
        from .hf_loader import load_hf_dir

        config, state = load_hf_dir(source)
        tokenizer = Tokenizer.from_hf_dir(source)
    name = name_or_path if "/" not in name_or_path and not name_or_path.endswith(".gguf") else source.stem
    return LoadedWeights(config, state, tokenizer, source, name)


__all__ = ["DEFAULT_MODEL", "LoadedWeights", "ModelNotFoundError", "load_weights", "resolve_model"]
