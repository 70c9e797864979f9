"""Asymmetric int4 (`quant/math/int4.py`): scales, zero points, codes and dequantization against the
numpy reference, with a zero row, an all-positive row and an all-negative row; the compressed-tensors
formula against that library's own `calculate_qparams` and `quantize` (W4A16_ASYM's weight args)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.quant.math.granularity import Window

from ..fp8_reference import ref_quantize_asymmetric, to_f32

both_kernels = pytest.mark.usefixtures("cpu_kernels")  # the test runs on the native and the pure-torch kernels


@both_kernels
@pytest.mark.parametrize("tile", [(1, 32), (1, 128), (1, 7)])
def test_asymmetric_int4_equals_the_numpy_reference(tile):
    from streamquant.quant.math.int4 import dequantize_window_asymmetric, quantize_window_asymmetric_, range_scales, window_range

    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 200, generator=gen) * torch.exp(torch.randn(40, 1, generator=gen) * 3)).to(torch.bfloat16)
    w[3] = 0  # a zero row: the floor scale, zero point -8, codes -8, dequantized exactly 0
    w[4] = w[4].abs()  # all positive: zero point -8 (lo = 0)
    w[5] = -w[5].abs()  # all negative: zero point 7
    window = Window(0, 0, *w.shape)
    scales, zeros = range_scales(window_range(w, window, tile))
    codes = quantize_window_asymmetric_(torch.empty(w.shape, dtype=torch.int8), w, scales, zeros, window, tile)
    ref_codes, ref_scales, ref_zeros = ref_quantize_asymmetric(to_f32(w), tile)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(zeros.numpy(), ref_zeros)
    np.testing.assert_array_equal(codes.view(torch.uint8).numpy(), ref_codes)
    deq = dequantize_window_asymmetric(codes, scales, zeros, window, tile, torch.float32)
    assert (deq[3] == 0).all() and (zeros[4] == -8).all() and (zeros[5] == 7).all()
    err = (deq - w.float()).abs()
    expanded = scales.repeat_interleave(tile[1], dim=1)[:, : w.shape[1]]
    assert bool((err <= expanded * 0.5 * (1 + 1e-5) + 1e-30).all())  # half a step (range covers every value)


@pytest.mark.parametrize("zero", [False, True])
def test_act_order_dequantization_takes_each_columns_group(zero):
    """`(q - zero[:, g]) * scale[:, g]` for g = g_idx[j], against a per-column numpy loop; rounded once."""
    from streamquant.quant.math.int4 import dequantize_grouped

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (2, 6, 16), generator=g, dtype=torch.int8)
    scales = torch.rand(2, 6, 4, generator=g) + 0.01
    zeros = torch.randint(-8, 8, (2, 6, 4), generator=g, dtype=torch.int8) if zero else None
    g_idx = torch.stack([torch.randperm(16, generator=g) // 4 for _ in range(2)]).to(torch.int32)
    got = dequantize_grouped(q, scales, zeros, g_idx, torch.bfloat16)
    expected = np.empty((2, 6, 16), dtype=np.float32)
    for e in range(2):
        for j in range(16):
            k = int(g_idx[e, j])
            z = zeros[e, :, k].numpy().astype(np.float32) if zero else 0
            expected[e, :, j] = (q[e, :, j].numpy().astype(np.float32) - z) * scales[e, :, k].numpy()
    assert torch.equal(got, torch.from_numpy(expected).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compressed_tensors_formula_is_the_library_bit_for_bit(dtype):
    """Zero groups included: the library's scale eps and (its NaN) zero point 0."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from streamquant.quant.math.int4 import quantize_asymmetric

    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 256, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 2) * 0.02).to(dtype)
    w[3] = 0
    w[4, :128] = w[4, :128].abs()
    w[5, 128:] = -w[5, 128:].abs()
    qargs = ct.QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128,
                                zp_dtype=torch.int8)
    groups = w.unflatten(-1, (2, 128))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), qargs)
    expected = ct_quantize(w, scale, zero, qargs, dtype=torch.int8)
    codes, scales, zeros = quantize_asymmetric(w, (1, 128), "compressed-tensors")
    assert torch.equal(scales, scale.float()) and torch.equal(zeros, zero) and torch.equal(codes, expected)
    assert (zeros[3] == 0).all() and (codes[3] == 0).all()  # the zero group
    ours, _, our_zeros = quantize_asymmetric(w, (1, 128))
    assert (our_zeros[3] == -8).all()  # streamquant's zero group: floor scale, zero point -8
    rows = torch.arange(64) != 3
    assert 0 < float((ours[rows] != codes[rows]).float().mean()) < 0.1  # the roundings to the weight's dtype
