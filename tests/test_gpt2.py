"""The GPT-2 architecture as configuration of the one Transformer: parity with transformers'
GPT2LMHeadModel (logits and loss), the checkpoint layout both ways, and every decoding path on it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from logitlab.engine import Engine
from logitlab.model.cache import KVCache
from logitlab.model.config import ModelConfig
from logitlab.model.quant import quantize_int8
from logitlab.model.transformer import Transformer
from logitlab.sampling import SamplingParams
from logitlab.weights import load_weights
from logitlab.weights.gpt2 import hf_gpt2_to_ours, ours_to_hf_gpt2, save_gpt2_dir
from logitlab.weights.hf_loader import load_hf_dir

transformers = pytest.importorskip("transformers")

V, C, L, H, P = 257, 64, 3, 4, 96


def _byte_tokenizer_files(path):
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>) as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from logitlab.tokenizer import byte_to_unicode

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "bos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 saved by transformers itself (Conv1D weights, safetensors)."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=256, eos_token_id=256)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # weights large enough that a wrong GELU form, norm or bias shows in the logits
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    hf.save_pretrained(path, safe_serialization=True)
    _byte_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ours(hf_dir):
    config, state = load_hf_dir(hf_dir)
    return Transformer.from_state_dict(config, state)


def test_config_from_checkpoint(ours):
    c = ours.config
    assert (c.architecture, c.norm, c.position, c.mlp, c.bias) == ("gpt2", "layernorm", "learned", "gelu_tanh", True)
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.context_length) == (V, C, L, H, P)


def test_logits_and_loss_equal_transformers(hf_model, ours):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 40), generator=g)
    with torch.no_grad():
        ref = hf_model(tokens, labels=tokens)
        got = ours(tokens, torch.arange(40).expand(3, 40), logits_at="all")
    assert (got - ref.logits).abs().max() < 1e-4
    loss = F.cross_entropy(got[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - ref.loss.item()) < 1e-5


def test_padded_batch_equals_rows_alone(hf_model, ours):
    """Right-padded ragged rows (padding mask + causal mask) give each row's logits alone."""
    g = torch.Generator().manual_seed(2)
    lens = [17, 9, 30]
    tokens = torch.randint(0, V, (3, 30), generator=g)
    valid = torch.arange(30) < torch.tensor(lens)[:, None]
    with torch.no_grad():
        batch = ours(tokens, torch.arange(30).expand(3, 30), valid=valid, logits_at="all")
        for i, n in enumerate(lens):
            alone = hf_model(tokens[i : i + 1, :n]).logits[0]
            assert (batch[i, :n] - alone).abs().max() < 1e-4


def test_kv_cache_decode_equals_full_forward(ours):
    """Prefill + one-token decode steps through the cache (learned positions at each step) equal the
    no-cache forward over the whole sequence."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (2, 24), generator=g)
    cache = KVCache(ours.config, slots=2, max_len=64)
    with torch.no_grad():
        full = ours(tokens, torch.arange(24).expand(2, 24), logits_at="all")
        steps = [ours(tokens[:, :10], torch.arange(10).expand(2, 10), cache=cache, logits_at="all")]
        for t in range(10, 24):
            steps.append(ours(tokens[:, t : t + 1], torch.full((2, 1), t), cache=cache, logits_at="all"))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_state_dict_round_trip_is_exact(hf_dir, ours):
    from safetensors.torch import load_file

    theirs = load_file(str(hf_dir / "model.safetensors"))
    back = ours_to_hf_gpt2(ours.state_dict(), ours.config)
    assert set(back) == {k for k in theirs if k != "lm_head.weight"}
    for k, v in back.items():
        assert torch.equal(v, theirs[k]), k
    again = hf_gpt2_to_ours(back, ours.config)
    for k, v in again.items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_saved_by_us_loads_in_transformers(tmp_path, hf_model, ours):
    save_gpt2_dir(ours, tmp_path, extra={"direction": "forward"}, eos_token_id=256)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (reloaded(tokens).logits - hf_model(tokens).logits).abs().max() < 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["logitlab"]["direction"] == "forward"


def test_checkpoint_errors(tmp_path, hf_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_layer"] = L + 1  # the file has fewer layers than the config says
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^model: GPT-2 checkpoint does not match"):
        load_hf_dir(bad)
    cfg.update(n_layer=L, activation_function="relu")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^model: GPT-2 activation 'relu'"):
        load_hf_dir(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^model: .*config.json is not readable JSON"):
        load_hf_dir(bad)


def _gpt2_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=C, intermediate_size=4 * C, num_layers=2, num_heads=H, num_kv_heads=H,
                head_dim=C // H, context_length=P, architecture="gpt2", norm="layernorm", position="learned",
                mlp="gelu_tanh", bias=True)
    return ModelConfig(**{**base, **kw})


def _init(model: Transformer, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_post_norm_block_is_norm_of_residual_sum():
    """norm_placement="post": a = LN(h + Attn(h)), h' = LN(a + MLP(a)) (the original Transformer)."""
    model = _init(Transformer(_gpt2_config(norm_placement="post")))
    pre = _init(Transformer(_gpt2_config()))
    pre.load_state_dict(model.state_dict())
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        out = model(tokens, pos, logits_at="none")
        h = model.model.embed_tokens(tokens) + model.model.embed_positions(pos)
        step_model = pre  # same weights; run its sublayers by hand in post-norm order
        from logitlab.model.transformer import Step

        mask = (pos.unsqueeze(1) <= pos.unsqueeze(2)).unsqueeze(1)
        step = Step(None, None, pos, 12, mask, 1, None, causal=True)
        x = h.reshape(24, C)
        for blk in step_model.model.layers:
            x = blk.input_layernorm(x + blk.self_attn(x, step, None))
            x = blk.post_attention_layernorm(x + blk.mlp(x))
        ref = step_model.model.norm(x).view(2, 12, C)
        assert (out - ref).abs().max() < 1e-5
        assert (pre(tokens, pos, logits_at="none") - ref).abs().max() > 1e-2  # pre-norm is a different model


def test_gradients_flow_through_every_parameter():
    model = _init(Transformer(_gpt2_config())).train()
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(6))
    logits = model(tokens, torch.arange(16).expand(2, 16), logits_at="all")
    F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_int8_gpt2_keeps_biases(ours):
    from logitlab.model.quant import Int8Linear

    q = quantize_int8(Transformer.from_state_dict(ours.config, ours.state_dict()))
    layer = q.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, Int8Linear)
    assert torch.equal(layer.bias, ours.model.layers[0].self_attn.qkv_proj.bias)
    tokens = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(20).expand(1, 20)
    with torch.no_grad():
        a, b = ours(tokens, pos, logits_at="all"), q(tokens, pos, logits_at="all")
        for m in q.modules():
            if isinstance(m, Int8Linear) and m.bias is not None:
                m.bias.zero_()
        no_bias = q(tokens, pos, logits_at="all")
    quant_err, bias_effect = (a - b).abs().mean(), (a - no_bias).abs().mean()
    assert quant_err < 0.2 * bias_effect
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@pytest.fixture(scope="module")
def engine(hf_dir):
    return Engine.load(str(hf_dir))


def test_engine_loads_the_directory_and_greedy_matches_transformers(hf_dir, engine, hf_model):
    w = load_weights(str(hf_dir))
    assert w.config.architecture == "gpt2" and w.tokenizer.eos_token_id == 256
    assert engine.config.architecture == "gpt2"
    prompt = list(b"Once upon a time")
    out = engine.generate([prompt], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=256,
                                eos_token_id=None)
    assert out[0].choices[0].token_ids == ref[0, len(prompt):].tolist()


def test_every_decoding_driver_runs_on_gpt2(engine):
    from logitlab.decoding.modes import DriverOptions, generate_with_driver

    prompt = "Hello"
    greedy = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    greedy_ids = greedy.choices[0].token_ids
    spec, _ = generate_with_driver(engine, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                   DriverOptions(speculative="early-exit:1"))
    assert spec.choices[0].token_ids == greedy_ids  # greedy speculative decoding is exact
    beam, _ = generate_with_driver(engine, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                   DriverOptions(beam_width=3))
    assert len(beam.choices[0].token_ids) == 6
    con, _ = generate_with_driver(engine, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                  DriverOptions(contrastive_amateur="early-exit:1"))
    assert len(con.choices[0].token_ids) == 6
    choice, extra = generate_with_driver(engine, prompt, SamplingParams(max_tokens=6, temperature=0),
                                         DriverOptions(choice=["yes", "no"]))
    assert choice.choices[0].text in ("yes", "no")
    seeded = [engine.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=s))[0] for s in (1, 1)]
    assert seeded[0].choices[0].token_ids == seeded[1].choices[0].token_ids
    s = engine.score(" world", context="Hello")
    assert len(s.token_logprobs) == len(" world") and all(lp < 0 for lp in s.token_logprobs)


def test_server_serves_gpt2(engine):
    import httpx
    from server_harness import LiveServer

    from logitlab.server.app import create_app

    server = LiveServer(create_app(engine))
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "Hi", "max_tokens": 5, "temperature": 0, "logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"][0]["logprobs"]["tokens"]) == body["usage"]["completion_tokens"] > 0
    finally:
        server.stop()
