"""The whole decode step of a Llama-type model as one native call (``step.c``), for 1-4 rows.

The per-op decode path makes ~12 Python-level kernel calls per layer (norm, projections, RoPE and cache
write, attention, MLP, residuals); at one stream of a 135M model their overhead and thread fork/joins
are about a third of the step. ``FusedDecode`` binds the model's weights once (pointers in C structs)
and runs every layer, the final norm and the LM head in one call over the paged KV cache; Python only
launches it and samples.

It applies where the per-op path's native decode applies and the model has the plain Llama shape:
RMSNorm before each sublayer, RoPE, SwiGLU, no biases, float32 activations and cache, every matmul
float32, int8 or GGUF blocks. Anything else (GPT-2, bfloat16, exits, T > 1, autograd) runs the per-op
path, which stays the reference this is tested against (tests/test_decode_step.py).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
from torch import nn

from . import native
from .qblocks import QbMat
from .quant import Int8Linear

# Rows per fused step: the block kernels take any number of rows (the row kernel streams each weight once
# per 16, the tiled one once per batch), and up to 32 rows the fused step beat the per-op path's bfloat16
# GEMM (32 sampled streams: 442 vs 154 tok/s, measured side by side, before the tiled kernel); the float32
# and int8 kernels take 4 rows per pass. More rows: the per-op path.
MAX_ROWS = 32
MAX_ROWS_FLOAT = 4

i64, p = ctypes.c_int64, ctypes.c_void_p
ST_F32, ST_INT8, ST_BLOCKS = 0, 1, 2


class StWeight(ctypes.Structure):
    _fields_ = [("kind", i64), ("nparts", i64), ("out", i64), ("in_", i64), ("w", p), ("scale", p),
                ("parts", QbMat * 4)]


class StLayer(ctypes.Structure):
    _fields_ = [("attn_norm", p), ("ffn_norm", p), ("qkv", StWeight), ("o", StWeight), ("gate_up", StWeight),
                ("down", StWeight)]


class StModel(ctypes.Structure):
    _fields_ = [("n_layers", i64), ("C", i64), ("H", i64), ("K", i64), ("D", i64), ("F", i64), ("V", i64),
                ("eps", ctypes.c_float), ("levels", ctypes.c_int32), ("embed_kind", i64), ("embed_f32", p),
                ("embed_q", QbMat), ("final_norm", p), ("head", StWeight), ("layers", ctypes.POINTER(StLayer))]


def _f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"


class _Unsupported(Exception):
    pass


def _weight(module: nn.Module, keep: list) -> StWeight:
    """One matmul's C description; its tensors go into ``keep``."""
    from .gguf_model import BlockLinear
    from .transformer import Linear

    w = StWeight()
    if isinstance(module, BlockLinear):
        if len(module.parts) > 4:
            raise _Unsupported
        w.kind, w.nparts, w.out, w.in_ = ST_BLOCKS, len(module.parts), module.out_features, module.in_features
        module.tile()  # the tiled copies first, so that the bound structs point at them
        for i, qm in enumerate(module.parts):
            w.parts[i] = qm.struct()
            keep += [qm.codes, qm.d, qm.m, *(qm.tiles or ())]
    elif isinstance(module, Int8Linear):
        if module.bias is not None:
            raise _Unsupported
        s = module.scale_f32
        w.kind, w.out, w.in_, w.w, w.scale = ST_INT8, module.out_features, module.in_features, \
            module.qweight.data_ptr(), s.data_ptr()
        keep += [module.qweight, s]
    elif isinstance(module, Linear) and module.bias is None and _f32(module.weight):
        w.kind, w.out, w.in_, w.w = ST_F32, *module.weight.shape, module.weight.data_ptr()
        keep.append(module.weight)
    else:
        raise _Unsupported
    return w


class FusedDecode:
    """The bound C model of one Transformer; ``__call__`` runs a decode step."""

    def __init__(self, model: nn.Module):
        from .gguf_model import BlockEmbedding, BlockLinear

        c = model.config
        if (c.norm != "rmsnorm" or c.position != "rope" or c.mlp != "swiglu" or c.bias
                or c.norm_placement != "pre" or c.hidden_size % 32 or c.intermediate_size % 32
                or (c.num_heads * c.head_dim) % 32):
            raise _Unsupported
        keep: list[torch.Tensor] = []
        layers = (StLayer * c.num_layers)()
        for i, blk in enumerate(model.model.layers):
            norms = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
            if not all(_f32(t) for t in norms):
                raise _Unsupported
            keep += norms
            layers[i] = StLayer(norms[0].data_ptr(), norms[1].data_ptr(), _weight(blk.self_attn.qkv_proj, keep),
                                _weight(blk.self_attn.o_proj, keep), _weight(blk.mlp.gate_up_proj, keep),
                                _weight(blk.mlp.down_proj, keep))
        kinds = {layers[i].qkv.kind for i in range(c.num_layers)} | {
            getattr(layers[i], n).kind for i in range(c.num_layers) for n in ("o", "gate_up", "down")}
        if len(kinds) != 1:  # the step quantizes activations for all a layer's matmuls or none
            raise _Unsupported
        levels = {mod.levels for mod in model.modules() if isinstance(mod, BlockLinear)}
        if len(levels) > 1:  # one quantization of each activation serves all its matmuls
            raise _Unsupported
        m = StModel(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                    c.vocab_size, c.rms_norm_eps, levels.pop() if levels else 1)
        emb = model.model.embed_tokens
        if isinstance(emb, BlockEmbedding):
            m.embed_kind, m.embed_q = ST_BLOCKS, emb.table.struct()
            keep += [emb.table.codes, emb.table.d, emb.table.m]
        elif isinstance(emb, nn.Embedding) and _f32(emb.weight):
            m.embed_kind, m.embed_f32 = ST_F32, emb.weight.data_ptr()
            keep.append(emb.weight)
        else:
            raise _Unsupported
        if not _f32(model.model.norm.weight):
            raise _Unsupported
        m.final_norm = model.model.norm.weight.data_ptr()
        keep.append(model.model.norm.weight)
        if not isinstance(model.lm_head, BlockLinear | Int8Linear | nn.Linear):
            raise _Unsupported
        m.head = _weight(model.lm_head, keep)
        m.layers = layers
        self.model, self.layers, self.struct, self.keep = model, layers, m, keep
        self.config = c
        self.max_rows = MAX_ROWS if kinds == {ST_BLOCKS} else MAX_ROWS_FLOAT

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, block_tables: torch.Tensor,
                 valid: torch.Tensor | None) -> torch.Tensor:
        """tokens, positions, valid [B, 1]; block_tables [B, W] -> logits [B, V] float32."""
        from .paged_cache import SCRATCH

        B = tokens.shape[0]
        bs, W = cache.block_size, block_tables.shape[1]
        pos = positions.view(B)
        ok = torch.ones(B, dtype=torch.bool) if valid is None else valid.view(B)
        tables = block_tables.to(torch.int64).contiguous()
        if tables.numel() and not (0 <= int(tables.min()) and int(tables.max()) < cache.allocated_blocks):
            raise ValueError("model: a block table names a block outside the pool")
        write_blocks = torch.where(ok, tables.gather(1, (pos // bs).clamp(max=W - 1).view(B, 1)).view(B), SCRATCH)
        write_offsets = torch.where(ok, pos % bs, 0)
        pos = torch.where(ok, pos, 0)
        lens = (pos.clamp(max=W * bs - 1) + 1).contiguous()
        cos, sin = self.model.rope_cos[pos].contiguous(), self.model.rope_sin[pos].contiguous()
        toks = tokens.view(B).to(torch.int64).contiguous()
        if toks.numel() and not (0 <= int(toks.min()) and int(toks.max()) < self.config.vocab_size):
            raise ValueError("model: a token id is outside the vocabulary")
        logits = torch.empty(B, self.config.vocab_size)
        pool = cache.pool
        rc = native.library().st_decode(ctypes.byref(self.struct), B, toks.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        pool.data_ptr(), pool.shape[2], bs, tables.data_ptr(), W,
                                        write_blocks.contiguous().data_ptr(), write_offsets.contiguous().data_ptr(),
                                        lens.data_ptr(), logits.data_ptr())
        if rc != 0:
            raise MemoryError("decode step: no scratch memory")
        return logits


_UNSUPPORTED = object()
_enabled = True


@contextlib.contextmanager
def disabled():
    """Run the per-op decode path instead (tests and side-by-side benchmarks)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def for_model(model, rows: int = 1) -> FusedDecode | None:
    """The model's bound fused step (made on first use), or None where the model's shape or weights are
    not supported, the native library is missing or ``rows`` is more than it takes. The binding holds the
    weight tensors it points at (never a dangling pointer); ``Transformer.load_state_dict`` and ``.to()``
    drop it, so a model whose weights are replaced binds again."""
    if not _enabled or not native.available() or not hasattr(native.library(), "st_decode"):
        return None
    fused = model.__dict__.get("_fused_decode")
    if fused is _UNSUPPORTED:
        return None
    if fused is not None:
        return fused if rows <= fused.max_rows else None
    _bind_library()
    try:
        fused = FusedDecode(model)
    except _Unsupported:
        model.__dict__["_fused_decode"] = _UNSUPPORTED
        return None
    model.__dict__["_fused_decode"] = fused
    return fused if rows <= fused.max_rows else None


def _bind_library() -> None:
    lib = native.library()
    lib.st_decode.argtypes = [ctypes.POINTER(StModel), i64, p, p, p, p, i64, i64, p, i64, p, p, p, p]
    lib.st_decode.restype = ctypes.c_int
