"""``--dtype gguf``: the model computes on the GGUF file's own quantized blocks.

Every matrix keeps the file's block format, repacked once at load into the layout the kernels stream
(``qblocks.py``): the weights are exactly the file's, and a decode step reads ~84 MB for SmolLM2-135M
Q4_1 where int8 reads 135 MB and float32 538 MB. Only the activations are rounded (int8 per block of
32, as llama.cpp does). The tied LM head is the file's Q8_0 embedding table, dotted the same way
(``exact_head=True`` keeps a float32 copy of it instead: logits without activation rounding in the head).
``set_activations(model, "int8x2")`` rounds every block matmul's activations to two int8 levels instead of
one (about 16 bits, ``qblocks.py``): greedy text equal to float32's, for twice the dot-product work.

- ``BlockLinear``: one linear layer as block matrices stacked along the output (q|k|v and gate|up are
  stacked as in the float model; where a file gives them different types, e.g. Q4_K_M's Q6_K value
  projection, they stay separate parts). Where the AVX-512 VNNI kernel is built, each matrix also gets
  its tiled copy on first use (``QMatrix.tile``: 16 output rows to a vector) and every row count runs on the
  blocks: decode, verification, large batches and prefill (twice the bfloat16 GEMM's prefill rate on
  the 2026-11 machine, BENCHMARKS.md). Elsewhere up to ``qblocks.MAX_ROWS`` rows run in the block kernel
  and more are a GEMM over a bfloat16 copy of the dequantized weights, made on first use in oneDNN's
  blocked layout (so a server that only decodes never holds it).
- ``BlockEmbedding``: the token table; a lookup dequantizes only the rows it needs.

The repacked tensors are cached next to the other built models (``store.py``), so later loads memory-map
them: no dequantization pass, load in well under a second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native, qblocks
from .quant import _onednn_bf16


class BlockLinear(nn.Module):
    def __init__(self, parts: list[qblocks.QMatrix]):
        super().__init__()
        if not parts or len({qm.in_features for qm in parts}) != 1:
            raise ValueError("model: a block linear needs parts with one input size")
        self.parts = parts
        _register(self, parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(qm.out_features for qm in parts)
        self._gemm = None  # the bfloat16 copy (packed for oneDNN where it can), made on first use
        self._tiled = False  # tiled copies made (``tile``): on first use, so loading builds no native code
        self.levels = 1  # int8 levels of the activations (``set_activations``)

    def tile(self) -> bool:
        """Give every part its tiled copy where the AVX-512 VNNI kernel is built (then every row count runs
        on the blocks); done once, on the first forward or fused-step binding. Returns whether all have one."""
        if not self._tiled:
            self._tiled = True
            for qm in self.parts:
                qm.tile()
        return all(qm.tiles is not None for qm in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        # two levels never take the bfloat16 GEMM: it would round the activations more, not less
        if native.available() and (self.tile() or x2.shape[0] <= qblocks.MAX_ROWS or self.levels > 1):
            ys = [qblocks.matmul(x2, qm, levels=self.levels) for qm in self.parts]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        else:
            y = self._gemm_forward(x2)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _gemm_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemm is None:
            w = torch.cat([qblocks.to_bfloat16(qm) for qm in self.parts]) if len(self.parts) > 1 \
                else qblocks.to_bfloat16(self.parts[0])
            self._gemm = ("packed", torch.ops.mkldnn._reorder_linear_weight(w, 32)) if _onednn_bf16() else ("plain", w)
        kind, w = self._gemm
        if kind == "packed":
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, None, "none", [], "").float()
        return F.linear(x.to(torch.bfloat16), w).float()

    def dequantized(self) -> torch.Tensor:
        """The file's weights in float32 [out, in]."""
        return torch.cat([qblocks.dequantize(qm) for qm in self.parts])

    def extra_repr(self) -> str:
        kinds = ",".join(f"{qm.bits}-bit/{qm.group}" for qm in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={kinds}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_gemm"] = None  # oneDNN's packed tensor cannot be copied; rebuilt on use
        return state


def set_activations(model: nn.Module, activations: str) -> nn.Module:
    """Round the activations of every block matmul of ``model`` as ``activations`` says (a key of
    ``qblocks.ACTIVATION_LEVELS``); the fused decode step binds again. Returns the model."""
    if activations not in qblocks.ACTIVATION_LEVELS:
        raise ValueError(f"model: activations must be one of {', '.join(qblocks.ACTIVATION_LEVELS)}, "
                         f"got {activations!r}")
    for module in model.modules():
        if isinstance(module, BlockLinear):
            module.levels = qblocks.ACTIVATION_LEVELS[activations]
    model.__dict__.pop("_fused_decode", None)
    return model


class BlockEmbedding(nn.Module):
    def __init__(self, table: qblocks.QMatrix):
        super().__init__()
        self.table = table
        _register(self, [table])
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        return qblocks.dequant_rows(self.table, flat).view(*ids.shape, self.embedding_dim)


def _register(module: nn.Module, parts: list[qblocks.QMatrix]) -> None:
    """The blocks' tensors as (non-persistent) buffers, so that what walks a model's tensors (memory and
    bandwidth accounting) sees them; the QMatrix objects stay the kernels' view of them."""
    for i, qm in enumerate(parts):
        for name in ("codes", "d", "m"):
            module.register_buffer(f"part{i}_{name}", getattr(qm, name), persistent=False)
