"""The fused decode step (model/step.c, one native call for all layers) against the per-op path it
replaces, which is itself tested against plain PyTorch: same logits, same keys and values written."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from logitlab.model import decode_step, native
from logitlab.model.paged_cache import PagedKVCache
from logitlab.model.quant import quantize_int8

from tiny import tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels")


def _prefilled(model, lengths, block_size=4):
    """A paged cache holding prompts of the given lengths (through the per-op prefill)."""
    cache = PagedKVCache(model.config, capacity=64, block_size=block_size)
    g = torch.Generator().manual_seed(1)
    tables = []
    with torch.inference_mode():
        for n in lengths:
            table = []
            for p in range(n + 1):  # the decode position too
                cache.ensure_writable(table, p)
            toks = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            model(toks, torch.arange(n).unsqueeze(0), cache, block_tables=PagedKVCache.table_tensor([table]))
            tables.append(table)
    return cache, tables


def _step(model, cache, tables, lengths, tokens, valid=None, fused=True):
    cache = copy.deepcopy(cache)
    tok = torch.tensor(tokens).unsqueeze(1)
    pos = torch.tensor(lengths).unsqueeze(1)
    with torch.inference_mode():
        if fused:
            assert decode_step.for_model(model) is not None
            out = model(tok, pos, cache, block_tables=PagedKVCache.table_tensor(tables), valid=valid)
        else:
            with decode_step.disabled():
                out = model(tok, pos, cache, block_tables=PagedKVCache.table_tensor(tables), valid=valid)
    return out, cache.pool


@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("lengths", [[5], [3, 9], [1, 4, 8], [7, 2, 12, 16]])
def test_fused_step_equals_the_per_op_path(kind, lengths):
    model = tiny_model(num_layers=2)
    if kind == "int8":
        quantize_int8(model)
    cache, tables = _prefilled(model, lengths)
    tokens = [(7 * i + 3) % model.config.vocab_size for i in range(len(lengths))]
    fused, pool_f = _step(model, cache, tables, lengths, tokens, fused=True)
    ref, pool_r = _step(model, cache, tables, lengths, tokens, fused=False)
    assert fused.shape == ref.shape == (len(lengths), model.config.vocab_size)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool_f, pool_r, rtol=1e-5, atol=1e-5)  # the same keys/values written
    assert fused.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_fused_step_padding_row_writes_nothing_to_real_blocks():
    model = tiny_model(num_layers=2)
    cache, tables = _prefilled(model, [6, 3])
    valid = torch.tensor([[True], [False]])
    fused, pool_f = _step(model, cache, tables, [6, 3], [5, 9], valid=valid, fused=True)
    ref, pool_r = _step(model, cache, tables, [6, 3], [5, 9], valid=valid, fused=False)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-4, atol=1e-4)
    real = [b for t in tables for b in t]  # every block but scratch (0) is identical
    torch.testing.assert_close(pool_f[:, :, real], pool_r[:, :, real], rtol=1e-5, atol=1e-5)


def test_fused_step_is_used_only_where_it_applies():
    model = tiny_model(num_layers=2)
    assert decode_step.for_model(model) is not None
    for change in ({"norm_placement": "post"}, {"mlp": "gelu"}):  # not the plain Llama shape
        other = tiny_model(num_layers=2)
        other.config = dataclasses.replace(other.config, **change)
        assert decode_step.for_model(other) is None
    bf16 = tiny_model(num_layers=2).to(torch.bfloat16)
    assert decode_step.for_model(bf16) is None
    with decode_step.disabled():
        assert decode_step.for_model(model) is None


def test_replaced_weights_are_bound_again():
    model = tiny_model(num_layers=2)
    cache, tables = _prefilled(model, [4])
    before, _ = _step(model, cache, tables, [4], [3])
    other = tiny_model(seed=5, num_layers=2)
    model.load_state_dict(other.state_dict(), assign=True)
    after, _ = _step(model, cache, tables, [4], [3])
    ref, _ = _step(model, cache, tables, [4], [3], fused=False)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)


def test_bad_block_table_is_refused_not_read():
    model = tiny_model(num_layers=2)
    cache, tables = _prefilled(model, [4])
    with pytest.raises(ValueError, match="outside the pool"):
        _step(model, cache, [[10_000]], [4], [3])


def test_a_copied_model_binds_its_own_weights():
    model = tiny_model(num_layers=2)
    cache, tables = _prefilled(model, [4])
    _step(model, cache, tables, [4], [3])  # bound
    twin = copy.deepcopy(model)
    assert "_fused_decode" not in twin.__dict__
    with torch.no_grad():
        twin.model.norm.weight.mul_(2.0)  # the copy's own memory: the original must not change
    a, _ = _step(model, cache, tables, [4], [3])
    b, _ = _step(twin, cache, tables, [4], [3])
    ref, _ = _step(model, cache, tables, [4], [3], fused=False)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, b)


def _block_model():
    """The tiny model with every matrix in GGUF Q8_0 blocks (``--dtype gguf``'s modules)."""
    from logitlab.model import qblocks
    from logitlab.model.gguf_model import BlockEmbedding, BlockLinear

    model = tiny_model(num_layers=2)
    with torch.no_grad():
        for blk in model.model.layers:
            for parent, name in ((blk.self_attn, "qkv_proj"), (blk.self_attn, "o_proj"), (blk.mlp, "gate_up_proj"),
                                 (blk.mlp, "down_proj")):
                setattr(parent, name, BlockLinear([qblocks.from_float(getattr(parent, name).weight.detach())]))
        emb = BlockEmbedding(qblocks.from_float(model.model.embed_tokens.weight.detach()))
        model.model.embed_tokens, model.lm_head = emb, BlockLinear([emb.table])
    return model


@pytest.mark.parametrize("lengths", [[5], [3, 9, 1], [2 + i % 7 for i in range(6)]])
def test_fused_block_step_equals_the_per_op_block_path(lengths):
    model = _block_model()
    cache, tables = _prefilled(model, lengths)
    tokens = [(5 * i + 1) % model.config.vocab_size for i in range(len(lengths))]
    fused, pool_f = _step(model, cache, tables, lengths, tokens, fused=True)
    ref, pool_r = _step(model, cache, tables, lengths, tokens, fused=False)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool_f, pool_r, rtol=1e-5, atol=1e-5)


def test_fused_block_step_rows_are_batch_invariant():
    """Up to 32 rows in one step (activations quantized per row): each row's logits equal its own
    one-row step's, to float32 summation order."""
    model = _block_model()
    lengths = [1 + i % 11 for i in range(20)]
    cache, tables = _prefilled(model, lengths)
    tokens = [(3 * i + 2) % model.config.vocab_size for i in range(len(lengths))]
    assert decode_step.for_model(model, 20) is not None and decode_step.for_model(model, 33) is None
    together, _ = _step(model, cache, tables, lengths, tokens)
    for i in (0, 7, 19):
        alone, _ = _step(model, cache, [tables[i]], [lengths[i]], [tokens[i]])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)
