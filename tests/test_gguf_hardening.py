"""Malformed GGUF files are refused with one line ``model: ...`` (a ValueError, exit 2 from the CLI), never
another exception, and before the loader allocates more than the file's size implies.

Each case starts from a tiny valid Llama GGUF written here with gguf-py's GGUFWriter and breaks one thing:
a metadata value (written with the wrong value or type), or bytes of the written file (header counts,
string lengths, value types, tensor-info dimensions / types / offsets, truncation). The byte offsets are
found by ``layout``, a walk over the (valid) file written for the tests, independent of the loader.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from logitlab.weights import load_weights

# ---- a tiny valid GGUF ---------------------------------------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, CTX = 32, 48, 2, 4, 2, 8, 64


def byte_vocab() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


TOKENS = [*byte_vocab(), "he", "ll", "<|im_start|>", "<|im_end|>"]
VOCAB = len(TOKENS)


def tensor_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy-order shape (outermost first)."""
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return shapes


DROP = object()


def write_gguf(path: Path, meta: dict | None = None, drop: tuple[str, ...] = (), extra: dict | None = None,
               qtypes: dict | None = None, alignment: int | None = None) -> Path:
    """A 2-layer Llama GGUF (float32 tensors unless ``qtypes`` says otherwise). ``meta``: key -> (value,
    GGUFValueType[, sub type]) written instead of the default, or DROP; ``drop``: tensors left out;
    ``extra``: more tensors (name -> float32 array)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - 2) + [3, 3])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, spec in (meta or {}).items():
        w.kv_data[0].pop(key, None)
        if spec is not DROP:
            w.add_key_value(key, spec[0], spec[1], *spec[2:])
    tensors = {n: rng.standard_normal(s).astype(np.float32) * 0.1 for n, s in tensor_shapes().items()}
    tensors |= extra or {}
    for name, x in tensors.items():
        if name in drop:
            continue
        q = (qtypes or {}).get(name)
        if q is None:
            w.add_tensor(name, x)
        else:
            t = gguf.GGMLQuantizationType[q]
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def layout(path: Path) -> dict:
    """Byte offsets in a valid little-endian GGUF: the counts, each key's type and value, each tensor info's
    fields, the data section."""
    b = path.read_bytes()
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(p):
        n = struct.unpack_from("<Q", b, p)[0]
        return b[p + 8: p + 8 + n].decode(), p + 8 + n

    def value(p, t):
        if t in sizes:
            return p + sizes[t]
        if t == 8:
            return string(p)[1]
        sub, n = struct.unpack_from("<IQ", b, p)
        p += 12
        for _ in range(n):
            p = value(p, sub)
        return p

    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    kv, tensors = {}, {}
    for _ in range(n_kv):
        key, p = string(pos)
        t = struct.unpack_from("<I", b, p)[0]
        kv[key] = {"at": pos, "type": p, "value": p + 4}
        pos = value(p + 4, t)
    for _ in range(n_tensors):
        name, p = string(pos)
        nd = struct.unpack_from("<I", b, p)[0]
        tensors[name] = {"at": pos, "n_dims": p, "dims": p + 4, "type": p + 4 + 8 * nd, "offset": p + 8 + 8 * nd}
        pos = p + 16 + 8 * nd
    return {"kv": kv, "tensors": tensors, "info_end": pos, "size": len(b), "data_start": -(-pos // 32) * 32}


def patch(path: Path, offset: int, fmt: str, *values) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


def tensor_offset(path: Path, name: str) -> int:
    lay = layout(path)
    return struct.unpack_from("<Q", path.read_bytes(), lay["tensors"][name]["offset"])[0]


# ---- the malformations --------------------------------------------------------------------------------------


def _v():
    import gguf

    return gguf.GGUFValueType


def meta_case(**meta):
    """A file written with these metadata values (keys with '.' spelled '__' here)."""
    return lambda p: write_gguf(p, meta={k.replace("__", "."): v for k, v in meta.items()})


def header_patch(fmt_offset_values):
    """Patch fixed header bytes: [(offset, fmt, value), ...]."""
    def make(p):
        write_gguf(p)
        for off, fmt, v in fmt_offset_values:
            patch(p, off, fmt, v)
        return p
    return make


def kv_patch(key: str, field: str, fmt: str, value, delta: int = 0):
    """Patch a key's value-type field or the first bytes of its value (``delta`` bytes into it)."""
    def make(p):
        write_gguf(p)
        return patch(p, layout(p)["kv"][key][field] + delta, fmt, value)
    return make


def tensor_patch(name: str, field: str, fmt: str, value, delta: int = 0):
    def make(p):
        write_gguf(p)
        v = value(p) if callable(value) else value
        return patch(p, layout(p)["tensors"][name][field] + delta, fmt, *(v if isinstance(v, tuple) else (v,)))
    return make


def truncated(where):
    def make(p):
        write_gguf(p)
        b = p.read_bytes()
        p.write_bytes(b[: where(layout(p))])
        return p
    return make


def written(data: bytes):
    def make(p):
        p.write_bytes(data)
        return p
    return make


def _rename_key(p: Path, old: str, new: str) -> Path:
    """Give key ``old`` the name ``new`` (same length) in place."""
    assert len(old) == len(new)
    at = layout(p)["kv"][old]["at"]
    data = bytearray(p.read_bytes())
    data[at + 8: at + 8 + len(old)] = new.encode()
    p.write_bytes(bytes(data))
    return p


def duplicate_key(p):
    # a second key, of general.architecture's length, renamed into a duplicate of it
    write_gguf(p, meta={"general.zzzzzzzzzzzz": ("x", _v().STRING)})
    return _rename_key(p, "general.zzzzzzzzzzzz", "general.architecture")


def duplicate_tensor(p):
    write_gguf(p)
    lay = layout(p)
    at = lay["tensors"]["blk.1.ffn_up.weight"]["at"]
    data = bytearray(p.read_bytes())
    data[at + 8: at + 8 + len("blk.1.ffn_up.weight")] = b"blk.0.ffn_up.weight"
    p.write_bytes(bytes(data))
    return p


def bad_utf8_key(p):
    write_gguf(p)
    at = layout(p)["kv"]["llama.block_count"]["at"]
    return patch(p, at + 8, "2s", b"\xff\xfe")


def bad_utf8_token(p):
    tokens = list(TOKENS)
    tokens[-3] = "l\u00e9"  # 3 bytes: b"l\xc3\xa9" -> b"l\xc3\x28" is not UTF-8
    write_gguf(p, meta={"tokenizer.ggml.tokens": (tokens, _v().ARRAY)})
    data = p.read_bytes()
    i = data.index("l\u00e9".encode())
    return patch(p, i + 2, "B", 0x28)


def overlapping(p):
    write_gguf(p)
    a = tensor_offset(p, "blk.0.ffn_up.weight")
    return patch(p, layout(p)["tensors"]["blk.0.ffn_gate.weight"]["offset"], "Q", a)


def tensor_type_q4_0_with_odd_rows(p):
    # Q4_0 blocks hold 32 values: an innermost dimension of 48 is not a whole number of blocks
    write_gguf(p)
    return patch(p, layout(p)["tensors"]["blk.0.ffn_down.weight"]["type"], "I", 2)


def unsupported_type(p):
    # Q8_1 (an intermediate type: no dequantizer); dims chosen so the byte size still fits the file
    write_gguf(p)
    return patch(p, layout(p)["tensors"]["output_norm.weight"]["type"], "I", 9)


def nan_weights(p):
    write_gguf(p)
    off = layout(p)["data_start"] + tensor_offset(p, "blk.0.attn_norm.weight")
    return patch(p, off, "f", float("nan"))


def shape_swapped(p):
    write_gguf(p)
    t = layout(p)["tensors"]["blk.0.ffn_up.weight"]
    return patch(p, t["dims"], "QQ", FFN, HIDDEN)  # GGUF order is innermost first: (hidden, ffn) -> (ffn, hidden)


def one_dim_more(p):
    # 3-D embedding [1, vocab, hidden]: same bytes, a shape no Llama tensor has. The tensor info grows by 8
    # bytes, so build it with gguf-py rather than by patching.
    rng = np.random.default_rng(0)
    return write_gguf(p, extra={"token_embd.weight": rng.standard_normal((1, VOCAB, HIDDEN)).astype(np.float32)})


def with_nested_array(p):
    write_gguf(p, meta={"general.tags": (["a", "b"], _v().ARRAY)})
    # the array's element type (string, 8) -> array (9): elements are then read as nested arrays
    return patch(p, layout(p)["kv"]["general.tags"]["value"], "I", 9)


CASES = {
    # -- the file itself
    "empty file": written(b""),
    "three bytes": written(b"GGU"),
    "bad magic": header_patch([(0, "4s", b"GGML")]),
    "version 1": header_patch([(4, "I", 1)]),
    "version 7": header_patch([(4, "I", 7)]),
    "header only": truncated(lambda lay: 24),
    "cut inside the metadata": truncated(lambda lay: lay["kv"]["tokenizer.ggml.tokens"]["value"] + 200),
    "cut inside the tensor infos": truncated(lambda lay: lay["tensors"]["blk.1.ffn_up.weight"]["dims"]),
    "cut inside the data": truncated(lambda lay: lay["size"] - 100),
    # -- counts
    "tensor_count 2^64-1": header_patch([(8, "Q", 2**64 - 1)]),
    "tensor_count one too many": lambda p: patch(write_gguf(p), 8, "Q", len(tensor_shapes()) + 1),
    "kv_count 2^64-1": header_patch([(16, "Q", 2**64 - 1)]),
    "kv_count 2^40": header_patch([(16, "Q", 2**40)]),
    # -- metadata encoding
    "key length 2^64-1": kv_patch("llama.block_count", "at", "Q", 2**64 - 1, 0),
    "key length past the end": kv_patch("llama.block_count", "at", "Q", 10**9, 0),
    "value type 13": kv_patch("llama.block_count", "type", "I", 13),
    "value type 2^32-1": kv_patch("llama.context_length", "type", "I", 2**32 - 1),
    "string length 2^64-1": kv_patch("tokenizer.ggml.model", "value", "Q", 2**64 - 1),
    "token array length 2^62": kv_patch("tokenizer.ggml.tokens", "value", "Q", 2**62, 4),
    "token_type array length 2^32-1": kv_patch("tokenizer.ggml.token_type", "value", "Q", 2**32 - 1, 4),
    "token string length 2^63": kv_patch("tokenizer.ggml.tokens", "value", "Q", 2**63, 12),
    "array element type 99": kv_patch("tokenizer.ggml.token_type", "value", "I", 99),
    "array of arrays": with_nested_array,
    "invalid UTF-8 in a key": bad_utf8_key,
    "invalid UTF-8 in a token": bad_utf8_token,
    "duplicate key": duplicate_key,
    "alignment 0": lambda p: patch(write_gguf(p, alignment=32), layout(p)["kv"]["general.alignment"]["value"],
                                   "I", 0),
    "alignment 48": lambda p: patch(write_gguf(p, alignment=32), layout(p)["kv"]["general.alignment"]["value"],
                                    "I", 48),
    "alignment as a string": meta_case(general__alignment=("32", _v().STRING)),
    # -- metadata values
    "block_count 2^32-1": meta_case(llama__block_count=(2**32 - 1, _v().UINT32)),
    "block_count 2^64-1": meta_case(llama__block_count=(2**64 - 1, _v().UINT64)),
    "block_count 0": meta_case(llama__block_count=(0, _v().UINT32)),
    "block_count 3 (2 in the file)": meta_case(llama__block_count=(3, _v().UINT32)),
    "block_count -1": meta_case(llama__block_count=(-1, _v().INT32)),
    "block_count as a string": meta_case(llama__block_count=("2", _v().STRING)),
    "block_count as a float": meta_case(llama__block_count=(2.5, _v().FLOAT32)),
    "embedding_length 2^20": meta_case(llama__embedding_length=(2**20, _v().UINT32)),
    "embedding_length 0": meta_case(llama__embedding_length=(0, _v().UINT32)),
    "feed_forward_length 2^30": meta_case(llama__feed_forward_length=(2**30, _v().UINT32)),
    "head_count 0": meta_case(llama__attention__head_count=(0, _v().UINT32)),
    "head_count 3": meta_case(llama__attention__head_count=(3, _v().UINT32)),
    "head_count_kv 0": meta_case(llama__attention__head_count_kv=(0, _v().UINT32)),
    "head_count_kv 3": meta_case(llama__attention__head_count_kv=(3, _v().UINT32)),
    "key_length 2^31": meta_case(llama__attention__key_length=(2**31, _v().UINT32)),
    "context_length 2^40": meta_case(llama__context_length=(2**40, _v().UINT64)),
    "context_length 0": meta_case(llama__context_length=(0, _v().UINT32)),
    "rms eps NaN": meta_case(llama__attention__layer_norm_rms_epsilon=(float("nan"), _v().FLOAT32)),
    "rms eps negative": meta_case(llama__attention__layer_norm_rms_epsilon=(-1.0, _v().FLOAT32)),
    "rope base inf": meta_case(llama__rope__freq_base=(float("inf"), _v().FLOAT32)),
    "head_count missing": meta_case(llama__attention__head_count=DROP),
    "architecture as an int": meta_case(general__architecture=(7, _v().UINT32)),
    "tokens as integers": meta_case(tokenizer__ggml__tokens=(list(range(VOCAB)), _v().ARRAY)),
    "token list longer than the embedding": meta_case(
        tokenizer__ggml__tokens=([*TOKENS, "x1", "x2"], _v().ARRAY),
        tokenizer__ggml__token_type=([1] * (VOCAB - 2) + [3, 3, 1, 1], _v().ARRAY)),
    "token_type shorter than tokens": meta_case(tokenizer__ggml__token_type=([1] * 10, _v().ARRAY)),
    "merges as integers": meta_case(tokenizer__ggml__merges=([1, 2], _v().ARRAY)),
    "merge without a space": meta_case(tokenizer__ggml__merges=(["he"], _v().ARRAY)),
    "bos id out of range": meta_case(tokenizer__ggml__bos_token_id=(10**6, _v().UINT32)),
    "eos id as a string": meta_case(tokenizer__ggml__eos_token_id=("1", _v().STRING)),
    "chat template as an int": meta_case(tokenizer__chat_template=(1, _v().UINT32)),
    "merge of unknown tokens": meta_case(tokenizer__ggml__merges=(["h \u4e00"], _v().ARRAY)),
    "merge whose join is not a token": meta_case(tokenizer__ggml__merges=(["h l"], _v().ARRAY)),
    "duplicate tokens": meta_case(tokenizer__ggml__tokens=([*TOKENS[:-1], "he"], _v().ARRAY)),
    # -- tensor infos
    "offset 2^64-32 (wraps)": tensor_patch("blk.0.attn_q.weight", "offset", "Q", 2**64 - 32),
    "offset unaligned": tensor_patch("blk.0.attn_q.weight", "offset",
                                     "Q", lambda p: tensor_offset(p, "blk.0.attn_q.weight") + 4),
    "offset past the end": tensor_patch("blk.1.ffn_down.weight", "offset", "Q", 1 << 30),
    "overlapping tensors": overlapping,
    "n_dims 0": tensor_patch("output_norm.weight", "n_dims", "I", 0),
    "n_dims 5": tensor_patch("output_norm.weight", "n_dims", "I", 5),
    "n_dims 2^32-1": tensor_patch("output_norm.weight", "n_dims", "I", 2**32 - 1),
    "a dimension 0": tensor_patch("blk.0.attn_q.weight", "dims", "Q", 0),
    "a dimension 2^63": tensor_patch("blk.0.attn_q.weight", "dims", "Q", 2**63, 8),
    "dimensions multiply past 2^64": tensor_patch("blk.0.attn_q.weight", "dims", "QQ", (2**40, 2**40)),
    "a dimension 2^20 (size past the end)": tensor_patch("token_embd.weight", "dims", "Q", 2**20, 8),
    "tensor type 99": tensor_patch("blk.0.attn_k.weight", "type", "I", 99),
    "Q4_0 rows not whole blocks": tensor_type_q4_0_with_odd_rows,
    "unsupported tensor type": unsupported_type,
    "tensor name length 2^64-1": tensor_patch("blk.0.attn_v.weight", "at", "Q", 2**64 - 1),
    "duplicate tensor name": duplicate_tensor,
    # -- tensors vs the configuration
    "tensor missing": lambda p: write_gguf(p, drop=("blk.1.attn_k.weight",)),
    "unknown tensor": lambda p: write_gguf(p, extra={"blk.0.ffn_gate_exps.weight": np.zeros((4, 4), np.float32)}),
    "layer past block_count": lambda p: write_gguf(
        p, extra={"blk.2.attn_norm.weight": np.ones(HIDDEN, np.float32)}),
    "tensor shape transposed": shape_swapped,
    "tensor with an extra dimension": one_dim_more,
    "NaN in the weights": nan_weights,
}


# What each refusal must name (so that each case is refused for its own defect, not another one).
EXPECT = {
    "empty file": "too short", "three bytes": "too short", "bad magic": "not a GGUF file",
    "version 1": "version 1", "version 7": "version 7", "header only": "metadata entries",
    "cut inside the metadata": "tokenizer.ggml.tokens", "cut inside the tensor infos": "blk.1.ffn_up.weight",
    "cut inside the data": "past the end", "tensor_count 2^64-1": "tensors", "tensor_count one too many": "tensor",
    "kv_count 2^64-1": "metadata entries", "kv_count 2^40": "metadata entries", "key length 2^64-1": "metadata key",
    "key length past the end": "metadata key", "value type 13": "value type 13",
    "value type 2^32-1": "value type 4294967295", "string length 2^64-1": "tokenizer.ggml.model",
    "token array length 2^62": "tokenizer.ggml.tokens", "token_type array length 2^32-1": "token_type",
    "token string length 2^63": "tokenizer.ggml.tokens[0]", "array element type 99": "element type 99",
    "array of arrays": "array of arrays", "invalid UTF-8 in a key": "UTF-8", "invalid UTF-8 in a token": "UTF-8",
    "duplicate key": "twice", "alignment 0": "alignment", "alignment 48": "alignment",
    "alignment as a string": "alignment", "block_count 2^32-1": "block_count", "block_count 2^64-1": "block_count",
    "block_count 0": "block_count", "block_count 3 (2 in the file)": "model.layers.2",
    "block_count -1": "block_count", "block_count as a string": "block_count",
    "block_count as a float": "block_count", "embedding_length 2^20": "embedding_length",
    "embedding_length 0": "embedding_length", "feed_forward_length 2^30": "feed_forward_length",
    "head_count 0": "head_count", "head_count 3": "head_count", "head_count_kv 0": "head_count_kv",
    "head_count_kv 3": "head_count_kv", "key_length 2^31": "key_length", "context_length 2^40": "context_length",
    "context_length 0": "context_length", "rms eps NaN": "layer_norm_rms_epsilon",
    "rms eps negative": "layer_norm_rms_epsilon", "rope base inf": "freq_base", "head_count missing": "head_count",
    "architecture as an int": "architecture", "tokens as integers": "tokenizer.ggml.tokens",
    "token list longer than the embedding": "token", "token_type shorter than tokens": "token_type",
    "merges as integers": "merges", "merge without a space": "merge", "bos id out of range": "bos_token_id",
    "eos id as a string": "eos_token_id", "chat template as an int": "chat_template",
    "offset 2^64-32 (wraps)": "past the end", "offset unaligned": "not aligned", "offset past the end": "past the end",
    "overlapping tensors": "overlap", "n_dims 0": "dimensions", "n_dims 5": "dimensions",
    "n_dims 2^32-1": "dimensions", "a dimension 0": "size 0", "a dimension 2^63": "past the end",
    "dimensions multiply past 2^64": "past the end", "a dimension 2^20 (size past the end)": "past the end",
    "tensor type 99": "unknown type 99", "Q4_0 rows not whole blocks": "blocks", "unsupported tensor type": "Q8_1",
    "tensor name length 2^64-1": "tensor name", "duplicate tensor name": "twice",
    "tensor missing": "model.layers.1.self_attn.k_proj.weight", "unknown tensor": "ffn_gate_exps",
    "layer past block_count": "blk.2.attn_norm.weight", "tensor shape transposed": "blk.0.ffn_up.weight",
    "tensor with an extra dimension": "token_embd.weight", "NaN in the weights": "NaN",
    "merge of unknown tokens": "merge", "merge whose join is not a token": "merge",
    "duplicate tokens": "duplicates",
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    d = tmp_path / "home"
    monkeypatch.setenv("LOGITLAB_HOME", str(d))
    return d


def refusal(path: Path) -> str:
    """The loader's error message (the test fails on any other exception, or on success)."""
    with pytest.raises(ValueError) as e:
        load_weights(str(path), progress=False)
    return str(e.value)


def test_the_tiny_file_is_valid(tmp_path, home):
    """The starting point loads (so each case below fails because of its one change)."""
    w = load_weights(str(write_gguf(tmp_path / "ok.gguf")), progress=False)
    assert (w.config.num_layers, w.config.hidden_size, w.config.vocab_size) == (LAYERS, HIDDEN, VOCAB)
    assert w.tokenizer.encode("hell<|im_end|>") == [VOCAB - 4, VOCAB - 3, VOCAB - 1]


def test_there_are_many_cases():
    assert len(CASES) >= 30 and EXPECT.keys() == CASES.keys()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_gguf_is_one_line_model_error(tmp_path, home, case):
    path = CASES[case](tmp_path / "bad.gguf")
    msg = refusal(path)
    assert msg.startswith("model: ") and "\n" not in msg and len(msg) < 400, msg
    assert EXPECT[case] in msg, msg
    converted = home / "converted"
    assert not converted.exists() or not [p for p in converted.iterdir() if p.suffix == ".json"], (
        "a refused file left a cache entry")


def test_cli_refuses_a_malformed_gguf_with_exit_2(tmp_path, home, capsys):
    from logitlab import cli

    path = CASES["offset 2^64-32 (wraps)"](tmp_path / "bad.gguf")
    code = cli.main(["generate", "hi", "--model", str(path), "--max-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model: "), err


WORST = ["block_count 2^32-1", "block_count 2^64-1", "embedding_length 2^20", "feed_forward_length 2^30",
         "context_length 2^40", "key_length 2^31", "kv_count 2^40", "token array length 2^62",
         "token_type array length 2^32-1", "a dimension 2^63", "dimensions multiply past 2^64",
         "offset 2^64-32 (wraps)", "tensor_count 2^64-1", "n_dims 2^32-1"]


def test_worst_cases_stay_within_a_memory_limit(tmp_path):
    """In a fresh process whose address space may grow by only 512 MiB beyond what the imports took (the
    files are < 100 kB), each worst case goes through the CLI (load, build) and comes back as exit 2."""
    paths = {}
    for i, case in enumerate(WORST):
        paths[case] = str(CASES[case](tmp_path / f"w{i}.gguf"))
    script = textwrap.dedent("""
        import contextlib, io, json, resource, sys
        import torch, numpy, gguf, safetensors, tokenizers  # noqa: F401  (imports are not the file's doing)
        from logitlab import cli, engine, tokenizer  # noqa: F401
        from logitlab.weights import gguf_loader  # noqa: F401
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
        out = {}
        for case, path in json.loads(sys.argv[1]).items():
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    code = cli.main(["generate", "x", "--model", path, "--max-tokens", "1"])
            except MemoryError:
                code = "MemoryError"
            except BaseException as e:
                code = type(e).__name__
            out[case] = [code, err.getvalue()]
        print(json.dumps(out))
    """)
    env = {"LOGITLAB_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    for case in WORST:
        code, err = out[case]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: model: "), (case, code, err[-500:])


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_gguf_is_refused_by_the_block_loader_too(tmp_path, home, case):
    """``--dtype gguf`` reads the file with its own walk (no gguf-py reader): the same one-line refusals."""
    from logitlab.weights import load_gguf_model

    path = CASES[case](tmp_path / "bad.gguf")
    with pytest.raises(ValueError) as e:
        load_gguf_model(str(path), progress=False)
    msg = str(e.value)
    assert msg.startswith("model: ") and "\n" not in msg and len(msg) < 400, msg
    assert EXPECT[case] in msg, msg
    models = home / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.suffix == ".json"], (
        "a refused file left a cache entry")
