"""StagingPool: released storage is reused by the next parameter that fits, and idle memory is bounded."""

from __future__ import annotations

import torch

from streamquant.loading.materialize import StagingPool, materialize_, release_
from streamquant.loading.parameters import BaseParameter


def meta_param(shape, dtype=torch.bfloat16):
    return BaseParameter(data=torch.empty(shape, dtype=dtype, device="meta"), weight_loader=None)


def test_released_storage_is_reused_by_a_fitting_parameter():
    pool = StagingPool()
    big, small, tiny = meta_param((64, 32)), meta_param((32, 32), torch.float16), meta_param((4, 4))
    materialize_(big, "cpu", pool=pool)
    address = big.untyped_storage().data_ptr()
    release_(big, pool)
    assert big.is_meta and big.shape == (64, 32) and big.dtype == torch.bfloat16
    materialize_(small, "cpu", fill=float("nan"), pool=pool)  # half the bytes: fits within max_waste
    assert small.untyped_storage().data_ptr() == address
    assert small.shape == (32, 32) and small.dtype == torch.float16 and torch.isnan(small).all()
    materialize_(tiny, "cpu", pool=pool)  # 1/128 of the buffer: too wasteful, gets its own memory
    assert tiny.untyped_storage().data_ptr() != address


def test_idle_buffers_are_bounded_and_the_largest_kept():
    pool = StagingPool(keep=1)
    params = [meta_param((n, 8)) for n in (8, 32, 16)]
    for p in params:
        materialize_(p, "cpu", pool=pool)
    addresses = [p.untyped_storage().data_ptr() for p in params]
    for p in params:
        release_(p, pool)
    assert pool.idle_bytes == 32 * 8 * 2  # only the largest buffer is kept
    again = meta_param((32, 8))
    materialize_(again, "cpu", pool=pool)
    assert again.untyped_storage().data_ptr() == addresses[1]
    assert pool.idle_bytes == 0
    release_(again, pool)
    pool.clear()
    assert pool.idle_bytes == 0
