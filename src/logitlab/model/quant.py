"""Weight-only int8 quantization (per output channel, symmetric).

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights move a
quarter of the bytes of float32. Each row ``w_n`` of a linear layer is stored as ``q_n = round(w_n / s_n)``
with ``s_n = max|w_n| / 127``; the matmul ``x @ (q * s)^T`` runs in one fused kernel
(``aten._weight_int8pack_mm``), fed bfloat16 copies of the activations (the float32 path of that kernel
is ~7x slower on this CPU). The embedding table stays as it is: a lookup reads only the rows it needs.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX_ROWS = 4  # measured: beyond ~4 rows the float32 GEMM beats the int8 row-by-row kernel


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        # The kernel takes bfloat16 scales: round the scale up a little first so that, after rounding
        # to bfloat16, max|w| / scale still fits in 127, then quantize against the stored scale.
        scale = (w.abs().amax(dim=1) / 127.0 * (1 + 2**-7)).clamp_min(1e-12).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        # The int8 kernel is a per-row matrix-vector product: its cost grows linearly with the rows, so
        # from a handful of rows on (batched decode, prefill) a float32 GEMM over the same dequantized
        # values is faster. Keeping that copy costs memory (fp32 + int8), not accuracy: both paths
        # compute with the same quantized weights.
        self.register_buffer("dequant", q.float() * scale.float()[:, None])
        self.out_features, self.in_features = w.shape

    @classmethod
    def empty(cls, out_features: int, in_features: int) -> Int8Linear:
        """Uninitialised buffers of the right shapes and dtypes (to be filled by load_state_dict)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        m.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16))
        m.register_buffer("dequant", torch.empty(out_features, in_features))
        m.out_features, m.in_features = out_features, in_features
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] > INT8_MAX_ROWS:  # batched decode, prefill: a GEMM over the dequantized copy
            y = torch.nn.functional.linear(x2.float(), self.dequant)
        else:  # one or a few rows (decode): bandwidth-bound, read a quarter of the bytes
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.dequant


def quantize_int8(model: nn.Module, empty: bool = False) -> nn.Module:
    """In place: every nn.Linear (attention, MLP and the LM head, tied or not) becomes an Int8Linear
    (``empty=True``: with uninitialised buffers, to be loaded from a cache);
    activations, norms, the embedding table and the KV cache keep the model's dtype (float32: this
    CPU build has no fast bfloat16 GEMM, so bfloat16 activations would slow prefill down ~4x)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = Int8Linear.empty(*child.weight.shape) if empty else Int8Linear(child.weight)
                setattr(module, name, q)
    return model
