"""The built model (stacked projections, quantized weights) cached as memory-mapped safetensors.

Building a Transformer from a checkpoint copies every weight once (stacking q/k/v and gate/up) and,
for int8, quantizes them: seconds of work whose result never changes. It is saved next to the converted
checkpoint, keyed by the source file and the dtype, and later loads map it straight into a model built
on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .quant import pack_for_gemm, quantize_int8
from .transformer import Transformer

FORMAT = 2  # 2: int8 layers keep a bfloat16 (was float32) dequantized copy


def _skeleton(config: ModelConfig, dtype: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
        if dtype == "int8":
            quantize_int8(model, empty=True)
    return model


def _path(cache_dir: Path, source: Path, dtype: str) -> Path:
    st = source.stat()
    d = cache_dir / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{source.stem}-{st.st_size}-{st.st_mtime_ns}-{dtype}-v{FORMAT}.safetensors"


def build_model(config: ModelConfig, state_dict, dtype: str) -> Transformer:
    net = Transformer.from_state_dict(config, state_dict,
                                      dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return quantize_int8(net) if dtype == "int8" else net


def load_or_build(config: ModelConfig, state_dict_fn, dtype: str, source: Path | None,
                  cache_dir: Path | None) -> Transformer:
    """The model for ``dtype``: from the cache when present, else built (``state_dict_fn()`` gives the
    checkpoint) and cached. ``source=None`` (no file to key on) always builds."""
    if source is None or cache_dir is None or not source.is_file():
        model = build_model(config, state_dict_fn(), dtype)
        return pack_for_gemm(model) if dtype == "int8" else model
    path = _path(cache_dir, source, dtype)
    if path.exists():
        tensors = load_file(path)
        model = _skeleton(config, dtype)
        tied = isinstance(model.lm_head, torch.nn.Linear) and config.tie_word_embeddings
        if tied:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        model.load_state_dict(tensors, strict=True, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.set_rope_tables()
        return pack_for_gemm(model.eval()) if dtype == "int8" else model.eval()
    model = build_model(config, state_dict_fn(), dtype)
    sd = model.state_dict()
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        sd.pop("lm_head.weight")  # shared with the embedding; re-tied on load
    tmp = path.with_suffix(".part")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"config": json.dumps(config.to_dict())})
    tmp.replace(path)
    return pack_for_gemm(model) if dtype == "int8" else model
