"""fp8 codes -> float32 through integer ops equals torch's own cast for every code, NaN included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from streamquant.quant.math.convert import fp8_to_float32

FORMATS = {torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e4m3fnuz: ml_dtypes.float8_e4m3fnuz}


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_every_code_equals_the_cast_and_ml_dtypes(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    got = fp8_to_float32(codes.view(dtype))
    torch_cast = codes.view(dtype).float()
    independent = torch.from_numpy(codes.numpy().view(FORMATS[dtype]).astype(np.float32))
    assert got.dtype == torch.float32
    assert torch.equal(got.isnan(), torch_cast.isnan()) and torch.equal(got.isnan(), independent.isnan())
    finite = ~independent.isnan()
    assert int(finite.sum()) == (254 if dtype == torch.float8_e4m3fn else 255)
    # bit patterns, so that -0.0 and +0.0 are told apart
    assert torch.equal(got[finite].view(torch.int32), independent[finite].view(torch.int32))
    assert torch.equal(got[finite].view(torch.int32), torch_cast[finite].view(torch.int32))


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_strided_batched_views_keep_their_shape(dtype):
    codes = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = codes.view(dtype)[:, 5:33, 7:61:2]  # not contiguous
    got, expected = fp8_to_float32(view), view.float()
    assert got.shape == view.shape and got.is_contiguous()
    assert torch.equal(got.nan_to_num(1234.5), expected.nan_to_num(1234.5))


def test_other_dtypes_take_the_plain_cast():
    x = torch.randn(5, 3).bfloat16()
    assert torch.equal(fp8_to_float32(x), x.float())
