"""A decoder-only transformer, written to read like the math. One family, configured (``ModelConfig``):

    h_0     = E[x]  (+ P[pos] with learned positions)   token (and absolute position) embedding
    a_l     = h_l + Attn(Norm(h_l))                    pre-norm, residual
    h_{l+1} = a_l + MLP(Norm(a_l))                     MLP(x) = W_down (silu(W_gate x) * W_up x)   (SwiGLU)
                                                              or W_down gelu(W_up x + b) + b        (GELU)
    logits  = Norm(h_L) E^T                            tied (or separate) LM head

Llama: RMSNorm, RoPE, SwiGLU, no biases. GPT-2: LayerNorm with bias, learned positions, GELU, biases.
``norm_placement="post"`` is the original Transformer's ``a_l = Norm(h_l + Attn(h_l))`` (seed 004 compares
the two); the final norm stays, so both placements share one checkpoint layout.

Attention is grouped-query (``num_kv_heads`` key/value heads shared by ``num_heads`` query heads), with
rotary position embeddings (rotate-half convention, as Hugging Face stores Llama weights) or none (learned
absolute positions enter at the embedding), and 1/sqrt(d) scaling. Prefill and one-token decode are the
same ``forward``: tokens ``[B, T]`` at explicit ``positions [B, T]``. With a cache, new keys/values are
written in place at those positions and the queries attend to the filled part of the cache; without one,
they attend to the given tokens only.

Shapes: B batch, T new tokens, L attended keys, H query heads, K kv heads, D head_dim, C hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_graph, decode_step, native
from .cache import KVCache
from .config import ModelConfig
from .paged_cache import SCRATCH, PagedKVCache


def _native_ok(x: torch.Tensor) -> bool:
    """The native kernels (model/kernels.c) compute on CPU tensors without autograd: inference only. Where
    they cannot be built, on another device (``x``'s), or while gradients are wanted, the PyTorch code below
    runs (and is the reference they are tested against)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and native.available()


class Linear(nn.Linear):
    """nn.Linear whose decode-sized products (at most 4 rows, float32, inference) stream the weights
    once in the native kernel, ~2x PyTorch's one-row F.linear here; F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dim() == 2 and x.shape[0] <= 4 and x.dtype == torch.float32 and w.dtype == torch.float32
                and w.is_contiguous() and _native_ok(x)):
            y = native.f32_matmul(x.contiguous(), w)
            return y if self.bias is None else y.add_(self.bias)
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if x.dim() == 2 and _native_ok(x) and x.is_contiguous():  # one pass, no op overhead
                return native.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # Normalise in float32 whatever the weight dtype (as the reference does), then scale.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with bias (GPT-2); in float32 whatever the weight dtype, as RMSNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables of shape [length, D] for positions 0..length-1.

    Rotate-half RoPE turns the pair (x_i, x_{i+D/2}) by the angle of frequency i:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``. Rolling x by D/2 gives
    ``(x2, x1)``, so with the first half of the sin table negated, RoPE is ``x * cos + roll(x) * sin``:
    two tables, four cheap ops, no slicing or concatenation per layer."""
    d = config.head_dim
    # Always on the CPU, even while a model is being built on the meta device (the first arange on meta
    # costs seconds of one-time set-up, and these tables are small).
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)  # [length, D/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] with cos/signed_sin broadcastable to it (see ``rope_tables``)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Step:
    """What every layer of one forward call shares, computed once per call rather than once per layer.

    cos, sin [B, T, 1, D]; positions [B, T] (padding moved to the cache's scratch position);
    key_len: keys attended (the filled part of the cache); mask [B, 1, T, L] bool (True = may attend);
    bias [B, 1, G*T, L]: the same mask as 0 / -inf, repeated for the G query heads of a kv head (the
    small-matmul attention path); rows: the cache slots; batch_idx [B, 1]; native_lens [B]: keys per row
    when the native decode-attention kernel runs (one new float32 token per row against the cache), else
    None. Paged cache: tables [B, W] block ids, write_blocks / write_offsets [B, T] where each new token's
    key and value go (padding: the scratch block)."""

    tables = write_blocks = write_offsets = None

    def __init__(self, cos, sin, positions, key_len, mask, groups, rows, native_decode=False, causal=False):
        self.cos, self.sin, self.positions, self.key_len = cos, sin, positions, key_len
        self.mask, self.rows = mask, rows
        self.batch_idx = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        self.small = positions.shape[1] <= 16
        self.causal = causal  # no cache, no padding: the fused kernel's own causal mask (training)
        self.native_lens = None
        if native_decode:  # padding rows sit at the scratch position: they read every key; harmless
            self.native_lens = (positions[:, 0].clamp(max=key_len - 1) + 1).contiguous()
        elif self.small:
            self.bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            self.bias.masked_fill_(~mask, float("-inf"))
            self.bias = self.bias.repeat(1, 1, groups, 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with grouped-query heads: q [B, T, H, D], k/v [B, K, L, D]
    -> [B, T, H * D].

    For a few query tokens (decode, speculative verification) two small matmuls beat the fused CPU
    kernel, whose per-call set-up dominates at q_len = 1; the G = H/K query heads that share a kv head
    are folded into the query-length axis so no key/value is ever copied per head. Long prefills use
    the fused kernel."""
    B, T, H, D = q.shape
    K = k.shape[1]
    if step.causal:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=K != H)
        return out.transpose(1, 2).reshape(B, T, H * D)
    if not step.small:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=step.mask, enable_gqa=K != H)
        return out.transpose(1, 2).reshape(B, T, H * D)
    G = H // K
    # heads h = kv * G + g; (g, t) fold into one axis, in the order step.bias was repeated in
    qg = q.view(B, T, K, G, D).permute(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    scores = torch.add(step.bias, qg @ k.transpose(-1, -2), alpha=D**-0.5)  # [B, K, G*T, L]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = probs @ v  # [B, K, G*T, D]
    return out.view(B, K, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
        self.rope = config.position == "rope"
        # W_q, W_k, W_v stacked into one matrix: one matmul instead of three per layer (decode is a
        # matrix-vector product per weight, so fewer, larger calls waste less time between them).
        self.qkv_proj = Linear(c, (h + 2 * k) * d, bias=config.bias)
        self.o_proj = Linear(h * d, c, bias=config.bias)

    def forward(self, x: torch.Tensor, step: Step, layer_cache) -> torch.Tensor:
        """x [B*T, C] -> [B*T, C]."""
        B, T = step.positions.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if step.native_lens is not None and step.tables is not None:  # paged decode in native kernels
            k_pool, v_pool = layer_cache
            q = native.rope_store_paged(qkv, H, step.cos.view(B, D), step.sin.view(B, D), k_pool, v_pool,
                                        step.write_blocks.view(B), step.write_offsets.view(B), check=False)
            return self.o_proj(native.attend_paged(q, k_pool, v_pool, step.tables, step.native_lens, check=False))
        if step.native_lens is not None:  # decode: RoPE, cache write and attention in native kernels
            k_cache, v_cache = layer_cache
            q = native.rope_store(qkv, H, step.cos.view(B, D), step.sin.view(B, D), k_cache, v_cache,
                                  step.rows.start, step.positions.view(B))
            return self.o_proj(native.attend_decode(q, k_cache, v_cache, step.rows.start, step.native_lens))
        qk = qkv[:, : (H + K) * D].view(B, T, H + K, D)
        if self.rope:  # RoPE on queries and keys together: one [B, T, H + K, D] tensor
            qk = apply_rope(qk, step.cos, step.sin)
        q, k = qk[:, :, :H], qk[:, :, H:]  # [B, T, H, D], [B, T, K, D]
        v = qkv[:, (H + K) * D :].view(B, T, K, D)
        if layer_cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # attend to the given tokens only
        elif step.tables is not None:  # paged: write each token into its block, read the row's blocks in order
            k_pool, v_pool = layer_cache
            k_pool[step.write_blocks, :, step.write_offsets] = k.to(k_pool.dtype)  # indexed shape [B, T, K, D]
            v_pool[step.write_blocks, :, step.write_offsets] = v.to(v_pool.dtype)
            bs = k_pool.shape[2]
            nb = -(-step.key_len // bs)
            keys, values = (p[step.tables[:, :nb]].transpose(1, 2).reshape(B, K, nb * bs, D)[:, :, : step.key_len]
                            for p in (k_pool, v_pool))  # [B, nb, K, bs, D] -> [B, K, L, D]
        else:
            k_cache, v_cache = layer_cache
            kc, vc = k_cache[step.rows], v_cache[step.rows]  # views [B, K, max_len + 1, D]
            kc[step.batch_idx, :, step.positions] = k.to(kc.dtype)  # indexed shape [B, T, K, D]
            vc[step.batch_idx, :, step.positions] = v.to(vc.dtype)
            keys, values = kc[:, :, : step.key_len], vc[:, :, : step.key_len]  # only the filled part
        out = attend(q, keys.to(q.dtype), values.to(q.dtype), step)  # [B, T, H*D]
        return self.o_proj(out.view(B * T, H * D))


class MLP(nn.Module):
    """SwiGLU (``gate_up_proj``: W_gate and W_up stacked, one matmul) or GELU (``up_proj``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, f = config.hidden_size, config.intermediate_size
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_up_proj = Linear(c, 2 * f, bias=config.bias)
        else:
            self.up_proj = Linear(c, f, bias=config.bias)
        self.down_proj = Linear(f, c, bias=config.bias)

    def forward(self, x):
        if self.kind != "swiglu":
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))
        gate_up = self.gate_up_proj(x)
        if gate_up.dtype == torch.float32 and gate_up.dim() == 2 and _native_ok(gate_up):
            return self.down_proj(native.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, step: Step, layer_cache) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.self_attn(self.input_layernorm(h), step, layer_cache)
            return h + self.mlp(self.post_attention_layernorm(h))
        h = self.input_layernorm(h + self.self_attn(h, step, layer_cache))
        return self.post_attention_layernorm(h + self.mlp(h))


def _plan(positions: torch.Tensor, valid: torch.Tensor, cache) -> tuple[int, bool]:
    """What ``forward`` reads as Python values, from its inputs before they move: the number of keys
    attended (with a cache: the last valid position + 1; without: T) and whether the fused causal kernel
    applies (no cache, no padding, contiguous positions)."""
    T = positions.shape[1]
    key_len = int(positions.masked_fill(~valid, -1).max()) + 1 if cache is not None else T
    causal = cache is None and bool(valid.all()) and T > 1
    causal = causal and bool((positions[:, 1:] - positions[:, :-1] == 1).all())
    return key_len, causal


def fuse_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours: stack q/k/v into qkv_proj and gate/up into gate_up_proj."""
    sd = dict(state_dict)
    for i in range(num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if a + "q_proj.weight" in sd:
            sd[a + "qkv_proj.weight"] = torch.cat([sd.pop(a + n + "_proj.weight") for n in "qkv"])
        if m + "gate_proj.weight" in sd:
            sd[m + "gate_up_proj.weight"] = torch.cat([sd.pop(m + "gate_proj.weight"), sd.pop(m + "up_proj.weight")])
    return sd


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's Llama (``model.layers.0.self_attn.o_proj.weight`` ...), except
    that q/k/v and gate/up are stacked (``qkv_proj``, ``gate_up_proj``); ``from_state_dict`` takes a
    state dict in Hugging Face names from any of our loaders and stacks them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        # Given storage, the table skips its random init (weights always come from a checkpoint, and a
        # normal_() on the meta device costs seconds of one-time set-up).
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                               _weight=torch.empty(config.vocab_size, config.hidden_size))
        if config.position == "learned":
            self.model.embed_positions = nn.Embedding(
                config.context_length, config.hidden_size,
                _weight=torch.empty(config.context_length, config.hidden_size))
        self.model.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.model.norm = make_norm(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_rope_tables()

    def set_rope_tables(self) -> None:
        """(Re)build the RoPE tables (not saved with the weights); +1 row: the cache's scratch position."""
        cos, sin = rope_tables(self.config, self.config.context_length + 1) if self.config.position == "rope" \
            else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32):
        with torch.device("meta"):
            model = cls(config)
        sd = fuse_state_dict(state_dict, config.num_layers)
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.set_rope_tables()
        return model.to(dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the final norm's (block-quantized embeddings have no float weight)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights are (the final norm's): forward moves inputs made elsewhere here."""
        return self.model.norm.weight.device

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_fused_decode", None)  # .to() and friends may replace weights: bind again
        self.__dict__.pop("_cuda_graphs", None)  # (captured graphs hold the old weights' addresses)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_fused_decode", None)  # raw pointers (ctypes): a copy binds its own weights on use
        state.pop("_cuda_graphs", None)  # device addresses: a copy captures its own graphs
        state.pop("_gguf_draft", None)  # a model of its own (speculative.gguf_copy): a copy makes its own
        return state

    def load_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_fused_decode", None)  # assign=True replaces weight tensors: bind again
        self.__dict__.pop("_cuda_graphs", None)
        return super().load_state_dict(*args, **kwargs)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        rows: slice | None = None,
        valid: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
        num_layers: int | None = None,
        block_tables: torch.Tensor | None = None,
        exits: tuple[int, ...] = (),
    ):
        """Run ``tokens [B, T]`` at ``positions [B, T]``.

        cache, rows: write keys/values into ``cache`` slots ``rows`` (default ``0:B``) and attend over
            them; ``cache=None`` attends to these tokens only (the no-KV-cache mode recomputes the
            whole sequence at every step).
        valid [B, T] bool: False marks padding. Padding is written to the cache's scratch position and
            masked out as a key. Defaults to all True.
        logits_at: "last" (the last valid token of each row -> [B, V]), "all" (-> [B, T, V]), "none"
            (-> final hidden states [B, T, C]), or a LongTensor [B, N] of indices into T (-> [B, N, V]).
            The LM head (the largest matrix) only runs where logits are wanted.
        num_layers: run only the first ``num_layers`` blocks, then the final norm and LM head (early
            exit: the "amateur" of contrastive decoding and a free draft model for speculative decoding).
        block_tables [B, W] (with a ``PagedKVCache``): each row's blocks; the blocks for the new positions
            must already be there and writable (``PagedKVCache.ensure_writable``).
        exits: also read the logits after each of these numbers of layers (early exit, the same
            positions as ``logits_at``) from this one pass: returns ``(logits, {K: logits_K})``. The first K
            layers of a model are its own early-exit amateur, so contrastive decoding needs no second pass.
        """
        B, T = tokens.shape
        paged = isinstance(cache, PagedKVCache)
        dev = self.device
        plain_decode = (paged and T == 1 and not exits and num_layers is None and isinstance(logits_at, str)
                        and logits_at == "last" and not torch.is_grad_enabled())
        if plain_decode and dev.type == "cpu" and B <= decode_step.MAX_ROWS and cache.dtype == torch.float32:
            fused = decode_step.for_model(self, B)  # the whole step in one native call (decode_step.py)
            if fused is not None:
                return fused(tokens, positions, cache, block_tables, valid)
        if plain_decode and dev.type == "cuda":
            graphs = cuda_graph.for_model(self, cache, B)  # the step replayed from a CUDA graph (cuda_graph.py)
            if graphs is not None:
                return graphs(tokens, positions, cache, block_tables, valid)
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        # What must be a Python value (the keys attended, whether the fused causal kernel applies) is read
        # first: from inputs built on the host for a model on an accelerator, reading costs no device sync;
        # then every input moves to the model's device once.
        key_len, causal = _plan(positions, valid, cache)
        if tokens.device != dev:
            tokens, positions, valid = tokens.to(dev), positions.to(dev), valid.to(dev)
            if block_tables is not None:
                block_tables = block_tables.to(dev)
            if isinstance(logits_at, torch.Tensor):
                logits_at = logits_at.to(dev)
        if paged:
            bs, W = cache.block_size, block_tables.shape[1]
            write_blocks = torch.where(valid, block_tables.gather(1, (positions // bs).clamp(max=W - 1)), SCRATCH)
            write_offsets = torch.where(valid, positions % bs, 0)
            positions = torch.where(valid, positions, 0)  # a padded query sees key 0 only; its output is unused
            mask = torch.arange(key_len, device=positions.device).view(1, 1, 1, -1) <= positions.view(B, 1, T, 1)
        elif cache is not None:
            rows = rows if rows is not None else slice(0, B)
            positions = torch.where(valid, positions, cache.scratch)
            key_pos = torch.arange(key_len, device=positions.device)
            # key j is visible to a query at position p iff j <= p: causal, and (since each row's real
            # positions are contiguous from 0) it also excludes the padding, which sits at `scratch`.
            mask = key_pos.view(1, 1, 1, -1) <= positions.view(B, 1, T, 1)
        else:
            # causal by position, and padded keys hidden; a padded query sees itself so no row is empty.
            mask = (positions.unsqueeze(1) <= positions.unsqueeze(2)) & valid.unsqueeze(1)
            mask = (mask | torch.eye(T, dtype=torch.bool, device=positions.device)).unsqueeze(1)  # [B, 1, T, T]
        rope = self.config.position == "rope"
        cos = sin = None
        if rope:
            cos = self.rope_cos[positions].unsqueeze(2).to(self.dtype)  # [B, T, 1, D]
            sin = self.rope_sin[positions].unsqueeze(2).to(self.dtype)
        native_decode = (rope and cache is not None and T == 1 and self.dtype == torch.float32
                         and cache.dtype == torch.float32 and (paged or (isinstance(rows, slice)
                                                                         and rows.step in (None, 1)))
                         and _native_ok(tokens))
        step = Step(cos, sin, positions, key_len, mask, self.config.num_heads // self.config.num_kv_heads, rows,
                    native_decode, causal=causal)
        if paged:
            step.tables = block_tables.contiguous()
            step.write_blocks, step.write_offsets = write_blocks.contiguous(), write_offsets.contiguous()
            if native_decode and not (0 <= int(block_tables.min()) and int(block_tables.max()) < cache.k[0].shape[0]):
                raise ValueError("model: a block table names a block outside the pool")
        return self.run_layers(tokens, positions, step, cache, logits_at, valid, num_layers, exits)

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor, step: Step, cache, logits_at,
                   valid: torch.Tensor, num_layers: int | None = None, exits: tuple[int, ...] = ()):
        """The body of ``forward`` once its ``Step`` is made: embedding, the blocks, the final norm and the LM
        head (``positions``: as the step has them, padding moved). ``cuda_graph`` captures this with a step
        built from its static buffers."""
        B, T = tokens.shape
        rope = self.config.position == "rope"
        h = self.model.embed_tokens(tokens.reshape(-1))  # [B*T, C]: every matmul sees one 2-D input
        if not rope:  # learned absolute positions (padding sits at the scratch position: clamp, it is masked)
            h = h + self.model.embed_positions(positions.clamp(max=self.config.context_length - 1).reshape(-1))
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        early: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            h = layer(h, step, None if cache is None else (cache.k[i], cache.v[i]))
            if i + 1 in exits:
                early[i + 1] = h
        if exits:
            out = self._head(h.view(B, T, -1), logits_at, valid)
            return out, {k: self._head(e.view(B, T, -1), logits_at, valid) for k, e in early.items()}
        return self._head(h.view(B, T, -1), logits_at, valid)

    def _head(self, h: torch.Tensor, logits_at, valid: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head at the positions ``logits_at`` asks for (h [B, T, C])."""
        B = h.shape[0]

        if isinstance(logits_at, str) and logits_at == "none":
            return self.model.norm(h)
        if isinstance(logits_at, str) and logits_at == "last":
            last = valid.long().cumsum(1).argmax(1)  # index of the last valid token of each row
            h = h[torch.arange(B, device=h.device), last]  # [B, C]
        elif isinstance(logits_at, torch.Tensor):
            h = h.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, N, C]
        return self.lm_head(self.model.norm(h)).float()
