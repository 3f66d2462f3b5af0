"""Weight-only int8 quantization."""

from __future__ import annotations

import pytest
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


def test_native_kernel_equals_float32_matmul_for_every_row_count_and_width():
    """The native kernel computes x @ (q * s)^T in float32: 1-4 rows (and more, in groups of four),
    widths that exercise the 64-, 32- and 16-wide loops and the scalar tail."""
    from logitlab.model import native

    if not native.available():
        pytest.skip("no C compiler: the native kernel is not built here")
    g = torch.Generator().manual_seed(4)
    for n_in in (576, 1536, 100, 40, 7):
        q = Int8Linear(torch.randn(33, n_in, generator=g))
        for rows in (1, 2, 3, 4, 6):
            x = torch.randn(rows, n_in, generator=g)
            expected = (x.double() @ q.dequantized().double().T).float()
            got = native.q8_matmul(x, q.qweight, q.scale_f32)
            assert got.shape == (rows, 33)
            assert ((got - expected).abs().max() / expected.abs().max()) < 1e-5, (n_in, rows)


def test_native_kernel_rejects_wrong_dtypes_and_shapes():
    from logitlab.model import native

    if not native.available():
        pytest.skip("no C compiler: the native kernel is not built here")
    q = Int8Linear(torch.randn(8, 16))
    with pytest.raises(TypeError):
        native.q8_matmul(torch.randn(1, 16, dtype=torch.float64), q.qweight, q.scale_f32)
    with pytest.raises(ValueError):
        native.q8_matmul(torch.randn(1, 15), q.qweight, q.scale_f32)


def test_int8_linear_without_native_kernel_uses_pytorchs(monkeypatch):
    """LOGITLAB_NATIVE=0 (or no compiler): the same layer runs PyTorch's int8 kernel and agrees."""
    from logitlab.model import native

    g = torch.Generator().manual_seed(5)
    q = Int8Linear(torch.randn(24, 64, generator=g))
    x = torch.randn(2, 64, generator=g)
    with_native = q(x)
    monkeypatch.setattr(native, "available", lambda: False)
    called = []
    monkeypatch.setattr(native, "q8_matmul", lambda *a: called.append(a))
    without = q(x)
    assert not called
    expected = x @ q.dequantized().T
    assert ((without - expected).abs().max() / expected.abs().max()) < 2e-2  # bf16 activations
    assert ((with_native - expected).abs().max() / expected.abs().max()) < 2e-2


def test_native_kernel_builds_once_into_the_cache(tmp_path, monkeypatch):
    import shutil

    from logitlab.model import native

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    built = native._build(tmp_path)
    assert built is not None and built.exists() and built.parent == tmp_path / "kernels"
    mtime = built.stat().st_mtime_ns
    assert native._build(tmp_path) == built and built.stat().st_mtime_ns == mtime  # cached, not rebuilt
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native._build(tmp_path / "other") is None  # a missing compiler falls back, no exception


def test_native_kernel_can_be_switched_off_for_a_side_by_side_measurement():
    from logitlab.model import native

    before = native.available()
    with native.switched_off():
        assert not native.available()
    assert native.available() == before


def test_packed_gemm_equals_the_plain_bfloat16_gemm_and_survives_a_copy():
    """More than INT8_MAX_ROWS rows: oneDNN's packed weights give the plain GEMM's results to the bit;
    a deep copy (speculative int8 draft) drops the opaque packed tensor and still computes the same."""
    import copy

    from logitlab.model.quant import INT8_MAX_ROWS

    g = torch.Generator().manual_seed(6)
    q = Int8Linear(torch.randn(48, 40, generator=g))
    if not q.pack_for_gemm():
        pytest.skip("no oneDNN bfloat16 on this CPU")
    assert "_packed" in q.__dict__
    for rows in (INT8_MAX_ROWS + 1, 8, 33, 300):
        x = torch.randn(rows, 40, generator=g)
        plain = torch.nn.functional.linear(x.bfloat16(), q.dequant).float()
        assert torch.equal(q(x), plain), rows
    twin = copy.deepcopy(q)
    assert "_packed" not in twin.__dict__
    x = torch.randn(9, 40, generator=g)
    assert torch.equal(twin(x), q(x))


def test_loaded_int8_models_are_packed(tmp_path):
    from logitlab.model.quant import _onednn_bf16
    from logitlab.model.store import load_or_build

    from tiny import tiny_config, tiny_state_dict

    if not _onednn_bf16():
        pytest.skip("no oneDNN bfloat16 on this CPU")
    cfg = tiny_config()
    src = tmp_path / "model.bin"
    src.write_bytes(b"x")
    for _ in range(2):  # built (and cached), then loaded from the cache
        m = load_or_build(cfg, lambda: tiny_state_dict(cfg), "int8", src, tmp_path)
        lins = [x for x in m.modules() if isinstance(x, Int8Linear)]
        assert lins and all("_packed" in x.__dict__ for x in lins)


def test_int8_linear_follows_weights_loaded_after_first_use():
    """The native path caches float32 scales per weight tensor: a load that replaces the buffers (same
    shapes) must be seen, never the old scales."""
    g = torch.Generator().manual_seed(10)
    a, b = Int8Linear(torch.randn(16, 32, generator=g)), Int8Linear(torch.randn(16, 32, generator=g) * 5)
    x = torch.randn(1, 32, generator=g)
    a(x)
    a.load_state_dict(b.state_dict(), assign=True)
    assert (a(x) - x @ b.dequantized().T).abs().max() < 1e-4 * (x @ b.dequantized().T).abs().max() + 2e-2
