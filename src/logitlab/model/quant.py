"""Weight-only int8 quantization (per output channel, symmetric).

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights move a
quarter of the bytes of float32. Each row ``w_n`` of a linear layer is stored as ``q_n = round(w_n / s_n)``
with ``s_n = max|w_n| / 127``; for one to four rows the matmul ``x @ (q * s)^T`` runs in logitlab's
native kernel (``native.py``: float32 activations, the int8 weights streamed once), or, where it cannot
be built, in PyTorch's ``aten._weight_int8pack_mm`` fed bfloat16 copies of the activations. The
embedding table stays as it is: a lookup reads only the rows it needs.

From a handful of rows on (batched decode, prefill) the int8 kernel, a per-row matrix-vector product,
loses to a GEMM, so each layer also keeps a bfloat16 copy of its dequantized weights: oneDNN's bfloat16
GEMM runs 2-3x faster than the float32 one on this CPU (AVX512_BF16), and the copy is half the size.
That copy rounds ``q * s`` to bfloat16 (relative error <= 2^-9 per weight), and the activations too.
``pack_for_gemm`` hands it to oneDNN once in oneDNN's own blocked layout (the reorder PyTorch's
compiler does when it freezes a model): plain weights are reordered again on every call, which costs
~20% at 32 rows and half the time at 5-8 rows (measured; same results to the bit).

On a GPU (a CUDA model) every product, decode included, is the device's bfloat16 GEMM over that
dequantized copy (no int8 kernel, no oneDNN packing): the computation of the CPU's batched path
(bfloat16 weights and activations, float32 accumulation).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native

INT8_MAX_ROWS = 4  # measured: beyond 4-8 rows the bfloat16 GEMM beats the int8 row-by-row kernel


class Int8Linear(nn.Module):
    """int8 weights (per-row scales) and, where the layer had one, its float32 bias (GPT-2)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        w = weight.detach().float()
        # The kernel takes bfloat16 scales: round the scale up a little first so that, after rounding
        # to bfloat16, max|w| / scale still fits in 127, then quantize against the stored scale.
        scale = (w.abs().amax(dim=1) / 127.0 * (1 + 2**-7)).clamp_min(1e-12).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("dequant", (q.float() * scale.float()[:, None]).to(torch.bfloat16))
        self.out_features, self.in_features = w.shape

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool = False) -> Int8Linear:
        """Uninitialised buffers of the right shapes and dtypes (to be filled by load_state_dict)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.register_buffer("bias", torch.empty(out_features) if bias else None)
        m.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        m.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16))
        m.register_buffer("dequant", torch.empty(out_features, in_features, dtype=torch.bfloat16))
        m.out_features, m.in_features = out_features, in_features
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.device.type != "cpu":  # an accelerator: its bfloat16 GEMM over the dequantized copy, any rows
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequant)
        elif x2.shape[0] > INT8_MAX_ROWS:  # batched decode, prefill: a bfloat16 GEMM over the dequantized copy
            packed = self.__dict__.get("_packed")
            if packed is not None:
                y = torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), packed, None, "none", [], "")
            else:
                y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequant)
        elif x2.dtype == torch.float32 and native.available():  # decode: stream the int8 weights once
            y = self._native(x2)
        else:  # PyTorch's int8 kernel (bfloat16 activations)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def pack_for_gemm(self) -> bool:
        """Reorder the bfloat16 copy into oneDNN's blocked layout once (kept beside the buffers, which
        stay as they are for state_dict). False, and nothing changes, where oneDNN cannot."""
        if not _onednn_bf16():
            return False
        self.__dict__["_packed"] = torch.ops.mkldnn._reorder_linear_weight(self.dequant, 32)
        return True

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        """native.q8_matmul without its per-call checks (a decode step makes ~120 of these calls): the
        operands are checked once per weight tensor, in ``scale_f32``."""
        s = self.scale_f32
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, device=x.device)
        native.library().q8_matmul(x.data_ptr(), x.shape[0], self.in_features, self.qweight.data_ptr(), s.data_ptr(),
                                   self.out_features, y.data_ptr())
        return y

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.dequant.device.type != "cpu":  # oneDNN's packing and the native kernel's scales are CPU-only
            self.__dict__.pop("_packed", None)
            self.__dict__.pop("_bound", None)
        return out

    def __getstate__(self):
        # oneDNN's packed tensor is opaque (no storage to copy or pickle): copies drop it and use the
        # plain bfloat16 copy until pack_for_gemm() is called on them.
        state = dict(self.__dict__)
        state.pop("_packed", None)
        state.pop("_bound", None)
        return state

    @property
    def scale_f32(self) -> torch.Tensor:
        """The scales in float32 for the native kernel: computed, and the operands checked, once per
        weight tensor (again only if a load replaces the buffers)."""
        bound = self.__dict__.get("_bound")
        if bound is None or bound[0] is not self.qweight or bound[1] is not self.scale:
            s = self.scale.float()
            if native.available():
                native.q8_matmul(torch.zeros(1, self.in_features), self.qweight, s)  # raises on bad operands
            bound = self.__dict__["_bound"] = (self.qweight, self.scale, s)
        return bound[2]

    def dequantized(self) -> torch.Tensor:
        """The exact quantized weights ``q * s`` in float32."""
        return self.qweight.float() * self.scale.float()[:, None]


def _onednn_bf16() -> bool:
    mk = torch.ops.mkldnn
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(mk, "_linear_pointwise")
                and hasattr(mk, "_reorder_linear_weight") and bool(mk._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def pack_for_gemm(model: nn.Module) -> nn.Module:
    """In place: every Int8Linear's bfloat16 GEMM copy in oneDNN's layout (see Int8Linear.pack_for_gemm)."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.pack_for_gemm()
    return model


def quantize_int8(model: nn.Module, empty: bool = False) -> nn.Module:
    """In place: every nn.Linear (attention, MLP and the LM head, tied or not) becomes an Int8Linear
    (``empty=True``: with uninitialised buffers, to be loaded from a cache);
    activations, norms, attention, the embedding table and the KV cache keep the model's dtype (float32);
    only the matmul inputs are rounded to bfloat16."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = (Int8Linear.empty(*child.weight.shape, bias=child.bias is not None) if empty
                     else Int8Linear(child.weight, child.bias))
                setattr(module, name, q)
    return model
