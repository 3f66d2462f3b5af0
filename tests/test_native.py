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


def test_rms_norm_and_silu_mul_equal_pytorch():
    g = torch.Generator().manual_seed(7)
    for C in (576, 64, 13):
        x, w = torch.randn(5, C, generator=g) * 4, torch.randn(C, generator=g)
        ref = torch.nn.functional.rms_norm(x.double(), (C,), w.double(), 1e-5).float()
        assert (native.rms_norm(x, w, 1e-5) - ref).abs().max() / ref.abs().max() < 1e-6
    for F in (1536, 40, 7):
        gu = torch.randn(3, 2 * F, generator=g) * 6
        gu[0, :4] = torch.tensor([0.0, -100.0, 100.0, -1e-8])  # saturation and the sign boundary
        gate, up = gu.double().chunk(2, -1)
        ref = (torch.nn.functional.silu(gate) * up).float()
        got = native.silu_mul(gu)
        assert got.shape == (3, F) and torch.isfinite(got).all()
        assert (got - ref).abs().max() / ref.abs().max() < 1e-6
    with pytest.raises(ValueError):
        native.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError):
        native.silu_mul(torch.randn(2, 7))


def test_rope_store_equals_the_reference_rope_and_cache_write():
    from logitlab.model.transformer import apply_rope, rope_tables

    from tiny import tiny_config

    cfg = tiny_config(num_heads=4, num_kv_heads=2, head_dim=16)
    H, K, D = 4, 2, 16
    cos_t, sin_t = rope_tables(cfg, 50)
    g = torch.Generator().manual_seed(8)
    B, slots, max_pos, slot0 = 3, 5, 50, 1
    qkv = torch.randn(B, (H + 2 * K) * D, generator=g)
    pos = torch.tensor([0, 17, 49])
    k_cache, v_cache = torch.zeros(slots, K, max_pos, D), torch.zeros(slots, K, max_pos, D)
    q = native.rope_store(qkv, H, cos_t[pos].contiguous(), sin_t[pos].contiguous(), k_cache, v_cache, slot0, pos)
    heads = qkv.view(B, H + 2 * K, D)
    rotated = apply_rope(heads[:, : H + K], cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1))
    assert (q - rotated[:, :H]).abs().max() < 1e-6
    for b in range(B):
        assert (k_cache[slot0 + b, :, pos[b]] - rotated[b, H:]).abs().max() < 1e-6
        assert torch.equal(v_cache[slot0 + b, :, pos[b]], heads[b, H + K :])
    written = torch.zeros(slots, max_pos, dtype=torch.bool)
    written[slot0 + torch.arange(B), pos] = True
    assert (k_cache.abs().sum((1, 3)) > 0).eq(written).all()  # nothing else touched
    before = k_cache.clone()
    native.rope_store(qkv[:1], H, cos_t[:1].contiguous(), sin_t[:1].contiguous(), k_cache, v_cache, 0,
                      torch.tensor([max_pos]))  # out of range: no write
    assert torch.equal(k_cache, before)


def test_model_uses_pytorch_code_while_gradients_are_wanted():
    m = tiny_model()
    toks, pos = torch.tensor([[1, 2, 3]]), torch.arange(3).unsqueeze(0)
    out = m(toks, pos)
    out.sum().backward()  # the native kernels have no autograd: with grad enabled they are not used
    assert m.model.layers[0].input_layernorm.weight.grad is not None


def test_float32_matmul_equals_pytorch():
    g = torch.Generator().manual_seed(9)
    for n_in in (576, 1536, 100, 7):
        w = torch.randn(37, n_in, generator=g)
        for rows in (1, 2, 4, 6):
            x = torch.randn(rows, n_in, generator=g)
            ref = (x.double() @ w.double().T).float()
            assert (native.f32_matmul(x, w) - ref).abs().max() / ref.abs().max() < 1e-6
    with pytest.raises(ValueError):
        native.f32_matmul(torch.randn(1, 8), torch.randn(4, 8).T)  # not contiguous


@torch.inference_mode()
def test_float32_linear_layers_use_the_native_kernel_for_decode_rows(monkeypatch):
    m = tiny_model()
    calls = []
    real = native.f32_matmul
    monkeypatch.setattr(native, "f32_matmul", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    m(torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.arange(6).unsqueeze(0))  # prefill: 6 rows, F.linear
    assert calls == [1]  # only the LM head, on the last position
    calls.clear()
    lin = m.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    assert (lin(x) - torch.nn.functional.linear(x, lin.weight)).abs().max() < 1e-5 and calls == [3]


def _stable_topk(x, k, largest=True):
    """The reference order: values sorted (stable, so tied values keep id order), the first k."""
    v, i = torch.sort(x, dim=-1, descending=largest, stable=True)
    return v[:, :k], i[:, :k]


@pytest.mark.parametrize("V,k", [(49152, 1), (49152, 257), (49152, 1024), (1000, 1000), (17, 5), (300, 16)])
def test_topk_rows_equals_a_stable_sort_prefix(V, k):
    """The sampler's native top-k: the k largest values in order and, among equal values, the lowest ids,
    on continuous rows, tie-heavy rows (a few integer values) and rows with -inf entries (fewer finite
    entries than k included), the SIMD body and the scalar tail both (V not a multiple of 16)."""
    g = torch.Generator().manual_seed(V + k)
    smooth = torch.randn(3, V, generator=g) * 3
    ties = torch.randint(0, 5, (3, V), generator=g).float()
    masked = smooth.clone()
    masked[0, :] = float("-inf")
    masked[0, [3, V - 1]] = 1.0
    masked[1, torch.rand(V, generator=g) < 0.9] = float("-inf")
    for x in (smooth, ties, masked):
        v, i = native.topk_rows(x, k)
        rv, ri = _stable_topk(x, k)
        assert torch.equal(v, rv) and torch.equal(i, ri)


def test_sampling_topk_smallest_and_the_torch_fallback():
    from logitlab.sampling import processors as P

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (4, 3000), generator=g).float()
    v, i = P.topk(x, 300, largest=False)
    rv, ri = _stable_topk(x, 300, largest=False)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    big = P.topk(x, P.NATIVE_TOPK_MAX + 1)[0]  # above the native bound: torch's topk, the same values
    assert torch.equal(big, x.topk(P.NATIVE_TOPK_MAX + 1, -1).values)
    with pytest.raises(ValueError):
        native.topk_rows(x, 0)
