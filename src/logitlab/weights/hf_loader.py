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


_LIMITS = {  # far beyond any model this runtime is for; they keep a hostile config.json from sizing tables
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 20,
}


def _int_field(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= _LIMITS[key]:
        raise ValueError(f"model: config.json {key} must be an integer in [1, {_LIMITS[key]}], got {v!r}")
    return v


def _check_llama(cfg: dict) -> None:
    """Every number ModelConfig.from_hf_config reads, typed and in range (a KeyError or a zero would
    otherwise surface as a traceback, a huge value as a huge RoPE table)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _int_field(cfg, key)
    heads = cfg["num_attention_heads"]
    kv = _int_field(cfg, "num_key_value_heads", heads)
    if heads % kv:
        raise ValueError(f"model: config.json num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    if cfg.get("head_dim") is not None:
        _int_field(cfg, "head_dim")
    elif cfg["hidden_size"] % heads:
        raise ValueError(f"model: config.json hidden_size {cfg['hidden_size']} is not a multiple of {heads} heads")
    _int_field(cfg, "max_position_embeddings", 2048)
    for key, default in (("rms_norm_eps", 1e-5), ("rope_theta", 10000.0)):
        v = cfg.get(key, default)
        if v is None and key == "rope_theta":
            continue  # transformers >= 5 keeps it under rope_parameters
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e12:
            raise ValueError(f"model: config.json {key} must be a positive number, got {v!r}")


def _check_supported(cfg: dict) -> None:
    arch = cfg.get("model_type", "llama")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: architecture {arch!r} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"model: config.json {key} must be an object, got {type(cfg[key]).__name__}")
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
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ValueError(f"model: config.json sliding_window must be an integer or null, got {window!r}")
    limit = cfg.get("max_position_embeddings", 0)
    if window and isinstance(limit, int) and window < limit:
        raise ValueError("model: sliding-window attention is not supported")
    if arch != "gpt2":
        _check_llama(cfg)


def safetensors_files(path: Path) -> list[Path]:
    """The shards named by ``model.safetensors.index.json`` when there is one, else every *.safetensors.
    Shard names must stay inside the directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"model: {index} is not a readable index ({type(e).__name__})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"model: {index} has no weight_map of tensor -> shard file names")
        root = path.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            f = (path / name).resolve()
            if f.parent != root or not f.name.endswith(".safetensors"):
                raise ValueError(f"model: {index} names a shard outside the model directory: {name!r}")
            if not f.is_file():
                raise ValueError(f"model: {index} names a missing shard: {name!r}")
            files.append(f)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors in {path}")
    return files


_FLOATS = {"F16", "BF16", "F32", "F64"}


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the shards; headers checked first (floating-point dtypes, no name in two shards),
    values after (finite)."""
    from safetensors import safe_open

    seen: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in seen:
                        raise ValueError(f"model: tensor {name} is in both {seen[name].name} and {f.name}")
                    seen[name] = f
                    dtype = h.get_slice(name).get_dtype()
                    if dtype not in _FLOATS and not name.endswith((".attn.bias", ".attn.masked_bias")):
                        raise ValueError(f"model: tensor {name} in {f.name} is {dtype}, not floating point")
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's own error for a malformed header
            raise ValueError(f"model: {f.name} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"model: tensor {name} holds NaN or infinite values")
    return state


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
    gpt2 = cfg.get("model_type") == "gpt2"
    config = config_from_hf_gpt2(cfg) if gpt2 else ModelConfig.from_hf_config(cfg)  # checked before any tensor
    state = _read_tensors(safetensors_files(path))
    if gpt2:
        return config, hf_gpt2_to_ours(state, config)
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
    for name, shape in llama_shapes(config).items():
        if name in state and tuple(state[name].shape) != shape:
            raise ValueError(f"model: tensor {name} is {tuple(state[name].shape)}, config.json implies {shape}")
    return config, state


def llama_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a Llama checkpoint in Hugging Face names."""
    c, f, d, v = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
    h, k = config.num_heads * d, config.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,), "lm_head.weight": (v, c)}
    per_layer = {"input_layernorm.weight": (c,), "post_attention_layernorm.weight": (c,),
                 "self_attn.q_proj.weight": (h, c), "self_attn.k_proj.weight": (k, c),
                 "self_attn.v_proj.weight": (k, c), "self_attn.o_proj.weight": (c, h),
                 "mlp.gate_proj.weight": (f, c), "mlp.up_proj.weight": (f, c), "mlp.down_proj.weight": (c, f)}
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{n}": sh for n, sh in per_layer.items()})
    return shapes
