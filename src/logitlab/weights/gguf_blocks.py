"""A GGUF -> a model that keeps the file's quantized blocks (``--dtype gguf``; see model/gguf_model.py).

The file is checked exactly as for the float32 conversion (``gguf_loader``: structure, metadata, tensor
table, tokenizer) before anything is read. Then each matrix's raw blocks are repacked (``qblocks.repack``)
without dequantizing: Q4_0, Q4_1, Q8_0, Q4_K and Q6_K keep the file's weights exactly. Other types are
dequantized and requantized to Q8_0 blocks (lossy; a warning says which). llama.cpp's Q/K row order is
undone on the raw rows (a row permutation moves whole rows of blocks).

The result is cached as one safetensors file (uint8 codes, float16/float32 scales) plus a JSON with the
config, the tokenizer metadata and the block layout, keyed by the source file; later loads memory-map it
and build the model in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model import qblocks
from ..model.config import ModelConfig
from ..model.gguf_model import BlockEmbedding, BlockLinear
from ..model.transformer import Linear, Transformer
from .gguf_check import check_gguf
from .gguf_loader import (
    TOKENIZER_KEYS,
    _supported,
    check_tensor_table,
    config_from_metadata,
    dequantize,
    hf_name,
    unpermute_rope,
)
from .registry import cache_dir

FORMAT = 1  # bump when the cached layout changes
KEPT = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")  # computed on as they are in the file


def _paths(source: Path) -> tuple[Path, Path]:
    st = source.stat()
    d = cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{source.stem}-{st.st_size}-{st.st_mtime_ns}-gguf-v{FORMAT}"
    return d / f"{stem}.safetensors", d / f"{stem}.json"


def _data(mm: np.ndarray, t) -> np.ndarray:
    """The tensor's bytes as gguf-py's dequantizer takes them: one row of blocks per row (F32/F16 typed)."""
    import gguf

    raw = mm[t.offset: t.offset + t.nbytes]
    kind = gguf.GGMLQuantizationType(t.qtype)
    if kind == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16)
    return raw.reshape(int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1, -1)


def _matrix(mm, t, config: ModelConfig, name: str, warned: list[str]) -> qblocks.QMatrix:
    import gguf

    kind = gguf.GGMLQuantizationType(t.qtype).name
    out, n_in = t.shape  # numpy order: [out, in]
    heads = config.num_heads if name.endswith("q_proj.weight") else \
        config.num_kv_heads if name.endswith("k_proj.weight") else None
    if kind in KEPT:
        raw = mm[t.offset: t.offset + t.nbytes].reshape(out, -1)  # one row of blocks per output row
        if heads is not None:
            raw = unpermute_rope(raw, heads)
        qm = qblocks.repack(np.ascontiguousarray(raw), kind, out, n_in)
        if not (torch.isfinite(qm.d.float()).all() and torch.isfinite(qm.m.float()).all()):
            raise ValueError(f"model: GGUF tensor {t.name} holds NaN or infinite scales")
        return qm
    w = dequantize(_data(mm, t), t.qtype, (out, n_in))
    if not np.isfinite(w).all():
        raise ValueError(f"model: GGUF tensor {t.name} holds NaN or infinite values")
    if heads is not None:
        w = unpermute_rope(w, heads)
    warned.append(kind)
    return qblocks.from_float(torch.from_numpy(np.require(w, np.float32, ["C", "W", "O"])))


def _stacked(parts: list[qblocks.QMatrix]) -> list[qblocks.QMatrix]:
    """Consecutive parts of one format merge into one matrix (one kernel call instead of three)."""
    out = [parts[0]]
    for qm in parts[1:]:
        prev = out[-1]
        if (prev.bits, prev.group, prev.d.dtype) == (qm.bits, qm.group, qm.d.dtype):
            out[-1] = qblocks.QMatrix(torch.cat([prev.codes, qm.codes]), torch.cat([prev.d, qm.d]),
                                      torch.cat([prev.m, qm.m]), prev.bits, prev.group,
                                      prev.out_features + qm.out_features, prev.in_features)
        else:
            out.append(qm)
    return out


def _convert(path: Path, progress: bool):
    """(config, {module name: [QMatrix]}, {norm name: tensor}, tokenizer metadata) from the file."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    layout = check_gguf(path, metadata=True)  # the walk that bounds everything also reads the metadata
    meta = layout.metadata
    shapes = {t.name: t.shape for t in layout.tensors}
    config = config_from_metadata(meta, shapes)
    check_tensor_table(config, shapes)
    for t in layout.tensors:
        if not _supported(t.qtype):
            import gguf

            raise ValueError(f"model: GGUF tensor type {gguf.GGMLQuantizationType(t.qtype).name} ({t.name}) "
                             "is not supported")
    tok_meta = {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    try:
        Tokenizer.from_gguf_metadata(tok_meta, vocab_size=config.vocab_size)
    except ValueError as e:
        raise ValueError(f"model: {path.name}: {e}") from None
    mats: dict[str, qblocks.QMatrix] = {}
    norms: dict[str, torch.Tensor] = {}
    warned: list[str] = []
    mm = np.memmap(path, np.uint8, mode="r")
    for t in tqdm(layout.tensors, desc=f"repacking {path.name}", unit="tensor", leave=False,
                  disable=not progress or None):
        name = hf_name(t.name)
        if len(t.shape) == 1:
            w = dequantize(_data(mm, t), t.qtype, tuple(shapes[t.name]))
            if not np.isfinite(w).all():
                raise ValueError(f"model: GGUF tensor {t.name} holds NaN or infinite values")
            norms[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W", "O"]))
        else:
            mats[name] = _matrix(mm, t, config, name, warned)
    if warned and progress:
        print(f"logitlab: --dtype gguf: {', '.join(sorted(set(warned)))} tensors are requantized to Q8_0 "
              f"(computed on as they are: {', '.join(KEPT)})", file=sys.stderr)
    modules: dict[str, list[qblocks.QMatrix]] = {"model.embed_tokens": [mats.pop("model.embed_tokens.weight")]}
    if "lm_head.weight" in mats:
        modules["lm_head"] = [mats.pop("lm_head.weight")]
    for i in range(config.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        modules[a + "qkv_proj"] = _stacked([mats.pop(a + n + "_proj.weight") for n in "qkv"])
        modules[a + "o_proj"] = [mats.pop(a + "o_proj.weight")]
        modules[m + "gate_up_proj"] = _stacked([mats.pop(m + "gate_proj.weight"), mats.pop(m + "up_proj.weight")])
        modules[m + "down_proj"] = [mats.pop(m + "down_proj.weight")]
    return config, modules, norms, tok_meta


def _save(tensors_file: Path, meta_file: Path, config, modules, norms, tok_meta, source: Path) -> None:
    tensors = dict(norms)
    layout = {}
    for name, parts in modules.items():
        layout[name] = [[qm.bits, qm.group, qm.out_features, qm.in_features] for qm in parts]
        for i, qm in enumerate(parts):
            tensors |= {f"{name}.{i}.codes": qm.codes, f"{name}.{i}.d": qm.d, f"{name}.{i}.m": qm.m}
    tag = f".{os.getpid()}.tmp"
    tmp_t, tmp_m = tensors_file.with_name(tensors_file.name + tag), meta_file.with_name(meta_file.name + tag)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_t))
        os.replace(tmp_t, tensors_file)
        tmp_m.write_text(json.dumps({"format": FORMAT, "source": str(source), "config": config.to_dict(),
                                     "tokenizer": tok_meta, "layout": layout}))
        os.replace(tmp_m, meta_file)
    finally:
        for p in (tmp_t, tmp_m):
            p.unlink(missing_ok=True)


def _read_cache(tensors_file: Path, meta_file: Path):
    try:
        meta = json.loads(meta_file.read_text())
        config = ModelConfig.from_dict(meta["config"])
        tensors = load_file(str(tensors_file))  # memory-mapped
        modules = {name: [qblocks.QMatrix(tensors.pop(f"{name}.{i}.codes"), tensors.pop(f"{name}.{i}.d"),
                                          tensors.pop(f"{name}.{i}.m"), b, g, o, n)
                          for i, (b, g, o, n) in enumerate(parts)]
                   for name, parts in meta["layout"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: convert again
    return config, modules, tensors, meta["tokenizer"]


def _build(config: ModelConfig, modules, norms, exact_head: bool) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    for name, t in norms.items():  # the norm weights (float32, [C])
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=False))
    for name, parts in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BlockEmbedding(parts[0]) if name == "model.embed_tokens" else BlockLinear(parts))
    if "lm_head" not in modules:  # tied: the head is the embedding table
        model.lm_head = BlockLinear([model.model.embed_tokens.table])
    if exact_head:
        head = Linear(config.hidden_size, config.vocab_size, bias=False, device="cpu")
        head.weight = torch.nn.Parameter(model.lm_head.dequantized(), requires_grad=False)
        model.lm_head = head
    model.set_rope_tables()
    return model.eval()


def load_gguf_blocks(path: str | Path, exact_head: bool = False, progress: bool = True):
    """(config, model on the file's blocks, tokenizer metadata); the repacked blocks are cached."""
    path = Path(path)
    tensors_file, meta_file = _paths(path)
    cached = _read_cache(tensors_file, meta_file) if tensors_file.exists() and meta_file.exists() else None
    if cached is None:
        config, modules, norms, tok_meta = _convert(path, progress)
        _save(tensors_file, meta_file, config, modules, norms, tok_meta, path.resolve())
    else:
        config, modules, norms, tok_meta = cached
    return config, _build(config, modules, norms, exact_head), tok_meta
