"""Weight-only int8 quantization (per output channel, symmetric).

Decode reads every weight once per token, so it is bound by memory bandwidth: int8 weights move a
quarter of the bytes of float32. Each row ``w_n`` of a linear layer is stored as ``q_n = round(w_n / s_n)``
with ``s_n = max|w_n| / 127``; the matmul ``x @ (q * s)^T`` runs in one fused kernel
(``aten._weight_int8pack_mm``) with bfloat16 activations (the float32 path of that kernel is slow on
CPU, see PERF_NOTES). The embedding table stays in bfloat16: a lookup reads only the rows it needs.
"""

from __future__ import annotations

import torch
from torch import nn


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
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """In place: every nn.Linear (attention, MLP and the LM head, tied or not) becomes an Int8Linear;
    everything else is cast to bfloat16."""
    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight))
    return model
