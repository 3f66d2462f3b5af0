"""The logit lens and the sequence view (``logitlab.lens``) against a hand computation of a tiny Llama: the
residual stream after every block computed here from the checkpoint's tensors (RMSNorm, rotate-half RoPE,
grouped-query causal attention, SwiGLU), read through the final norm and the tied head. Then the HTTP
routes (``/v1/logit_lens``, ``/v1/sequence_view``) and their input checks."""

from __future__ import annotations

import math

import httpx
import pytest
import scipy.stats
import torch
from server_harness import tiny_server

from logitlab import lens
from logitlab.model.transformer import Transformer

from tiny import tiny_config, tiny_state_dict

CFG = tiny_config(vocab_size=101, num_layers=3)
SD = tiny_state_dict(CFG, seed=3)
IDS = [5, 17, 99, 42, 42, 0, 63, 8]


@pytest.fixture(scope="module")
def model():
    return Transformer.from_state_dict(CFG, SD)


def _rms(x, w, eps=CFG.rms_norm_eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta=CFG.rope_theta):
    """x [T, heads, D], rotate-half convention (Hugging Face's Llama)."""
    T, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)  # [T, D/2]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    rotated = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def _hand_hidden(ids) -> list[torch.Tensor]:
    """[h_0, h_1, ..., h_L], each [T, C]: the embeddings, then the residual stream after each block."""
    H, K, D = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    T = len(ids)
    h = SD["model.embed_tokens.weight"][ids]
    out = [h]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(CFG.num_layers):
        w = {k.split(f"model.layers.{i}.", 1)[1]: v for k, v in SD.items() if k.startswith(f"model.layers.{i}.")}
        x = _rms(h, w["input_layernorm.weight"])
        q = _rope((x @ w["self_attn.q_proj.weight"].T).view(T, H, D))
        k = _rope((x @ w["self_attn.k_proj.weight"].T).view(T, K, D)).repeat_interleave(H // K, dim=1)
        v = (x @ w["self_attn.v_proj.weight"].T).view(T, K, D).repeat_interleave(H // K, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        h = h + torch.einsum("hts,shd->thd", att, v).reshape(T, H * D) @ w["self_attn.o_proj.weight"].T
        x = _rms(h, w["post_attention_layernorm.weight"])
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
        out.append(h)
    return out


def _hand_logits(h: torch.Tensor) -> torch.Tensor:
    return _rms(h, SD["model.norm.weight"]) @ SD["model.embed_tokens.weight"].T  # tied head


def test_lens_logits_match_the_hand_computation(model):
    got = lens.lens_logits(model, IDS)
    want = torch.stack([_hand_logits(h[-1]) for h in _hand_hidden(IDS)])
    assert got.shape == (CFG.num_layers + 1, CFG.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_each_layer_is_the_models_early_exit_and_the_last_its_prediction(model):
    got = lens.lens_logits(model, IDS)
    x, pos = torch.tensor([IDS]), torch.arange(len(IDS)).unsqueeze(0)
    with torch.inference_mode():
        for k in range(1, CFG.num_layers + 1):
            torch.testing.assert_close(got[k], model(x, pos, num_layers=k)[0], atol=1e-5, rtol=1e-5)
    # the hooks are gone afterwards: the model runs as before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_logit_lens_top_tokens(model):
    layers = lens.logit_lens(model, IDS, top=4)
    assert [x.layer for x in layers] == list(range(CFG.num_layers + 1))
    hand = [torch.softmax(_hand_logits(h[-1]), -1) for h in _hand_hidden(IDS)]
    final = int(hand[-1].argmax())
    for x, p in zip(layers, hand, strict=True):
        order = torch.argsort(p, descending=True)
        assert x.top_ids == order[:4].tolist()
        assert x.top_probs == pytest.approx(p[order[:4]].tolist(), abs=1e-5)
        assert x.entropy == pytest.approx(float(scipy.stats.entropy(p.double().numpy())), abs=1e-4)
        assert x.final_top_prob == pytest.approx(float(p[final]), abs=1e-5)
        assert x.final_top_rank == int((order == final).nonzero()) + 1
    assert layers[-1].top_ids[0] == final and layers[-1].final_top_rank == 1


def test_one_token_prompt(model):
    got = lens.lens_logits(model, [7])
    want = torch.stack([_hand_logits(h[-1]) for h in _hand_hidden([7])])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("start, head_rows", [(None, 256), (1, 256), (1, 3)])
def test_sequence_view_matches_the_hand_computation(model, monkeypatch, start, head_rows):
    monkeypatch.setattr(lens, "HEAD_ROWS", head_rows)  # 3: the LM head in chunks, the last one short
    stats = lens.sequence_view(model, IDS, start=start)
    seq = IDS if start is None else [start] + IDS
    logits = _hand_logits(_hand_hidden(seq)[-1])  # [T, V]: position t predicts token t + 1
    assert [s.id for s in stats] == IDS
    if start is None:  # nothing predicts the first token
        assert stats[0].logprob is None and stats[0].rank is None and stats[0].entropy is None
    scored = stats[1:] if start is None else stats
    assert len(scored) == len(seq) - 1
    lps = []
    for t, s in zip(range(1, len(seq)), scored, strict=True):
        p = torch.softmax(logits[t - 1].double(), -1)
        order = torch.argsort(p, descending=True).tolist()
        assert s.rank == order.index(seq[t]) + 1  # no ties in random logits
        assert s.logprob == pytest.approx(math.log(float(p[seq[t]])), abs=2e-4)
        assert s.entropy == pytest.approx(float(scipy.stats.entropy(p.numpy())), abs=2e-4)
        lps.append(math.log(float(p[seq[t]])))
    assert lens.perplexity(stats) == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-4)


def test_rank_buckets():
    assert [lens.rank_bucket(r) for r in (1, 2, 10, 11, 100, 101, 1000, 1001, 49152)] == [1, 10, 10, 100, 100, 1000,
                                                                                        1000, 0, 0]


@pytest.mark.parametrize("ids", [[], [101], [-1], list(range(100)) * 2])
def test_bad_token_ids(model, ids):
    with pytest.raises(ValueError, match="^prompt: "):
        lens.lens_logits(model, ids)


# ---- the HTTP routes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(real_tokenizer):
    return tiny_server(real_tokenizer)


def _post(srv, path, **body):
    return httpx.post(srv.url + path, json=body, timeout=60)


def test_logit_lens_route(srv):
    tok = srv.engine.tokenizer
    ids = tok.encode("The capital of France is")
    gen = tok.encode(" Paris, and", add_special_tokens=False)
    r = _post(srv, "/v1/logit_lens", prompt=ids, generated=gen, top=3)
    assert r.status_code == 200, r.text
    d = r.json()
    L = srv.engine.config.num_layers
    assert d["num_layers"] == L and len(d["layers"]) == L + 1 and d["context_tokens"] == len(ids) + len(gen)
    assert [x["name"] for x in d["layers"]] == ["embeddings"] + [f"block {i}" for i in range(1, L + 1)]
    assert all(len(x["top"]) == 3 for x in d["layers"])
    # the last layer is the model's own next-token prediction after prompt + generated
    want = srv.engine.next_token_logits(ids + gen).softmax(-1)
    assert d["final_top"]["id"] == int(want.argmax()) == d["layers"][-1]["top"][0]["id"]
    assert d["layers"][-1]["top"][0]["p"] == pytest.approx(float(want.max()), abs=1e-5)
    assert d["final_top"]["token"] == tok.decode([int(want.argmax())])


def test_sequence_view_route(srv):
    text = "The capital of France is Paris. 😀 It is known for the Eiffel Tower."
    r = _post(srv, "/v1/sequence_view", text=text)
    assert r.status_code == 200, r.text
    d = r.json()
    tok = srv.engine.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert [t["id"] for t in d["tokens"]] == ids
    assert "".join(t["text"] for t in d["tokens"]) == text  # UTF-8-safe pieces: the emoji is whole once
    start = d["conditioned_on"]["id"]
    assert start in (tok.bos_token_id, tok.eos_token_id) and start is not None
    # every token against the model's next-token logits after its own prefix (one forward per prefix)
    seq = [start] + ids
    for t, row in zip(range(1, len(seq)), d["tokens"], strict=True):
        p = srv.engine.next_token_logits(seq[:t]).double().softmax(-1)
        assert row["logprob"] == pytest.approx(math.log(float(p[seq[t]])), abs=2e-4)
        pt = p[seq[t]]  # rank = 1 + the tokens more likely, up to rounding (another forward, near-ties)
        assert int((p > pt * (1 + 1e-4)).sum()) + 1 <= row["rank"] <= int((p >= pt * (1 - 1e-4)).sum())
        assert row["entropy"] == pytest.approx(float(scipy.stats.entropy(p.numpy())), abs=2e-4)
        assert row["bucket"] == lens.rank_bucket(row["rank"])
        assert row["surprisal_bits"] == pytest.approx(-row["logprob"] / math.log(2))
    assert d["scored"] == len(ids) and sum(d["buckets"].values()) == len(ids)
    # the perplexity `logitlab score` reports for the same text
    assert d["perplexity"] == pytest.approx(srv.engine.score(text).perplexity, rel=1e-4)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/logit_lens", {"prompt": "hi", "top": 0}, "top"),
    ("/v1/logit_lens", {"prompt": "hi", "top": 21}, "top"),
    ("/v1/logit_lens", {"prompt": "hi", "top": "5"}, "top"),
    ("/v1/logit_lens", {"prompt": "hi", "generated": [10**9]}, "generated"),
    ("/v1/logit_lens", {"prompt": []}, "prompt"),
    ("/v1/logit_lens", {"prompt": [-3]}, "prompt"),
    ("/v1/logit_lens", {"prompt": "hi", "layers": 2}, "layers"),
    ("/v1/logit_lens", {}, "prompt"),
    ("/v1/logit_lens", {"prompt": "hi", "model": "nope"}, "model"),
    ("/v1/logit_lens", {"prompt": list(range(300))}, "prompt"),
    ("/v1/sequence_view", {"text": ""}, "text"),
    ("/v1/sequence_view", {"text": []}, "text"),
    ("/v1/sequence_view", {"text": [49152]}, "text"),
    ("/v1/sequence_view", {"text": "word " * 300}, "text"),
    ("/v1/sequence_view", {"text": 5}, "text"),
    ("/v1/sequence_view", {"text": "hello there", "top": 3}, "top"),
])
def test_routes_reject_bad_input(srv, path, body, param):
    r = _post(srv, path, **body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
