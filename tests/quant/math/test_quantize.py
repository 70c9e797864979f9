"""The 8-bit code math (fp8 e4m3fn / e4m3fnuz, int8, MXFP8) against the numpy + ml_dtypes reference, bit for
bit, for a whole (single-rank) weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ, INT4, INT8, MXFP8
from streamquant.quant.math.quantize import (
    compute_scales,
    dequantize,
    quantize,
    quantize_window_,
    scale_from_amax,
    window_amax,
)
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor, Window

from ..fp8_reference import NUMPY_FP8, bits, constants, ref_dequantize, ref_quantize, to_f32

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # every test on both kernel implementations

FORMATS = [E4M3FN, E4M3FNUZ]
# Every code format the bitwise reference covers (int8 rounds, MX has power-of-two scales).
ALL_FORMATS = FORMATS + [INT8, MXFP8, INT4]


def fmt_id(fmt):
    return str(fmt.dtype) + ("-mx" if fmt.mx else "") + ("-int4" if fmt.bits == 4 else "")
GRANULARITIES = [PerTensor(), PerRow(), PerBlock((128, 128)), PerBlock((32, 16))]


def ref_tile(granularity, shape):
    """Tiles spelled out here, independently of `granularity.tile_shape`."""
    if isinstance(granularity, PerTensor):
        return tuple(shape)
    if isinstance(granularity, PerRow):
        return (1, shape[1])
    return granularity.block_size


def bits_t(t):
    return t.view(torch.uint8)


def weight(shape, dtype=torch.bfloat16, seed=0):
    """Gaussian rows whose magnitudes span ~10 decades, so tiles hit fp8 subnormals and the scale floor."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen) * 4)
    w[0, 0] = 3e4  # an outlier: most of its tile lands in fp8 subnormals or zero
    return w.to(dtype)


def assert_matches_reference(w, granularity, fmt, dtype=torch.bfloat16):
    tile = ref_tile(granularity, w.shape)
    q, scales = quantize(w, granularity, fmt)
    codes, ref_s = ref_quantize(to_f32(w), tile, fmt.dtype, mx=fmt.mx, bits=fmt.bits)
    assert q.dtype == fmt.dtype and q.shape == w.shape
    assert scales.dtype == torch.float32
    np.testing.assert_array_equal(bits(scales), ref_s.view(np.uint32))
    np.testing.assert_array_equal(bits(q), codes)
    deq = dequantize(q, scales, granularity, dtype)
    np.testing.assert_array_equal(bits(deq), ref_dequantize(codes, ref_s, tile, fmt.dtype, dtype))
    if fmt.integer:  # symmetric: the most negative code (-128, -8) is never written
        assert int(q.min()) >= -fmt.max


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_torch_cast_rounds_like_ml_dtypes(fp8):
    """The premise of the reference: torch's float32 -> fp8 cast is ml_dtypes' (nearest even)."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    values = torch.sort(codes[torch.isfinite(codes)].unique()).values
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, torch.nextafter(mids, values[1:]), torch.nextafter(mids, values[:-1]),
                   torch.randn(20000) * 100, torch.randn(20000) * 1e-3]).clamp(-constants(fp8)[0], constants(fp8)[0])
    np.testing.assert_array_equal(bits(x.to(fp8)), x.numpy().astype(NUMPY_FP8[fp8]).view(np.uint8))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (129, 257), (1, 1), (7, 1000)])
def test_quantize_bitwise_equals_reference(shape, granularity, fmt):
    assert_matches_reference(weight(shape), granularity, fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fmt_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_other_weight_dtypes(dtype, granularity, fmt):
    w = (torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    assert_matches_reference(w, granularity, fmt, dtype=dtype)


def test_float64_weight_is_rounded_to_float32_first():
    w = torch.randn(64, 96, dtype=torch.float64)
    q, s = quantize(w, PerRow())
    q32, s32 = quantize(w.float(), PerRow())
    assert torch.equal(bits_t(q), bits_t(q32)) and torch.equal(s, s32)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: str(f.dtype))
def test_clamp_before_cast_saturates(fmt):
    """Scales smaller than amax / max (as a stale or foreign scale would be) saturate to +-max, never NaN."""
    w = torch.tensor([[1e4, -1e4, 1.0, -float(fmt.max) - 1, 0.5]], dtype=torch.float32)
    q = torch.empty(w.shape, dtype=fmt.dtype)
    quantize_window_(q, w, torch.ones(1, 1), Window(0, 0, 1, 5), (1, 5))
    assert q.float().tolist() == [[fmt.max, -fmt.max, 1.0, -fmt.max, 0.5]]
    assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("fmt", FORMATS + [INT8, INT4], ids=fmt_id)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_zero_tensor_gets_min_scale_and_zero_codes(granularity, fmt):
    w = torch.zeros(130, 260, dtype=torch.bfloat16)
    q, s = quantize(w, granularity, fmt)
    assert torch.all(s == torch.tensor(fmt.min_scale, dtype=torch.float32))
    assert torch.all(bits_t(q) == 0)
    assert torch.equal(dequantize(q, s, granularity), w)


def test_zero_row_and_zero_block():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    w[5] = 0
    w[128:256, 0:128] = 0
    floor = torch.tensor(E4M3FN.min_scale, dtype=torch.float32)
    q, s = quantize(w, PerRow())
    assert s[5, 0] == floor and torch.all(bits_t(q[5]) == 0)
    assert torch.all(s[torch.arange(256) != 5] > floor)
    q, s = quantize(w, PerBlock((128, 128)))
    assert s[1, 0] == floor and torch.all(bits_t(q[128:, :128]) == 0)
    assert torch.all(s.flatten()[[0, 1, 3]] > floor)
    assert_matches_reference(w, PerRow(), E4M3FN, dtype=torch.float32)


def test_quantize_window_writes_in_place_into_any_layout():
    w = weight((300, 200))
    scales = compute_scales(w, PerBlock((128, 128)))
    expected, _ = quantize(w, PerBlock((128, 128)))
    out = torch.empty(200, 300, dtype=torch.float8_e4m3fn).t()  # a non-contiguous parameter
    ptr = out.data_ptr()
    result = quantize_window_(out, w, scales, Window(0, 0, 300, 200), (128, 128))
    assert result is out and out.data_ptr() == ptr
    assert torch.equal(bits_t(out.contiguous()), bits_t(expected))


def test_batch_dims_are_independent_weights():
    w = torch.stack([weight((200, 136), seed=s) for s in range(3)])
    w[1] = 0
    for granularity in GRANULARITIES:
        q, s = quantize(w, granularity)
        for e in range(3):
            qe, se = quantize(w[e], granularity)
            assert torch.equal(bits_t(q[e]), bits_t(qe)) and torch.equal(s[e], se)
        assert torch.equal(dequantize(q, s, granularity)[2], dequantize(q[2], s[2], granularity))


def test_round_trip_error_is_within_half_a_code_step():
    w = torch.randn(256, 512)
    for granularity in GRANULARITIES:
        q, s = quantize(w, granularity)
        err = (dequantize(q, s, granularity, torch.float32) - w).abs()
        # e4m3 has 3 mantissa bits: half a step is at most 2**-4 relative, plus the subnormal floor
        assert torch.all(err <= w.abs() * 2**-4 + s.max() * 2**-10)


def test_mismatched_arguments_are_rejected():
    w = torch.randn(64, 64)
    out = torch.empty(64, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="window"):
        quantize_window_(out, w, torch.ones(1, 1), Window(0, 0, 128, 64), (128, 128))
    with pytest.raises(ValueError, match="scale grid"):
        quantize_window_(out, w, torch.ones(2, 1), Window(0, 0, 64, 64), (64, 64))
    with pytest.raises(ValueError, match="float32"):
        quantize_window_(out, w, torch.ones(1, 1, dtype=torch.bfloat16), Window(0, 0, 64, 64), (64, 64))
    with pytest.raises(ValueError, match="output shape"):
        quantize_window_(out[:32], w, torch.ones(1, 1), Window(0, 0, 64, 64), (64, 64))
    with pytest.raises(ValueError, match="int32"):
        quantize(torch.ones(4, 4, dtype=torch.int32), PerRow())


@pytest.mark.parametrize("fmt", FORMATS + [INT8, INT4], ids=fmt_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unclamped_fast_path_equals_clamped_when_scales_cover_amax(fmt, dtype):
    """`scales_cover_amax=True` drops the clamp; with amax-derived scales that is bitwise the same.

    Random bit patterns (every exponent) per row, and rows made of values at and just below amax,
    where fl(amax / max) rounding pushes |w| / scale a hair above max.
    """
    gen = torch.Generator().manual_seed(7)
    int_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    info = torch.iinfo(int_dtype)
    raw = torch.randint(info.min, info.max, (64, 96), generator=gen, dtype=torch.int64).to(int_dtype).view(dtype)
    w = torch.where(torch.isfinite(raw), raw, torch.zeros((), dtype=dtype))
    top = torch.finfo(dtype).max if dtype != torch.float32 else 3e38
    amaxes = torch.logspace(-30, 30, 32, dtype=torch.float64).clamp(max=top).to(dtype)
    w[:32] = amaxes[:, None] * torch.linspace(-1, 1, 96, dtype=torch.float64).to(dtype)
    for granularity in GRANULARITIES:
        window, tile = Window(0, 0, *w.shape), ref_tile(granularity, w.shape)
        scales = scale_from_amax(window_amax(w, window, tile), fmt)
        fast, slow = (torch.empty(w.shape, dtype=fmt.dtype) for _ in range(2))
        quantize_window_(fast, w, scales, window, tile, scales_cover_amax=True, fmt=fmt)
        quantize_window_(slow, w, scales, window, tile, fmt=fmt)
        assert torch.equal(bits_t(fast), bits_t(slow)), granularity
        assert not torch.isnan(fast.float()).any()
