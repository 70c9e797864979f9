"""The bucket layout of a weight sync (`rl/buckets.py`): every tensor in order, cast to the wire dtype (fp8
codes never cast), at 64-byte aligned, disjoint offsets, buckets within their size (an oversize tensor
alone)."""

from __future__ import annotations

import pytest
import torch

from streamquant.rl.buckets import plan_buckets

from .test_sync import _mixed_tensors


@pytest.mark.parametrize("bucket_bytes", [64, 1000, 1 << 20])
def test_plan_buckets_aligned_disjoint_and_bounded(bucket_bytes):
    items = _mixed_tensors(0)
    plan = plan_buckets(items, bucket_bytes, dtype=torch.bfloat16)
    entries = [e for b in plan for e in b.entries]
    assert [e.name for e in entries] == [n for n, _ in items]
    for (name, t), e in zip(items, entries):
        want = torch.bfloat16 if t.is_floating_point() and t.dtype.itemsize > 1 else t.dtype  # fp8 codes: never cast
        assert e.dtype == str(want).removeprefix("torch.") and e.shape == tuple(t.shape)
        assert e.nbytes == t.numel() * want.itemsize and e.offset % 64 == 0
    for b in plan:
        spans = sorted((e.offset, e.offset + e.nbytes) for e in b.entries)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
        assert b.nbytes == spans[-1][1]
        assert b.nbytes <= bucket_bytes or len(b.entries) == 1
