"""Where weights come from: aliases and the cache (registry), GGUF and Hugging Face loaders.

``load_weights(name_or_path)`` is the one entry point: an alias (``smollm2-135m-instruct``), a ``.gguf``
file, or a Hugging Face model directory -> config, float32 state dict in Hugging Face Llama names, and
the model's tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..tokenizer import Tokenizer
from .registry import (
    DEFAULT_MODEL,
    MODELS,
    ChecksumError,
    ModelFetchError,
    ModelNotFoundError,
    cache_dir,
    known_models,
    resolve_model,
)


@dataclass
class LoadedWeights:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # float32, Hugging Face Llama names; no lm_head when tied
    tokenizer: Tokenizer
    source: Path  # the .gguf file or model directory read
    name: str  # the alias, else the file/directory name


def load_weights(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, progress: bool = True) -> LoadedWeights:
    """Resolve ``name_or_path`` (fetching an alias on first use) and load it. GGUF files are converted
    once and cached (later loads memory-map the cache); Hugging Face directories are read directly."""
    source = resolve_model(name_or_path)
    if source.is_file():
        from .gguf_loader import load_gguf

        config, state, tok_meta = load_gguf(source, progress=progress)
        tokenizer = Tokenizer.from_gguf_metadata(tok_meta)
    else:
        from .hf_loader import load_hf_dir

        config, state = load_hf_dir(source)
        tokenizer = Tokenizer.from_hf_dir(source)
    return LoadedWeights(config, state, tokenizer, source, _name(name_or_path, source))


def _name(name_or_path, source: Path) -> str:
    name = os.fspath(name_or_path).strip().lower()
    if name not in MODELS:
        name = source.stem if source.is_file() else source.resolve().name
    return name


def load_gguf_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, exact_head: bool = False, *,
                    progress: bool = True):
    """(model computing on the GGUF's own blocks, tokenizer, name) for ``--dtype gguf``: no float32
    conversion of the file is made (see gguf_blocks.py)."""
    source = resolve_model(name_or_path)
    if not source.is_file():
        raise ValueError(f"model: --dtype gguf needs a GGUF file; {source.name} is a Hugging Face directory "
                         "(use float32, bfloat16 or int8)")
    from .gguf_blocks import load_gguf_blocks

    _, model, tok_meta = load_gguf_blocks(source, exact_head=exact_head, progress=progress)
    return model, Tokenizer.from_gguf_metadata(tok_meta), _name(name_or_path, source)


__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ChecksumError",
    "LoadedWeights",
    "ModelFetchError",
    "ModelNotFoundError",
    "cache_dir",
    "known_models",
    "load_gguf_model",
    "load_weights",
    "resolve_model",
]
