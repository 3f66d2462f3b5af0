"""GGUF (llama.cpp's format) -> ModelConfig + float32 tensors in Hugging Face Llama names.

The first load parses the file with ``gguf.GGUFReader``, dequantizes every tensor with
``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K,
and the IQ/TQ types the ``gguf`` package implements), undoes llama.cpp's Q/K row permutation, and
writes the result to the cache as one safetensors file plus a JSON with the config and the tokenizer
metadata. Later loads memory-map the safetensors and read the JSON; they never parse the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from .registry import cache_dir

CACHE_FORMAT = 1  # bump when what is written to the cache changes

# What the tokenizer needs from the GGUF metadata (kept in the cached JSON).
TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None: not a Llama tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in _LAYER_NAMES
        and parts[3] == "weight"
    ):
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter for Q/K weights.

    Hugging Face Llama checkpoints rotate pairs of rows (i, i + d/2) within each head ("rotate half");
    llama.cpp's ``convert_hf_to_gguf.py`` reorders each head's rows into interleaved pairs (2i, 2i + 1)
    with ``w.reshape(n_heads, 2, d/2, ...).swapaxes(1, 2)``. This is its inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"model: cannot un-permute {rows} rows over {n_heads} heads")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field):
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    from gguf import GGUFValueType

    def one(i):
        part = field.parts[i]
        return str(part.tobytes(), "utf-8") if field.types[-1] == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def read_metadata(reader) -> dict:
    """Every key/value of a ``GGUFReader`` as plain Python values (lists, str, int, float, bool)."""
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _f32_value(x) -> float:
    """GGUF stores floats as float32; 9.999999747378752e-06 reads back as the 1e-05 that was meant."""
    return float(str(np.float32(x)))


def config_from_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig from the ``llama.*`` keys. ``tensor_shapes``: GGUF tensor name -> numpy-order shape."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"model: GGUF architecture {arch!r} is not supported (only 'llama': Llama, SmolLM, "
            "Mistral-style dense decoders)"
        )
    a = "llama."
    if int(meta.get(a + "expert_count") or 0) > 0:
        raise ValueError("model: mixture-of-experts GGUFs (llama.expert_count > 0) are not supported")
    scaling = meta.get(a + "rope.scaling.type") or "none"
    if scaling == "linear" and float(meta.get(a + "rope.scaling.factor") or 1.0) == 1.0:
        scaling = "none"
    if scaling != "none" or "rope_freqs.weight" in tensor_shapes:
        raise ValueError(
            f"model: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not supported"
        )
    heads = int(meta[a + "attention.head_count"])
    hidden = int(meta[a + "embedding_length"])
    head_dim = int(meta.get(a + "attention.key_length") or hidden // heads)
    if int(meta.get(a + "attention.value_length") or head_dim) != head_dim:
        raise ValueError("model: different key and value head sizes are not supported")
    vocab = (
        len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else int(meta[a + "vocab_size"])
    )
    embd = tensor_shapes.get("token_embd.weight")
    if embd is not None and embd[0] != vocab:
        vocab = int(embd[0])  # embedding padded past the token list: the model's size is what matters
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta[a + "feed_forward_length"]),
        num_layers=int(meta[a + "block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(a + "attention.head_count_kv") or heads),
        head_dim=head_dim,
        context_length=int(meta.get(a + "context_length") or 2048),
        rms_norm_eps=_f32_value(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_value(meta.get(a + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        architecture="llama",
    )


def expected_names(config: ModelConfig) -> set[str]:
    """The tensor names a Llama state dict in Hugging Face naming has (``lm_head`` only when untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_layers):
        names.update(f"model.layers.{i}.{n}.weight" for n in _LAYER_NAMES.values())
    return names


def dequantize(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """One GGUF tensor's data -> a float32 numpy array of ``shape`` (numpy order, outermost first)."""
    import gguf

    try:
        w = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        raise ValueError(
            f"model: GGUF tensor type {gguf.GGMLQuantizationType(qtype).name} is not supported "
            f"by gguf {getattr(gguf, '__version__', '')}".rstrip()
        ) from None
    return np.asarray(w, dtype=np.float32).reshape(shape)


def convert_gguf(
    path: str | Path, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Parse and dequantize a GGUF (the slow path): (config, float32 HF state dict, tokenizer metadata)."""
    import gguf
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(path))
    meta = read_metadata(reader)
    # GGUF lists dimensions innermost first; numpy/torch want them outermost first.
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    config = config_from_metadata(meta, shapes)
    unknown = sorted(n for n in shapes if hf_name(n) is None)
    if unknown:
        raise ValueError(
            f"model: GGUF has tensors a Llama does not use: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "")
        )
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(
        reader.tensors,
        desc=f"dequantizing {Path(path).name}",
        unit="tensor",
        leave=False,
        disable=not progress or None,
    ):
        name = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type, shapes[t.name])
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, config.num_kv_heads)
        # own, writable, contiguous memory (F32 data comes back as a view of the read-only memmap)
        state[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W", "O"]))
    missing = sorted(expected_names(config) - state.keys())
    if missing:
        raise ValueError(
            f"model: GGUF lacks tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    tok_meta = {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    return config, state, tok_meta


def _cache_key(path: Path) -> tuple[str, str]:
    """(prefix shared by every version of this file, key of this version)."""
    path = path.resolve()
    st = path.stat()
    prefix = f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}-"
    return prefix, f"{prefix}{st.st_size}-{st.st_mtime_ns}-v{CACHE_FORMAT}"


def cache_paths(path: str | Path) -> tuple[Path, Path]:
    """(safetensors, json) in the cache for this GGUF, keyed by its absolute path, size and mtime."""
    _, key = _cache_key(Path(path))
    d = cache_dir() / "converted"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}.safetensors", d / f"{key}.json"


def _read_cache(tensors_file: Path, meta_file: Path):
    try:
        meta = json.loads(meta_file.read_text())
        config = ModelConfig.from_dict(meta["config"])
        state = load_file(str(tensors_file))  # memory-mapped
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: convert again
    return config, state, meta["tokenizer"]


def _write_cache(tensors_file: Path, meta_file: Path, config, state, tok_meta, source: Path) -> None:
    """Tensors first, the JSON last (a cache entry counts only once both exist); each via temp + rename.
    Entries for older versions of the same file (same path, other size/mtime) are removed."""
    tag = f".{os.getpid()}.tmp"
    tmp_t, tmp_m = tensors_file.with_name(tensors_file.name + tag), meta_file.with_name(meta_file.name + tag)
    try:
        save_file(state, str(tmp_t), metadata={"source": str(source)})
        os.replace(tmp_t, tensors_file)
        tmp_m.write_text(
            json.dumps(
                {
                    "format": CACHE_FORMAT,
                    "source": str(source),
                    "config": config.to_dict(),
                    "tokenizer": tok_meta,
                }
            )
        )
        os.replace(tmp_m, meta_file)
    finally:
        for p in (tmp_t, tmp_m):
            p.unlink(missing_ok=True)
    prefix, key = _cache_key(source)[0], tensors_file.name.removesuffix(".safetensors")
    for old in tensors_file.parent.iterdir():
        name = old.name
        if name.startswith(prefix) and not name.startswith(key + ".") and not name.endswith(".tmp"):
            old.unlink(missing_ok=True)


def load_gguf(
    path: str | Path, use_cache: bool = True, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, float32 state dict in HF names, tokenizer metadata) for a GGUF file.

    The first call converts (tens of seconds) and fills the cache; later calls memory-map the cache."""
    path = Path(path)
    tensors_file, meta_file = cache_paths(path)
    if use_cache and tensors_file.exists() and meta_file.exists():
        cached = _read_cache(tensors_file, meta_file)
        if cached is not None:
            return cached
    if progress:
        print(
            f"logitlab: converting {path.name} to float32 (once; cached in {tensors_file.parent}) ...",
            file=sys.stderr,
            flush=True,
        )
    config, state, tok_meta = convert_gguf(path, progress=progress)
    if use_cache:
        _write_cache(tensors_file, meta_file, config, state, tok_meta, path.resolve())
    return config, state, tok_meta
