"""GPT-2 checkpoints in Hugging Face's layout (``GPT2LMHeadModel``): read, and written by ``logitlab train``.

A model logitlab trains is saved as a Hugging Face GPT-2 directory (config.json, model.safetensors,
tokenizer.json), so it loads wherever a model is named here, and in transformers too. Two differences from
our own names: GPT-2 stores its projections as ``Conv1D`` weights, ``[in, out]`` (the transpose of
``nn.Linear``'s ``[out, in]``), and calls them ``c_attn`` (q, k and v stacked, as our ``qkv_proj``),
``c_proj``, ``c_fc``.

Settings GPT-2 has no key for (post-norm blocks, the direction a model was trained in) travel in a
``"logitlab"`` object inside config.json, which transformers ignores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import ModelConfig

# Hugging Face activation names -> ours (all three tanh forms are the same function)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}

# per layer: ours -> (theirs, is a Conv1D weight to transpose)
_LAYER = {
    "input_layernorm.weight": ("ln_1.weight", False), "input_layernorm.bias": ("ln_1.bias", False),
    "self_attn.qkv_proj.weight": ("attn.c_attn.weight", True), "self_attn.qkv_proj.bias": ("attn.c_attn.bias", False),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", True), "self_attn.o_proj.bias": ("attn.c_proj.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False), "post_attention_layernorm.bias": ("ln_2.bias", False),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", True), "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", True), "mlp.down_proj.bias": ("mlp.c_proj.bias", False),
}
_TOP = {"model.embed_tokens.weight": "wte.weight", "model.embed_positions.weight": "wpe.weight",
        "model.norm.weight": "ln_f.weight", "model.norm.bias": "ln_f.bias"}


def _check(cfg: dict) -> None:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"model: GPT-2 activation {act!r} is not supported (only {', '.join(ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if cfg.get(flag):
            raise ValueError(f"model: GPT-2 {flag}=true is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ValueError("model: GPT-2 scale_attn_weights=false is not supported (attention is scaled by 1/sqrt(d))")
    for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= (1 << 24):
            raise ValueError(f"model: GPT-2 config.json {key} must be a positive integer, got {v!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"model: GPT-2 n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")


def config_from_hf_gpt2(cfg: dict) -> ModelConfig:
    """ModelConfig from a GPT-2 ``config.json`` (plus our ``"logitlab"`` extras)."""
    _check(cfg)
    c, heads = cfg["n_embd"], cfg["n_head"]
    extra = cfg.get("logitlab") or {}
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=c, intermediate_size=cfg.get("n_inner") or 4 * c,
        num_layers=cfg["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=c // heads,
        context_length=cfg["n_positions"], rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), architecture="gpt2", norm="layernorm",
        norm_placement=extra.get("norm_placement", "pre"), position="learned",
        mlp=ACTIVATIONS[cfg.get("activation_function", "gelu_new")], bias=True,
    )


def config_to_hf_gpt2(config: ModelConfig, **extra) -> dict:
    """The config.json of a GPT-2-architecture ModelConfig; ``extra`` goes under ``"logitlab"``."""
    if (config.norm, config.position, config.num_kv_heads, config.bias) != ("layernorm", "learned",
                                                                             config.num_heads, True):
        raise ValueError("model: only a GPT-2-architecture model (LayerNorm, learned positions, biases, no GQA) "
                         "can be written as a GPT-2 checkpoint")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(config.mlp)
    if act is None:
        raise ValueError(f"model: GPT-2 has no {config.mlp!r} MLP")
    logitlab = {"norm_placement": config.norm_placement, **extra}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.context_length, "n_embd": config.hidden_size, "n_layer": config.num_layers,
        "n_head": config.num_heads, "n_inner": config.intermediate_size, "activation_function": act,
        "layer_norm_epsilon": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "logitlab": logitlab,
    }


def hf_gpt2_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (with or without the ``transformer.`` prefix) -> our names, float32, in
    ``nn.Linear`` layout. Raises ValueError naming what is missing, unexpected or mis-shaped."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    # causal-mask buffers older checkpoints carry; the tied head's copy
    theirs = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm_head = theirs.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    for ours, name in _TOP.items():
        if name in theirs:
            out[ours] = theirs.pop(name)
    for i in range(config.num_layers):
        for ours, (name, conv) in _LAYER.items():
            t = theirs.pop(f"h.{i}.{name}", None)
            if t is not None:
                out[f"model.layers.{i}.{ours}"] = t.t() if conv else t
    if not config.tie_word_embeddings and lm_head is not None:
        out["lm_head.weight"] = lm_head
    want = expected_shapes(config)
    missing, extra = sorted(want.keys() - out.keys()), sorted(theirs)
    if missing or extra:
        raise ValueError(f"model: GPT-2 checkpoint does not match its config.json: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for k, shape in want.items():
        if tuple(out[k].shape) != shape:
            raise ValueError(f"model: GPT-2 tensor {k} is {tuple(out[k].shape)}, config.json implies {shape}")
    return {k: v.float().contiguous() for k, v in out.items()}


def ours_to_hf_gpt2(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face GPT-2 names and Conv1D layout (the tied head left out, as
    ``save_pretrained`` does)."""
    out = {}
    for ours, name in _TOP.items():
        out["transformer." + name] = state[ours]
    for i in range(config.num_layers):
        for ours, (name, conv) in _LAYER.items():
            t = state[f"model.layers.{i}.{ours}"]
            out[f"transformer.h.{i}.{name}"] = t.t() if conv else t
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c, f, v, p = config.hidden_size, config.intermediate_size, config.vocab_size, config.context_length
    shapes = {"model.embed_tokens.weight": (v, c), "model.embed_positions.weight": (p, c),
              "model.norm.weight": (c,), "model.norm.bias": (c,)}
    layer = {"input_layernorm.weight": (c,), "input_layernorm.bias": (c,),
             "self_attn.qkv_proj.weight": (3 * c, c), "self_attn.qkv_proj.bias": (3 * c,),
             "self_attn.o_proj.weight": (c, c), "self_attn.o_proj.bias": (c,),
             "post_attention_layernorm.weight": (c,), "post_attention_layernorm.bias": (c,),
             "mlp.up_proj.weight": (f, c), "mlp.up_proj.bias": (f,),
             "mlp.down_proj.weight": (c, f), "mlp.down_proj.bias": (c,)}
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, c)
    return shapes


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def save_gpt2_dir(model, out_dir: str | os.PathLike, extra: dict | None = None, **top) -> Path:
    """Write ``model`` (a GPT-2-architecture Transformer) as config.json + model.safetensors in ``out_dir``,
    each file complete or absent (temp file + rename). ``extra`` goes under config.json's ``"logitlab"``,
    ``top`` (e.g. ``bos_token_id=..., eos_token_id=...``) at its top level. The tokenizer files are the
    caller's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_cfg = {**config_to_hf_gpt2(config, **(extra or {})), **top}
    tensors = ours_to_hf_gpt2(model.state_dict(), config)
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf_cfg, indent=2) + "\n"))
    return out
