"""The built-model cache: a second load maps the saved model and never rebuilds it; same outputs."""

from __future__ import annotations

import pytest
import torch

from logitlab.model.store import load_or_build

from tiny import tiny_config, tiny_state_dict


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("tied", [True, False])
def test_second_load_comes_from_the_cache(tmp_path, dtype, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"stand-in source file: only its name, size and mtime key the cache")
    calls = []

    def state_dict():
        calls.append(1)
        return tiny_state_dict(cfg, seed=4)

    built = load_or_build(cfg, state_dict, dtype, source, tmp_path / "cache")
    cached = load_or_build(cfg, state_dict, dtype, source, tmp_path / "cache")
    assert len(calls) == 1
    toks = torch.tensor([[1, 5, 9, 2, 7]])
    pos = torch.arange(5).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(built(toks, pos, logits_at="all"), cached(toks, pos, logits_at="all"))
    if tied and dtype == "float32":
        assert cached.lm_head.weight is cached.model.embed_tokens.weight
