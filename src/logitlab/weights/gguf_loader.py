"""GGUF (llama.cpp's format) -> ModelConfig + float32 tensors in Hugging Face Llama names.

The first load dequantizes every tensor (``gguf.quants.dequantize``: F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K and the other ggml types) and writes the result to the cache as safetensors plus a JSON with
the config and tokenizer metadata; later loads read those (memory-mapped) and never parse the GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from .registry import cache_dir

TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None: not used)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's Q/K rows from the rotate-half layout
    (pairs (i, i + d/2)) to interleaved pairs (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def config_from_metadata(meta: dict, tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"model: GGUF architecture {arch!r} is not supported (Llama-architecture models only)")
    a = "llama."
    heads = int(meta[a + "attention.head_count"])
    hidden = int(meta[a + "embedding_length"])
    return ModelConfig(
        vocab_size=int(meta.get(a + "vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(meta[a + "feed_forward_length"]),
        num_layers=int(meta[a + "block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(a + "attention.head_count_kv", heads)),
        head_dim=int(meta.get(a + "attention.key_length") or hidden // heads),
        context_length=int(meta.get(a + "context_length", 2048)),
        rms_norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def convert_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Parse and dequantize a GGUF (the slow path)."""
    import gguf
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(path))
    meta = read_metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors})
    state = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
        name = hf_name(t.name)
        if name is None:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = w.reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, config.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    tok_meta = {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    return config, state, tok_meta


def _cache_paths(path: Path) -> tuple[Path, Path]:
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    d = cache_dir() / "converted"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}.safetensors", d / f"{key}.json"


def load_gguf(path: str | Path, use_cache: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, float32 state dict in HF names, tokenizer metadata); cached after the first call."""
    path = Path(path)
    tensors_file, meta_file = _cache_paths(path)
    if use_cache and tensors_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return ModelConfig.from_dict(meta["config"]), load_file(tensors_file), meta["tokenizer"]
    config, state, tok_meta = convert_gguf(path)
    if use_cache:
        tmp = tensors_file.with_suffix(".part")
        save_file(state, str(tmp))
        tmp.replace(tensors_file)
        meta_file.write_text(json.dumps({"config": config.to_dict(), "tokenizer": tok_meta}))
    return config, state, tok_meta
