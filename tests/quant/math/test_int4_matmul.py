"""torch's CPU int4 kernel on streamquant's int4 codes (`quant/math/int4_matmul.py`), against numpy.

Codes are drawn as integers, packed by the numpy reference's own packing (`ref_pack_int4`), and the
reference product is `x @ ((q - zero_point) * scale).T` in float64. Two regimes:
  - exact: power-of-two scales, small-integer activations: every weight, zero and partial sum is
    exact in bf16 / float32, so the kernel's only rounding is the output's: bitwise bf16(reference).
    This pins the layout, the nibble offset, the group -> scale mapping and the zero folding.
  - realistic: float32 scales and normal activations: the scale and zero are rounded to bf16 (module
    doc), so the bound is the output rounding plus 2^-9 of sum |x| (|q| + |zp|) s, per element.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.quant.math import int4_matmul
from streamquant.quant.math.int4_matmul import (int4_kernel_linear, kernel_buffers, kernel_refusal,
                                                to_kernel_layout_)

from ..fp8_reference import ref_pack_int4, to_f32

SHAPES = [(16, 256), (80, 512), (208, 256)]  # 208: three 64-row blocks and a 16-row tail


def weight(rows: int, cols: int, group: int, symmetric: bool, exact: bool, seed: int = 0):
    """(int32 words, float32 scales, int8 zero points or None) and the float64 weight they stand for."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-7 if symmetric else -8, 8, size=(rows, cols)).astype(np.int8)
    groups = (rows, cols // group)
    if exact:
        scales = np.exp2(rng.integers(-6, -1, size=groups)).astype(np.float32)
    else:
        scales = (rng.random(groups, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    zeros = np.zeros(groups, np.int8) if symmetric else rng.integers(-8, 8, size=groups).astype(np.int8)
    expand = lambda g: np.repeat(g, group, axis=1)  # noqa: E731
    w = (q.astype(np.float64) - expand(zeros)) * expand(scales).astype(np.float64)
    size = (np.abs(q).astype(np.float64) + np.abs(expand(zeros))) * expand(scales)
    words = torch.from_numpy(ref_pack_int4(q.view(np.uint8)))
    return (words, torch.from_numpy(scales), None if symmetric else torch.from_numpy(zeros)), w, size


def kernel_product(tensors, rows: int, cols: int, group: int, x: torch.Tensor, bias=None) -> torch.Tensor:
    packed, sz = kernel_buffers(rows, cols, group)
    to_kernel_layout_(packed, sz, *tensors)
    return int4_kernel_linear(x, packed, sz, group, bias)


def activations(m: int, cols: int, exact: bool, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if exact:
        return (torch.randint(-8, 9, (m, cols), generator=gen) / 4).to(torch.bfloat16)
    return torch.randn(m, cols, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_exact_weights_give_the_bf16_rounded_reference_bitwise(group, symmetric, rows, cols):
    tensors, w, _ = weight(rows, cols, group, symmetric, exact=True)
    for m in (1, 3, 17):
        x = activations(m, cols, exact=True)
        y = kernel_product(tensors, rows, cols, group, x)
        ref = (to_f32(x).astype(np.float64) @ w.T).astype(np.float32)  # exact: every partial sum fits float32
        assert y.dtype == torch.bfloat16 and y.shape == (m, rows)
        np.testing.assert_array_equal(to_f32(y), to_f32(torch.from_numpy(ref).to(torch.bfloat16)))


@pytest.mark.parametrize("group", [32, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_float_scales_are_within_the_bf16_scale_and_zero_rounding(group, symmetric):
    rows, cols = 80, 1024
    tensors, w, size = weight(rows, cols, group, symmetric, exact=False)
    x = activations(5, cols, exact=False)
    xf = to_f32(x).astype(np.float64)
    ref, spread = xf @ w.T, np.abs(xf) @ size.T
    y = to_f32(kernel_product(tensors, rows, cols, group, x)).astype(np.float64)
    assert np.all(np.abs(y - ref) <= 2.0 ** -8 * np.abs(ref) + 2.0 ** -8 * spread)
    assert np.linalg.norm(y - ref) <= 4e-3 * np.linalg.norm(ref)  # measured 2.2-2.6e-3 (output rounding 1.7e-3)


def test_bias_is_added_to_the_product():
    tensors, w, _ = weight(16, 256, 64, True, exact=True)
    x, bias = activations(2, 256, exact=True), torch.arange(16, dtype=torch.bfloat16) / 8
    y = kernel_product(tensors, 16, 256, 64, x, bias)
    ref = (to_f32(x).astype(np.float64) @ w.T).astype(np.float32)
    expected = torch.from_numpy(ref).to(torch.bfloat16) + bias  # the kernel's rounding, then the bias's
    assert torch.equal(y, expected)


def test_leading_dims_and_non_contiguous_activations():
    tensors, w, _ = weight(16, 256, 32, False, exact=True)
    x = activations(6, 256, exact=True)
    flat = kernel_product(tensors, 16, 256, 32, x)
    assert torch.equal(kernel_product(tensors, 16, 256, 32, x.view(2, 3, 256)), flat.view(2, 3, 16))
    assert torch.equal(kernel_product(tensors, 16, 256, 32, x.t().contiguous().t()), flat)


def test_a_row_does_not_depend_on_the_batch():
    """The kernel is batch invariant (a row's result is the same whatever rows come with it)."""
    tensors, _, _ = weight(80, 512, 128, False, exact=False)
    x = activations(40, 512, exact=False)
    whole = kernel_product(tensors, 80, 512, 128, x)
    for start, m in [(0, 1), (7, 1), (3, 4), (10, 17)]:
        assert torch.equal(kernel_product(tensors, 80, 512, 128, x[start:start + m]), whole[start:start + m])


@pytest.mark.parametrize("rows", [16, 64, 208, 1040])
def test_chunked_conversion_is_the_whole_conversion(monkeypatch, rows):
    """Row chunks of whole 64-row blocks convert to the bytes of one conversion of the whole weight
    (fails if a torch version changes the packed layout's row blocks)."""
    cols = 96
    tensors, _, _ = weight(rows, cols, 32, True, exact=True)
    monkeypatch.setattr(int4_matmul, "CONVERT_CHUNK_ELEMENTS", 1)  # one 64-row block per chunk
    packed, sz = kernel_buffers(rows, cols, 32)
    to_kernel_layout_(packed, sz, *tensors)
    q = np.frombuffer(tensors[0].numpy().tobytes(), np.uint32).reshape(rows, -1)
    nibbles = ((q[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).reshape(rows, cols)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(nibbles.astype(np.int32)), 1)
    assert torch.equal(packed, whole)


def test_conversion_writes_every_element_of_fresh_buffers():
    """Codes -7..6 never make the byte 0xFF (two nibbles of 15), the packed buffer's sentinel."""
    rng = np.random.default_rng(0)
    q = rng.integers(-7, 7, size=(80, 256)).astype(np.int8)
    words = torch.from_numpy(ref_pack_int4(q.view(np.uint8)))
    scales = torch.rand(80, 4) + 0.5
    packed, sz = kernel_buffers(80, 256, 64)
    assert bool((packed == 0xFF).all()) and bool(sz.isnan().all())
    to_kernel_layout_(packed, sz, words, scales, torch.zeros(80, 4, dtype=torch.int8))
    assert not bool((packed == 0xFF).any()) and not bool(sz.isnan().any())
    assert torch.equal(sz[..., 0], scales.t().to(torch.bfloat16)) and bool((sz[..., 1] == 0).all())


@pytest.mark.parametrize("rows,cols,group,reason", [
    (16, 256, 16, "group size 16 is not one of"), (24, 256, 64, "output size 24 is not a multiple of 16"),
    (16, 96, 64, "input size 96 is not a multiple of the group size 64")])
def test_refusals_name_the_shape(rows, cols, group, reason):
    assert reason in kernel_refusal(rows, cols, group)
    if group in int4_matmul.KERNEL_GROUP_SIZES:  # what torch itself says about the same shape
        with pytest.raises(RuntimeError):
            nibbles = torch.zeros(rows, cols, dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, cols, dtype=torch.bfloat16), packed, group,
                                                       torch.zeros(cols // group, rows, 2, dtype=torch.bfloat16))
    assert kernel_refusal(16, 256, 64) is None


def test_buffers_that_do_not_fit_the_codes_are_refused():
    tensors, _, _ = weight(16, 256, 64, True, exact=True)
    packed, sz = kernel_buffers(32, 256, 64)
    with pytest.raises(ValueError, match="do not fit codes"):
        to_kernel_layout_(packed, sz, *tensors)
