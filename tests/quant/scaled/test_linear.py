"""The quantized matmul against an independent numpy reference: x and W quantized by `fp8_reference`
(ml_dtypes), dequantized, multiplied in float64. Every code path (`torch._scaled_mm` row-wise, int8
`torch._int_mm`, dequantize-then-matmul), every code format (fp8, int8, MXFP8), and fused layers
whose logical shards have their own scales. int8 W8A8 is bitwise the int64 numpy product scaled in the
same order; int8 weight-only (W8A16, bf16) takes torch's int8 kernel within bf16 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamquant.quant.scaled.linear as fp8_linear
from streamquant.quant.scaled.linear import default_activation, scaled_matmul
from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ, INT8, MXFP8
from streamquant.quant.math.quantize import quantize, quantize_window_, scale_from_amax, window_amax
from streamquant.quant.scaled.weights import ScaledWeightSpec, shard_layouts
from streamquant.quant.math.granularity import LogicalShard, PerBlock, PerRow, PerTensor, Window

from ..fp8_reference import ref_dequantize, ref_quantize, to_f32
from ..math.test_quantize import ref_tile

both_kernels = pytest.mark.usefixtures("cpu_kernels")  # the test runs on the native and the pure-torch kernels

SHARD_ROWS = (160, 40, 40)  # q, k, v: the first spans two 128-row blocks, the others are partial blocks


def fused_weight(granularity, fmt, k):
    """Codes and scales of a fused [sum(SHARD_ROWS), k] weight, quantized shard by shard; and the
    float64 reference dequantization of each shard, stacked."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(r, k, generator=gen) * (4.0 ** i) for i, r in enumerate(SHARD_ROWS)]
    shards = tuple(LogicalShard(label, Window(0, 0, r, k)) for label, r in zip("qkv", SHARD_ROWS))
    layouts = shard_layouts(shards, granularity)
    codes = torch.empty(sum(SHARD_ROWS), k, dtype=fmt.dtype)
    scales = torch.empty(layouts[-1].scale_rows.stop, layouts[0].window.local_grid(layouts[0].tile)[1].stop)
    ref = []
    for lay, w in zip(layouts, parts):
        amax = window_amax(w, lay.window, lay.tile)
        scales[lay.scale_rows] = scale_from_amax(amax, fmt)
        quantize_window_(codes[lay.rows], w, scales[lay.scale_rows], lay.window, lay.tile)
        tile = ref_tile(granularity, w.shape)
        c, s = ref_quantize(to_f32(w), tile, fmt.dtype, mx=fmt.mx)
        ref.append(ref_dequantize(c, s, tile, fmt.dtype, torch.float32).view(np.float32).astype(np.float64))
    return codes, scales, layouts, np.concatenate(ref)


def ref_activation(x, activation, fmt):
    tile = ref_tile(activation, x.shape)
    c, s = ref_quantize(to_f32(x), tile, fmt.dtype, mx=fmt.mx)
    return ref_dequantize(c, s, tile, fmt.dtype, torch.float32).view(np.float32).astype(np.float64)


CASES = [(g, f) for g in (PerTensor(), PerRow(), PerBlock((128, 128))) for f in (E4M3FN, E4M3FNUZ)]
CASES += [(PerRow(), INT8), (PerBlock((1, 32)), MXFP8)]


@pytest.mark.parametrize("fast", [True, False], ids=["scaled_or_int_mm", "dequantize"])
@pytest.mark.parametrize(("granularity", "fmt"), CASES,
                         ids=lambda v: repr(v) if not hasattr(v, "dtype") else str(v.dtype) + ("-mx" if v.mx else ""))
def test_matmul_equals_reference(granularity, fmt, fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(fp8_linear, "rowwise_scaled_mm_supported", lambda *args: False)
    k = 200
    codes, scales, layouts, w_ref = fused_weight(granularity, fmt, k)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(sum(SHARD_ROWS))
    activation = default_activation(granularity)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(granularity, fmt), activation, bias)
    x_ref = ref_activation(x.reshape(-1, k), activation, fmt)
    expected = (x_ref @ w_ref.T + bias.double().numpy()).reshape(3, 5, -1)
    assert y.shape == (3, 5, sum(SHARD_ROWS)) and y.dtype == torch.float32
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("granularity", "fmt"), [(PerTensor(), E4M3FN), (PerRow(), E4M3FN), (PerBlock((128, 128)), E4M3FN),
                                                  (PerRow(), INT8), (PerBlock((1, 32)), MXFP8)], ids=str)
def test_weight_only_is_linear_on_dequantized_weight(granularity, fmt):
    codes, scales, layouts, w_ref = fused_weight(granularity, fmt, 64)
    x = torch.randn(4, 64, dtype=torch.float32)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(granularity, fmt), None)
    expected = torch.nn.functional.linear(x, torch.from_numpy(w_ref).float())
    assert torch.equal(y, expected)


@both_kernels
def test_int8_w8a8_matmul_is_bitwise_the_integer_product_scaled():
    """W8A8: int32 accumulation (exact; numpy int64 here) then `* scale_x * scale_w` in float32."""
    gen = torch.Generator().manual_seed(3)
    rows, k = 48, 200
    w, x, bias = torch.randn(rows, k, generator=gen), torch.randn(7, k, generator=gen), torch.randn(rows, generator=gen)
    layouts = shard_layouts((LogicalShard("", Window(0, 0, rows, k)),), PerRow())
    codes, scales = quantize(w, PerRow(), INT8)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), PerRow(), bias)
    xc, xs = ref_quantize(to_f32(x), (1, k), torch.int8)
    wc, ws = ref_quantize(to_f32(w), (1, k), torch.int8)
    np.testing.assert_array_equal(codes.view(torch.uint8).numpy(), wc)
    acc = xc.view(np.int8).astype(np.int64) @ wc.view(np.int8).astype(np.int64).T
    assert np.abs(acc).max() < 2 ** 31
    expected = (acc.astype(np.float32) * xs) * ws.reshape(1, -1) + bias.numpy()
    np.testing.assert_array_equal(y.numpy(), expected.astype(np.float32))


def test_int8_weight_only_bf16_takes_the_int8_kernel_within_bf16_rounding():
    """W8A16 on CPU in bf16: bitwise torch._weight_int8pack_mm on the layer's codes and bf16 row scales, and
    as close to a float64 reference as dequantize-then-linear is (the output rounding dominates)."""
    gen = torch.Generator().manual_seed(4)
    rows, k = 96, 256
    w, x = torch.randn(rows, k, generator=gen), torch.randn(5, 3, k, generator=gen).to(torch.bfloat16)
    layouts = shard_layouts((LogicalShard("", Window(0, 0, rows, k)),), PerRow())
    codes, scales = quantize(w, PerRow(), INT8)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), None)
    assert y.shape == (5, 3, rows) and y.dtype == torch.bfloat16
    direct = torch._weight_int8pack_mm(x.reshape(-1, k), codes, scales[:, 0].to(torch.bfloat16)).reshape(5, 3, rows)
    assert torch.equal(y, direct)
    reference = x.double() @ (codes.double() * scales.double()).T
    dequantized = torch.nn.functional.linear(x, (codes.float() * scales).to(torch.bfloat16)).double()
    ours_err = ((y.double() - reference).norm() / reference.norm()).item()
    assert ours_err <= 1.5 * ((dequantized - reference).norm() / reference.norm()).item()
    # with a bias, or wider partial sums, the dequantize-then-linear path keeps its single rounding
    bias = torch.randn(rows, generator=gen).to(torch.bfloat16)
    with_bias = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), None, bias)
    assert torch.equal(with_bias, torch.nn.functional.linear(x, (codes.float() * scales).to(torch.bfloat16), bias))
