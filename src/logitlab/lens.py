"""Reading a model's predictions: the logit lens (layer by layer) and the per-token view of a text (GLTR).

    from logitlab.lens import logit_lens, sequence_view
    layers = logit_lens(engine.model, engine.encode_prompt("The capital of France is"), top=5)
    layers[-1].top_ids[0]            # the model's own next-token prediction
    tokens = sequence_view(engine.model, engine.tokenizer.encode("Paris is the capital of France."))

**Logit lens** (nostalgebraist, 2020): the residual stream after block ``l`` read as if it were the last
one, ``p_l = softmax(lm_head(norm(h_l)))`` at the last position. ``l = 0`` is the embedding (plus learned
positions), ``l = L`` the model's own prediction. The blocks are the model's own modules
(``model.model.layers``), run inside the model's one ``forward``; a hook keeps each block's output, and
the model's own final norm and LM head (``model.model.norm``, ``model.lm_head``) read it. Nothing of
the transformer is re-implemented here.

**Sequence view** (GLTR, Gehrmann et al. 2019): one forward over the whole text gives, for every token,
its log-probability given the tokens before it, its rank in that predictive distribution (1 = the model's
top choice) and the distribution's entropy; the text's perplexity is ``exp(-mean logprob)``. As in
``Engine.score``, a text is conditioned on a start token (BOS, else EOS) so that its first token is
predicted too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# GLTR's buckets: the rank of a token in the model's predictive distribution (the last one is open)
RANK_BUCKETS = (1, 10, 100, 1000)
HEAD_ROWS = 256  # positions per LM-head call in sequence_view


@dataclass
class LensLayer:
    """The next-token prediction read after one layer."""

    layer: int  # 0: the embeddings; l: after block l (l = num_layers: the model's own output)
    top_ids: list[int]
    top_probs: list[float]
    entropy: float  # nats
    final_top_prob: float  # probability of the model's final top-1 token, read at this layer
    final_top_rank: int  # its rank here (1 = this layer's top-1)


def _check_ids(model, token_ids) -> list[int]:
    ids = [int(t) for t in token_ids]
    V = model.config.vocab_size
    if not ids or any(not 0 <= t < V for t in ids):
        raise ValueError(f"prompt: must be a non-empty list of token ids in [0, {V})")
    if len(ids) > model.config.context_length:
        raise ValueError(f"prompt: has {len(ids)} tokens; the context holds {model.config.context_length}")
    return ids


@torch.inference_mode()
def lens_logits(model, token_ids) -> torch.Tensor:
    """float32 [num_layers + 1, V]: row ``l`` = ``lm_head(norm(h_l))`` at the last position of
    ``token_ids``, ``h_0`` the embeddings and ``h_l`` the residual stream after block ``l``; the last row
    is the model's own logits.

    The hooks live on the model only during this call; do not run the same model from another thread
    meanwhile (the server runs every model call on its one runner thread)."""
    ids = _check_ids(model, token_ids)
    T = len(ids)
    layers = model.model.layers
    last: list[torch.Tensor] = []  # the last position's hidden state, [C], in layer order

    def keep_input(_module, args):  # blocks see h as [B*T, C]; B = 1 here
        last.append(args[0].reshape(T, -1)[-1])

    def keep_output(_module, _args, out):
        last.append(out.reshape(T, -1)[-1])

    hooks = [layers[0].register_forward_pre_hook(keep_input)]
    hooks += [layer.register_forward_hook(keep_output) for layer in layers]
    try:
        model(torch.tensor([ids]), torch.arange(T).unsqueeze(0), logits_at="none")
    finally:
        for h in hooks:
            h.remove()
    h = torch.stack(last)  # [L + 1, C]
    return model.lm_head(model.model.norm(h)).float()


def logit_lens(model, token_ids, top: int = 5) -> list[LensLayer]:
    """The top ``top`` next tokens (and their probabilities) after each layer; see ``lens_logits``."""
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top: must be a positive integer, got {top!r}")
    logp = torch.log_softmax(lens_logits(model, token_ids), -1)  # [L + 1, V]
    p = logp.exp()
    top = min(top, p.shape[-1])
    vals, idx = p.topk(top, -1)
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)
    final = int(p[-1].argmax())
    final_p = p[:, final]
    final_rank = (p > final_p.unsqueeze(-1)).sum(-1) + 1
    return [LensLayer(layer=i, top_ids=idx[i].tolist(), top_probs=vals[i].tolist(), entropy=float(entropy[i]),
                      final_top_prob=float(final_p[i]), final_top_rank=int(final_rank[i]))
            for i in range(p.shape[0])]


@dataclass
class TokenStat:
    """One token of a text, as the model predicted it from the tokens before it."""

    id: int
    logprob: float | None  # None for the first token: nothing predicts it
    rank: int | None  # 1 + the number of tokens the model found strictly more likely
    entropy: float | None  # of the predictive distribution at this position, nats


def rank_bucket(rank: int) -> int:
    """GLTR's bucket: 1, 10, 100 or 1000 (the smallest that holds ``rank``), 0 beyond the last."""
    return next((b for b in RANK_BUCKETS if rank <= b), 0)


@torch.inference_mode()
def sequence_view(model, token_ids, start: int | None = None) -> list[TokenStat]:
    """Every token of ``token_ids`` with its log-probability, rank and the entropy of the distribution
    it was drawn from, in one batched forward. ``start``: a token the text is conditioned on (not listed;
    ``Engine.score``'s BOS or EOS), so the first token is predicted too; without it the first has none."""
    ids = _check_ids(model, ([] if start is None else [start]) + [int(t) for t in token_ids])
    T = len(ids)
    # one forward through the blocks; the LM head then runs on HEAD_ROWS positions at a time, so a long
    # text never holds a [T, V] float32 tensor (2048 x 49152 would be 400 MB, and its log-softmax again)
    hidden = model(torch.tensor([ids]), torch.arange(T).unsqueeze(0), logits_at="none")[0, :-1]  # normed, [T-1, C]
    target = torch.tensor(ids[1:])
    lp, rank, entropy = [], [], []
    for lo in range(0, T - 1, HEAD_ROWS):
        logp = torch.log_softmax(model.lm_head(hidden[lo: lo + HEAD_ROWS]).float(), -1)  # [rows, V]
        tok_lp = logp.gather(-1, target[lo: lo + HEAD_ROWS].unsqueeze(-1))
        lp += tok_lp.squeeze(-1).tolist()
        rank += ((logp > tok_lp).sum(-1) + 1).tolist()
        entropy += (-(logp.exp() * logp).nan_to_num(0.0).sum(-1)).tolist()
    out = [] if start is not None else [TokenStat(ids[0], None, None, None)]
    out += [TokenStat(t, a, r, e) for t, a, r, e in zip(ids[1:], lp, rank, entropy, strict=True)]
    return out


def perplexity(tokens: list[TokenStat]) -> float | None:
    """exp(-mean logprob) over the tokens that have one (None when none has)."""
    lps = [t.logprob for t in tokens if t.logprob is not None]
    return math.exp(-sum(lps) / len(lps)) if lps else None
