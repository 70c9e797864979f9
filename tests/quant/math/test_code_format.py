"""The code formats (`quant/math/code_format.py`) at their edges, against independent arithmetic: each
format's constants; int8 rounds half to even and never writes -128; MX scales are E8M0 powers of two
(every positive bf16 amax against numpy's frexp and ml_dtypes' float8_e8m0fnu), saturate past 448, and
give a zero block 2^-127."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ, INT8, MXFP8, CodeFormat, mx_scales
from streamquant.quant.math.granularity import PerBlock, PerRow, Window
from streamquant.quant.math.quantize import dequantize, quantize, quantize_window_

both_kernels = pytest.mark.usefixtures("cpu_kernels")  # the test runs on the native and the pure-torch kernels


@both_kernels
def test_format_constants():
    assert E4M3FN.max == 448.0 and E4M3FNUZ.max == 240.0
    assert E4M3FN.dtype == torch.float8_e4m3fn
    assert E4M3FN.min_scale == 1.0 / (448.0 * 512.0)
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fnuz).max) == E4M3FNUZ.max
    with pytest.raises(ValueError):
        CodeFormat(torch.bfloat16)
    with pytest.raises(ValueError, match="e4m3fn"):
        CodeFormat(torch.int8, mx=True)
    assert INT8.max == 127.0 and INT8.integer and not E4M3FN.integer


@both_kernels
def test_int8_rounds_half_to_even_and_is_symmetric():
    # amax 127 -> scale exactly 1, so w / scale is w itself
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49, -3.51]])
    q, s = quantize(w, PerRow(), INT8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -127, 3, -4]]
    # a foreign (too small) scale saturates at +-127: -128 is never written
    out = torch.empty(1, 4, dtype=torch.int8)
    quantize_window_(out, torch.tensor([[1e4, -1e4, -127.6, 0.4]]), torch.ones(1, 1), Window(0, 0, 1, 4), (1, 4))
    assert out.tolist() == [[127, -127, -127, 0]]


@both_kernels
def test_int8_round_trip_error_is_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, PerRow(), INT8)
    err = (dequantize(q, s, PerRow(), torch.float32) - w).abs()
    assert bool((err <= s * (0.5 + 1e-6)).all())
    assert int(q.min()) >= -127


def test_mx_scales_of_every_positive_bf16_amax_are_e8m0_powers_of_two():
    """All 32640 finite positive bf16 values (and zero) as block amaxes, against numpy's frexp."""
    amax = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ours = mx_scales(amax)
    _, e = np.frexp(amax.numpy())
    exponent = np.where(amax.numpy() > 0, np.clip(e - 1 - 8, -127, 127), -127)
    np.testing.assert_array_equal(ours.numpy(), np.ldexp(np.float32(1), exponent).astype(np.float32))
    # storable as E8M0 without rounding, in torch's and in ml_dtypes' own format
    assert torch.equal(ours.to(torch.float8_e8m0fnu).float(), ours)
    np.testing.assert_array_equal(ours.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), ours.numpy())
    # every non-zero block lands in [256, 512) before saturation: the OCP "largest power of two" rule
    nonzero = amax > 2.0 ** -118
    ratio = amax[nonzero] / ours[nonzero]
    assert bool(((ratio >= 256) & (ratio < 512)).all())


@both_kernels
def test_mx_saturates_past_448_and_zero_blocks_get_the_smallest_scale():
    w = torch.zeros(2, 64)
    w[0, :5] = torch.tensor([511.0, 480.0, 464.0, 448.0, -500.0])  # amax 511: scale 2^(8 - 8) = 1
    q, s = quantize(w, PerBlock((1, 32)), MXFP8)
    assert s.tolist() == [[1.0, 2.0 ** -127], [2.0 ** -127, 2.0 ** -127]]
    assert q[0, :5].float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]
    assert not torch.isnan(q.float()).any() and (q[1].view(torch.uint8) == 0).all()
    assert s.to(torch.float8_e8m0fnu).view(torch.uint8)[1].tolist() == [0, 0]  # E8M0 code 0 is 2^-127
