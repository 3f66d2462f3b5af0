"""GGUF (llama.cpp's format) -> ModelConfig + float32 tensors in Hugging Face Llama names.

The first load parses the file with ``gguf.GGUFReader``, dequantizes every tensor with
``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K,
and the IQ/TQ types the ``gguf`` package implements), undoes llama.cpp's Q/K row permutation, and
writes the result to the cache as one safetensors file plus a JSON with the config and the tokenizer
metadata. Later loads memory-map the safetensors and read the JSON; they never parse the GGUF.

The file is untrusted input. Before gguf-py reads it, ``gguf_check`` walks its header with every count,
length, dimension and offset bounded by the file; then the metadata is range-checked, the tensor table
compared with the shapes the metadata implies, the tokenizer metadata checked, and only then is anything
dequantized (and each tensor checked to be finite). Every refusal is one line: ``ValueError("model: ...")``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from .gguf_check import check_gguf
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


def _shown(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _meta_int(meta: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer metadata value in [lo, hi] (the bounds keep every size derived from it sane before
    anything is allocated; the tensor shapes are checked against them afterwards)."""
    v = meta.get(key, default)
    if v is None:
        raise ValueError(f"model: GGUF lacks {key}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"model: GGUF {key} must be an integer in [{lo}, {hi}], got {_shown(v)}")
    return v


def _meta_float(meta: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo < v <= hi:
        raise ValueError(f"model: GGUF {key} must be a number in ({lo:g}, {hi:g}], got {_shown(v)}")
    return _f32_value(v)


# Upper bounds on the model's sizes (the largest Llama-architecture GGUFs are well inside them): a
# malformed file cannot ask for a 2^32-layer model or a 2^40-position RoPE table.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 16
MAX_FFN = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_CONTEXT = 1 << 20
MAX_VOCAB = 1 << 22


def config_from_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig from the ``llama.*`` keys. ``tensor_shapes``: GGUF tensor name -> numpy-order shape."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"model: GGUF architecture {_shown(arch)} is not supported (only 'llama': Llama, SmolLM, "
            "Mistral-style dense decoders)"
        )
    a = "llama."
    if _meta_int(meta, a + "expert_count", 0, 1 << 16, default=0) > 0:
        raise ValueError("model: mixture-of-experts GGUFs (llama.expert_count > 0) are not supported")
    scaling = meta.get(a + "rope.scaling.type") or "none"
    if not isinstance(scaling, str):
        raise ValueError(f"model: GGUF {a}rope.scaling.type must be a string, got {_shown(scaling)}")
    if scaling == "linear" and _meta_float(meta, a + "rope.scaling.factor", 1.0, 0.0, 1e6) == 1.0:
        scaling = "none"
    if scaling != "none" or "rope_freqs.weight" in tensor_shapes:
        raise ValueError(
            f"model: RoPE scaling ({_shown(scaling) if scaling != 'none' else 'rope_freqs'}) is not supported"
        )
    heads = _meta_int(meta, a + "attention.head_count", 1, MAX_HEADS)
    kv_heads = _meta_int(meta, a + "attention.head_count_kv", 1, heads, default=heads)
    if heads % kv_heads:
        raise ValueError(f"model: GGUF {a}attention.head_count ({heads}) is not a multiple of "
                         f"{a}attention.head_count_kv ({kv_heads})")
    hidden = _meta_int(meta, a + "embedding_length", 1, MAX_HIDDEN)
    if a + "attention.key_length" not in meta and hidden % heads:
        raise ValueError(f"model: GGUF {a}embedding_length ({hidden}) is not a multiple of "
                         f"{a}attention.head_count ({heads})")
    head_dim = _meta_int(meta, a + "attention.key_length", 1, MAX_HEAD_DIM, default=hidden // heads)
    if head_dim % 2:
        raise ValueError(f"model: the attention head size must be even for RoPE, got {head_dim}")
    if _meta_int(meta, a + "attention.value_length", 1, MAX_HEAD_DIM, default=head_dim) != head_dim:
        raise ValueError("model: different key and value head sizes are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        vocab = len(tokens)
    else:
        vocab = _meta_int(meta, a + "vocab_size", 1, MAX_VOCAB)
    embd = tensor_shapes.get("token_embd.weight")
    if embd is not None and len(embd) != 2:
        raise ValueError(f"model: GGUF tensor token_embd.weight has shape {list(embd)}, not [vocab, hidden]")
    if embd is not None and embd[0] != vocab:
        if embd[0] < vocab:
            raise ValueError(f"model: the GGUF's token list has {vocab} tokens but token_embd.weight only "
                             f"{embd[0]} rows")
        vocab = int(embd[0])  # embedding padded past the token list: the model's size is what matters
    if not 1 <= vocab <= MAX_VOCAB:
        raise ValueError(f"model: vocabulary size {vocab} is not in [1, {MAX_VOCAB}]")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_meta_int(meta, a + "feed_forward_length", 1, MAX_FFN),
        num_layers=_meta_int(meta, a + "block_count", 1, MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=_meta_int(meta, a + "context_length", 1, MAX_CONTEXT, default=2048),
        rms_norm_eps=_meta_float(meta, a + "attention.layer_norm_rms_epsilon", 1e-5, 0.0, 1.0),
        rope_theta=_meta_float(meta, a + "rope.freq_base", 10000.0, 0.0, 1e12),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        architecture="llama",
    )


def gguf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> the numpy-order shape a Llama of ``config`` has for it."""
    c, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"token_embd.weight": (config.vocab_size, c), "output_norm.weight": (c,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, c)
    for i in range(config.num_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c,), f"blk.{i}.ffn_norm.weight": (c,),
            f"blk.{i}.attn_q.weight": (config.num_heads * d, c),
            f"blk.{i}.attn_k.weight": (config.num_kv_heads * d, c),
            f"blk.{i}.attn_v.weight": (config.num_kv_heads * d, c),
            f"blk.{i}.attn_output.weight": (c, config.num_heads * d),
            f"blk.{i}.ffn_gate.weight": (f, c), f"blk.{i}.ffn_up.weight": (f, c),
            f"blk.{i}.ffn_down.weight": (c, f),
        }
    return shapes


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def check_tensor_table(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor a Llama of ``config`` needs is there with its shape, and nothing else is: checked on
    the tensor table alone, before anything is dequantized or a model is built from the config."""
    unknown = [n for n in shapes if hf_name(n) is None]
    if unknown:
        raise ValueError(f"model: GGUF has tensors a Llama does not use: {_listed(unknown)}")
    if config.num_layers > len(shapes):
        raise ValueError(f"model: GGUF llama.block_count is {config.num_layers} but the file has only "
                         f"{len(shapes)} tensors")
    want = gguf_shapes(config)
    extra = shapes.keys() - want.keys()
    if extra:
        raise ValueError(f"model: GGUF has tensors beyond llama.block_count={config.num_layers}: {_listed(extra)}")
    missing = want.keys() - shapes.keys()
    if missing:
        raise ValueError(f"model: GGUF lacks tensors: {_listed(hf_name(n) for n in missing)}")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"model: GGUF tensor {name} has shape {list(shapes[name])}, but the metadata "
                             f"(embedding_length, feed_forward_length, head counts) implies {list(shape)}")


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


def _supported(qtype) -> bool:
    import gguf

    t = gguf.GGMLQuantizationType(qtype)
    return t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or t in gguf.quants._type_traits


def _read_gguf(path: Path):
    """(layout, GGUFReader) once ``check_gguf`` has passed; gguf-py's own errors, should any remain, are
    one line too."""
    import gguf

    layout = check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
        meta = read_metadata(reader)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"model: {path.name}: gguf-py cannot read it: {first[:200]}") from None
    offsets = {t.name: int(t.data_offset) for t in reader.tensors}
    if offsets != {t.name: t.offset for t in layout.tensors}:  # the two readers disagree: trust neither
        raise ValueError(f"model: {path.name}: the tensor table is ambiguous")
    return layout, reader, meta


def convert_gguf(
    path: str | Path, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Parse and dequantize a GGUF (the slow path): (config, float32 HF state dict, tokenizer metadata).

    Everything about the file is checked before anything big is allocated: its structure
    (``gguf_check``), the metadata, the tensor table against the config, the tensor types, the tokenizer;
    then each tensor is dequantized and checked to be finite."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    path = Path(path)
    layout, reader, meta = _read_gguf(path)
    shapes = {t.name: t.shape for t in layout.tensors}
    config = config_from_metadata(meta, shapes)
    check_tensor_table(config, shapes)
    for t in layout.tensors:
        if not _supported(t.qtype):
            import gguf

            raise ValueError(
                f"model: GGUF tensor type {gguf.GGMLQuantizationType(t.qtype).name} ({t.name}) is not supported "
                "(gguf-py has no dequantizer for it)"
            )
    tok_meta = {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    try:
        Tokenizer.from_gguf_metadata(tok_meta, vocab_size=config.vocab_size)
    except ValueError as e:
        raise ValueError(f"model: {path.name}: {e}") from None
    if progress:  # only now: a file refused above gets its one error line and nothing else
        print(
            f"logitlab: converting {path.name} to float32 (once; cached in {cache_dir() / 'converted'}) ...",
            file=sys.stderr,
            flush=True,
        )
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(
        reader.tensors,
        desc=f"dequantizing {path.name}",
        unit="tensor",
        leave=False,
        disable=not progress or None,
    ):
        name = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type, shapes[t.name])
        if not np.isfinite(w).all():
            raise ValueError(f"model: GGUF tensor {t.name} holds NaN or infinite values")
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, config.num_kv_heads)
        # own, writable, contiguous memory (F32 data comes back as a view of the read-only memmap)
        state[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W", "O"]))
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
    config, state, tok_meta = convert_gguf(path, progress=progress)
    if use_cache:
        _write_cache(tensors_file, meta_file, config, state, tok_meta, path.resolve())
    return config, state, tok_meta
