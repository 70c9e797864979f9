"""`int8_mm` (`quant/math/matmul.py`): the exact int8 product on every route, against numpy's int64 product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.quant.math.matmul import INT8_EXACT_DEPTH, INT_MM_CPU_MAX_ROWS, int8_mm


@pytest.mark.parametrize("rows", [1, INT_MM_CPU_MAX_ROWS, INT_MM_CPU_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("depth", [7, INT8_EXACT_DEPTH, 2 * INT8_EXACT_DEPTH + 5])
def test_int8_mm_is_the_exact_integer_product_on_every_route(rows, depth):
    """`torch._int_mm` (few rows) and the float32 route (more rows) both give numpy's int64 product,
    at the extremes too (every code +-127: the largest partial sums a slice can reach)."""
    gen = torch.Generator().manual_seed(depth)
    a = torch.randint(-127, 128, (rows, depth), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (depth, 33), generator=gen, dtype=torch.int8)
    a[0], b[:, 0], b[:, 1] = 127, 127, -127
    out = int8_mm(a, b)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), a.numpy().astype(np.int64) @ b.numpy().astype(np.int64))
