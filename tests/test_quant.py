"""Weight-only int8 quantization."""

from __future__ import annotations

import torch

from logitlab.model.quant import Int8Linear, quantize_int8

from tiny import tiny_model


def test_int8_rounding_error_is_at_most_half_a_step():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    q = Int8Linear(w)
    step = q.scale.float()[:, None]
    assert (step >= w.abs().amax(1, keepdim=True) / 127).all()  # nothing clipped
    assert (step <= w.abs().amax(1, keepdim=True) / 120).all()  # and the range is used
    assert ((q.dequantized() - w).abs() <= step * 0.5 * (1 + 1e-6)).all()
    assert q.qweight.dtype == torch.int8


def test_int8_linear_matches_dequantized_matmul():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 64, generator=g), torch.randn(3, 5, 64, generator=g)
    q = Int8Linear(w)
    expected = x @ q.dequantized().T
    got = q(x).float()
    assert got.shape == (3, 5, 96)
    assert ((got - expected).abs().max() / expected.abs().max()) < 2e-2  # bf16 activations


@torch.inference_mode()
def test_quantized_model_stays_close_to_float():
    ref = tiny_model()
    qm = quantize_int8(tiny_model())
    assert not any(isinstance(m, torch.nn.Linear) for m in qm.modules())
    toks = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(12).expand(2, -1)
    a, b = ref(toks, pos, logits_at="all"), qm(toks, pos, logits_at="all")
    assert ((a - b).abs().max() / a.abs().max()) < 0.08
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agree > 0.8


def test_int8_linear_prefill_path_matches_decode_path():
    """Many rows take the dequantize-then-GEMM path; it must agree with the int8 kernel row by row."""
    g = torch.Generator().manual_seed(3)
    q = Int8Linear(torch.randn(40, 32, generator=g))
    x = torch.randn(1, 64, 32, generator=g)
    many = q(x).float()  # 64 rows: GEMM path
    few = torch.cat([q(x[:, i : i + 4]) for i in range(0, 64, 4)], 1).float()  # 4 rows: int8 kernel
    assert ((many - few).abs().max() / few.abs().max()) < 2e-2
