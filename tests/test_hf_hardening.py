"""A Hugging Face model directory is read without trusting it: every malformation is a one-line
``model: ...`` ValueError (CLI: exit 2), checked before tensors are loaded where it can be."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_weights import write_hf_dir

from logitlab.weights import load_weights
from logitlab.weights.hf_loader import load_hf_dir


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_good")
    write_hf_dir(d, tie=True, sharded=True)
    shutil.copy(d / "model-00001-of-00002.safetensors", d / "spare.bin")  # kept for the tests to reuse
    return d


def _copy(good, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


CONFIG_CASES = {
    "missing vocab_size": dict(vocab_size=...),
    "zero heads": dict(num_attention_heads=0),
    "string hidden size": dict(hidden_size="32"),
    "bool layers": dict(num_hidden_layers=True),
    "kv heads not dividing": dict(num_key_value_heads=3),
    "huge context": dict(max_position_embeddings=1 << 40),
    "negative eps": dict(rms_norm_eps=-1.0),
    "rope_scaling not an object": dict(rope_scaling="linear"),
    "sliding_window a string": dict(sliding_window="big"),
    "hidden not a multiple of heads": dict(hidden_size=30, head_dim=None),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values_are_one_line_errors(good, tmp_path, case):
    d = _copy(good, tmp_path)
    _edit_config(d, **CONFIG_CASES[case])
    with pytest.raises(ValueError, match=r"^model: config.json") as e:
        load_hf_dir(d)
    assert "\n" not in str(e.value)


def test_index_shards_must_stay_inside_the_directory(good, tmp_path):
    d = _copy(good, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the model directory"):
        load_hf_dir(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no weight_map"):
        load_hf_dir(d)
    index["weight_map"][name] = "missing.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing shard"):
        load_hf_dir(d)


def test_a_tensor_in_two_shards_is_refused(good, tmp_path):
    d = _copy(good, tmp_path)
    a = load_file(str(d / "model-00001-of-00002.safetensors"))
    b = load_file(str(d / "model-00002-of-00002.safetensors"))
    b[next(iter(a))] = next(iter(a.values()))
    save_file(b, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="is in both"):
        load_hf_dir(d)


@pytest.mark.parametrize("bad", ["int", "nan", "shape", "garbage"])
def test_bad_tensors_are_refused(good, tmp_path, bad):
    d = _copy(good, tmp_path)
    f = d / "model-00001-of-00002.safetensors"
    t = load_file(str(f))
    name = next(k for k in t if "q_proj" in k)
    if bad == "int":
        t[name] = t[name].to(torch.int32)
    elif bad == "nan":
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")
    elif bad == "shape":
        t[name] = t[name][:, :-1].contiguous()
    if bad == "garbage":
        f.write_bytes(b"\xff" * 64)
    else:
        save_file(t, str(f))
    match = {"int": "not floating point", "nan": "NaN", "shape": "config.json implies",
             "garbage": "not a valid safetensors"}[bad]
    with pytest.raises(ValueError, match=match):
        load_hf_dir(d)


def test_the_cli_says_one_line_and_exits_2(good, tmp_path, capsys):
    from logitlab.cli import main

    d = _copy(good, tmp_path)
    _edit_config(d, num_attention_heads=0)
    assert main(["score", "hello", "--model", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: config.json num_attention_heads")


def test_the_good_directory_still_loads(good):
    w = load_weights(str(good))
    assert w.config.num_layers == 2
