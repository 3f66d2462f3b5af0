"""logitlab's native kernels (model/kernels.c) against plain PyTorch references; the int8 matmul is
also covered in test_quant.py."""

from __future__ import annotations

import pytest
import torch

from logitlab.model import native
from logitlab.model.cache import KVCache

from tiny import tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels are not built")


def reference_attention(q, k_cache, v_cache, slot0, lens):
    B, H, D = q.shape
    K = k_cache.shape[1]
    out = []
    for b in range(B):
        k = k_cache[slot0 + b, :, : lens[b]].repeat_interleave(H // K, 0).double()  # [H, L, D]
        v = v_cache[slot0 + b, :, : lens[b]].repeat_interleave(H // K, 0).double()
        p = torch.softmax((q[b].double().unsqueeze(1) @ k.transpose(1, 2)) * D**-0.5, -1)  # [H, 1, L]
        out.append((p @ v).reshape(H * D))
    return torch.stack(out).float()


@pytest.mark.parametrize("H,K,D", [(9, 3, 64), (4, 2, 16), (4, 4, 40), (6, 1, 8)])
def test_decode_attention_equals_softmax_attention(H, K, D):
    g = torch.Generator().manual_seed(H * 100 + D)
    slots, max_pos, B, slot0 = 7, 300, 5, 2
    k_cache = torch.randn(slots, K, max_pos, D, generator=g)
    v_cache = torch.randn(slots, K, max_pos, D, generator=g)
    qk = torch.randn(B, H + K, D, generator=g) * 3  # queries as the model has them: a strided view
    q = qk[:, :H]
    lens = torch.tensor([1, 17, 16, 299, 300])
    got = native.attend_decode(q, k_cache, v_cache, slot0, lens)
    assert got.shape == (B, H * D)
    assert (got - reference_attention(q, k_cache, v_cache, slot0, lens)).abs().max() < 1e-5


def test_decode_attention_handles_peaked_and_flat_scores():
    """exp of very negative scores underflows to 0 (no NaN); equal scores average the values."""
    k_cache = torch.zeros(1, 1, 40, 16)
    v_cache = torch.randn(1, 1, 40, 16, generator=torch.Generator().manual_seed(1))
    q = torch.zeros(1, 1, 16)
    flat = native.attend_decode(q, k_cache, v_cache, 0, torch.tensor([40]))
    assert torch.allclose(flat[0], v_cache[0, 0].mean(0), atol=1e-6)
    k_cache[0, 0, 5, 0] = 1000.0
    q[0, 0, 0] = 1000.0
    peaked = native.attend_decode(q, k_cache, v_cache, 0, torch.tensor([40]))
    assert torch.isfinite(peaked).all() and torch.allclose(peaked[0], v_cache[0, 0, 5], atol=1e-6)


def test_decode_attention_rejects_bad_input():
    k = torch.zeros(2, 1, 8, 16)
    with pytest.raises(TypeError):
        native.attend_decode(torch.zeros(1, 2, 16, dtype=torch.float64), k, k, 0, torch.tensor([1]))
    with pytest.raises(ValueError):
        native.attend_decode(torch.zeros(2, 2, 16), k, k, 1, torch.tensor([1, 1]))  # slots 1..2 of 2
    with pytest.raises(ValueError):
        native.attend_decode(torch.zeros(1, 2, 8), k, k, 0, torch.tensor([1]))  # head_dim mismatch


@torch.inference_mode()
def test_float32_decode_with_native_attention_equals_pytorch_attention():
    """A float32 model (no int8 layers): decoding with and without the native attention kernel gives
    the same logits, for ragged rows in a batch and for a single row in a later slot."""
    m = tiny_model()
    cache = KVCache(m.config, slots=4, max_len=40)
    prompts = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(3))
    valid = torch.arange(9).unsqueeze(0) < torch.tensor([[9], [4], [6]])
    m(prompts, torch.arange(9).expand(3, -1), cache, valid=valid)
    lengths = valid.sum(1, keepdim=True)
    for step in range(3):
        x = torch.tensor([[5 + step], [7], [11]])
        pos = lengths + step
        with native.switched_off():
            ref = m(x, pos, cache)
        got = m(x, pos, cache)  # rewrites the same cache entries with the same values
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    with native.switched_off():
        ref = m(torch.tensor([[3]]), torch.tensor([[6]]), cache, rows=slice(2, 3))
    got = m(torch.tensor([[3]]), torch.tensor([[6]]), cache, rows=slice(2, 3))
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
