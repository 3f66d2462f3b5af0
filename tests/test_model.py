"""The transformer: parity with transformers' LlamaForCausalLM, cache == no cache, batch invariance."""

from __future__ import annotations

import os

import pytest
import torch

from logitlab.model.cache import KVCache

from tiny import tiny_config, tiny_model, tiny_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_llama(config, state_dict):
    """transformers' reference implementation holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.context_length,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    sd = dict(state_dict)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@torch.inference_mode()
def test_tiny_parity_with_transformers():
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    ours = tiny_model()
    ref = hf_llama(cfg, sd)
    toks = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(17).expand(2, -1)
    assert rel_err(ours(toks, pos, logits_at="all"), ref(toks).logits) < 1e-5


@torch.inference_mode()
def test_cache_prefill_then_decode_equals_full_forward():
    m = tiny_model()
    toks = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(20).unsqueeze(0)
    full = m(toks, pos, logits_at="all")
    cache = KVCache(m.config, slots=1, max_len=32)
    outs = [m(toks[:, :7], pos[:, :7], cache, logits_at="all")]
    outs += [m(toks[:, i : i + 1], pos[:, i : i + 1], cache, logits_at="all") for i in range(7, 20)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@torch.inference_mode()
def test_ragged_batch_equals_rows_alone():
    """Right-padded prompts of different lengths, prefilled together then decoded at different
    positions in one batch, give each row's unbatched logits (padding mask + causal mask)."""
    m = tiny_model()
    g = torch.Generator().manual_seed(3)
    lengths = [5, 11, 8]
    seqs = [torch.randint(0, 101, (n + 4,), generator=g) for n in lengths]
    cache = KVCache(m.config, slots=3, max_len=32)
    T = max(lengths)
    tokens = torch.zeros(3, T, dtype=torch.long)
    valid = torch.zeros(3, T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        tokens[i, :n], valid[i, :n] = s[:n], True
    batched = [m(tokens, torch.arange(T).expand(3, -1), cache, valid=valid)]
    for step in range(4):  # decode: each row at its own position
        tok = torch.stack([s[n + step] for s, n in zip(seqs, lengths, strict=True)]).unsqueeze(1)
        pos = torch.tensor([[n + step] for n in lengths])
        batched.append(m(tok, pos, cache))
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = m(s.unsqueeze(0), torch.arange(n + 4).unsqueeze(0), logits_at="all")[0]
        for step in range(5):
            assert rel_err(batched[step][i], alone[n - 1 + step]) < 1e-5


@torch.inference_mode()
def test_no_cache_padding_mask():
    m = tiny_model()
    a = torch.tensor([[5, 6, 7, 8, 9]])
    b = torch.tensor([[10, 11, 12, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = m(torch.cat([a, b]), torch.arange(5).expand(2, -1), valid=valid)
    assert rel_err(out[1], m(b[:, :3], torch.arange(3).unsqueeze(0))[0]) < 1e-5
    assert rel_err(out[0], m(a, torch.arange(5).unsqueeze(0))[0]) < 1e-5


@torch.inference_mode()
def test_early_exit_runs_only_first_layers():
    """num_layers=1 equals a one-layer model holding the same first layer, norm and LM head."""
    from logitlab.model.transformer import Transformer

    m = tiny_model()
    sd = tiny_state_dict(tiny_config())
    first = {k: v for k, v in sd.items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    one = Transformer.from_state_dict(tiny_config(num_layers=1), first)
    toks = torch.tensor([[1, 2, 3, 4]])
    pos = torch.arange(4).unsqueeze(0)
    assert rel_err(m(toks, pos, num_layers=1)[0], one(toks, pos)[0]) < 1e-5
    assert rel_err(m(toks, pos, num_layers=1)[0], m(toks, pos)[0]) > 1e-2


@torch.inference_mode()
def test_cache_reorder_and_copy_slot():
    m = tiny_model()
    cache = KVCache(m.config, slots=3, max_len=16)
    toks = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    m(toks, torch.arange(3).expand(3, -1), cache)
    before = [t.clone() for t in cache.k]
    cache.reorder(slice(0, 3), torch.tensor([2, 0, 0]), length=3)
    for b, a in zip(before, cache.k, strict=True):
        assert torch.equal(a[0, :, :3], b[2, :, :3]) and torch.equal(a[1, :, :3], b[0, :, :3])
        assert torch.equal(a[2, :, :3], b[0, :, :3])
    cache.copy_slot(0, 1, 3)
    assert all(torch.equal(t[1, :, :3], t[0, :, :3]) for t in cache.k + cache.v)


@pytest.mark.real_model
@torch.inference_mode()
def test_real_model_logits_match_transformers(real_weights, real_model):
    ref = hf_llama(real_weights.config, real_weights.state_dict)
    tok = real_weights.tokenizer
    for text in ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was a"]:
        ids = torch.tensor([tok.encode(text)])
        ours = real_model(ids, torch.arange(ids.shape[1]).unsqueeze(0), logits_at="all")
        assert rel_err(ours, ref(ids).logits) < 1e-4, text


@pytest.mark.real_model
@torch.inference_mode()
def test_real_model_greedy_64_tokens_match_transformers(real_weights, real_engine):
    from logitlab.sampling import SamplingParams

    ref = hf_llama(real_weights.config, real_weights.state_dict)
    tok = real_weights.tokenizer
    prompts = ["Yesterday I went to the gym and", "The three primary colors are", "import numpy as np\n"]
    ours = real_engine.generate(prompts, SamplingParams(max_tokens=64, min_tokens=64, temperature=0))
    for prompt, res in zip(prompts, ours, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        hf_out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                              min_new_tokens=64, pad_token_id=0,
                              eos_token_id=sorted(tok.eos_token_ids))
        assert res.choices[0].token_ids == hf_out[0, ids.shape[1]:].tolist(), prompt
