"""Shared helpers for the loading tests: NaN-sentinel parameters and exact-write checks.

Every weight loader returns the regions it wrote. The check used throughout: fill the parameter
with NaN, load, then the elements inside the returned regions are exactly the expected values and
every element outside them is still NaN. Region arithmetic here is re-implemented on purpose
(masks built from plain slices), so it does not lean on `streamquant.loading.region`.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from streamquant.loading.parameters import ColumnParameter, PackedParameter, RowParameter
from streamquant.parallel.context import TPContext

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# for a property already parametrized over the 3-4 parameter classes (so ~100 examples per property)
PER_CLASS = settings(SETTINGS, max_examples=25)
# region shapes of up to 3 dims (loading/test_region.py, test_coverage.py)
SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=3)


def nan_tensor(shape) -> torch.Tensor:
    return torch.full(tuple(shape), float("nan"))


def unused_loader(param, loaded, **kwargs):
    raise AssertionError("the tests call the load_* methods directly")


def build(cls, shape, tp: TPContext, *, output_dim=None, input_dim=None, packed_factor=1, packed_dim=None,
          marlin_tile_size=None):
    """A NaN-filled `cls` of `shape`, given only the constructor arguments `cls` takes."""
    kwargs = dict(data=nan_tensor(shape), weight_loader=unused_loader, tp=tp)
    if issubclass(cls, ColumnParameter):
        kwargs["output_dim"] = output_dim
    if issubclass(cls, RowParameter):
        kwargs["input_dim"] = input_dim
    if issubclass(cls, PackedParameter):
        kwargs["packed_factor"] = packed_factor
        kwargs["packed_dim"] = output_dim if packed_dim is None else packed_dim
        kwargs["marlin_tile_size"] = marlin_tile_size
    return cls(**kwargs)


def region_mask(shape, regions) -> torch.Tensor:
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    for region in regions:
        assert isinstance(region, tuple) and len(region) == len(shape), region
        for (lo, hi), n in zip(region, shape):
            assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= n, region
        mask[tuple(slice(lo, hi) for lo, hi in region)] = True
    return mask


def assert_written(param: torch.Tensor, regions, expected: torch.Tensor) -> None:
    """`regions` (disjoint) cover exactly the non-NaN elements of `expected`; `param` equals `expected`."""
    assert isinstance(regions, list), type(regions)
    mask = region_mask(param.shape, regions)
    volume = sum(math.prod(hi - lo for lo, hi in r) for r in regions)
    assert volume == int(mask.sum()), f"returned regions overlap: {regions}"
    assert torch.equal(mask, ~expected.isnan()), f"returned regions {regions} differ from what should be written"
    data = param.detach()
    assert not data[mask].isnan().any(), "an element inside a returned region was not written"
    assert data[~mask].isnan().all(), "an element outside the returned regions was written"
    assert torch.equal(data[mask], expected[mask])


def put(expected: torch.Tensor, dim: int, start: int, values: torch.Tensor) -> None:
    """expected[..., start:start + len, ...] (along `dim`) = values."""
    index = [slice(None)] * expected.dim()
    index[dim] = slice(start, start + values.shape[dim])
    expected[tuple(index)] = values


def mentions_shape(message: str, shape) -> bool:
    shape = tuple(shape)
    return str(shape) in message or str(list(shape)) in message


def heads_of_rank(total: int, n: int, r: int) -> list[int]:
    """Attention heads rank r holds: a 1/n share, or (fewer heads than ranks) the head its group of
    n // total consecutive ranks replicates."""
    if total >= n:
        return list(range(r * total // n, (r + 1) * total // n))
    return [r // (n // total)]


def expected_qkv(q, k, v, heads, kv_heads, head_size, n, r):
    def rows(t, total):
        return t.reshape(total, head_size, *t.shape[1:])[heads_of_rank(total, n, r)].reshape(-1, *t.shape[1:])
    return torch.cat([rows(q, heads), rows(k, kv_heads), rows(v, kv_heads)])


@st.composite
def boxes(draw, shape, allow_empty=False):
    """A box of `shape`: non-empty in every dim (or, with `allow_empty`, possibly empty)."""
    region = []
    for n in shape:
        lo = draw(st.integers(0, n if allow_empty else n - 1))
        region.append((lo, draw(st.integers(lo if allow_empty else lo + 1, n))))
    return tuple(region)
