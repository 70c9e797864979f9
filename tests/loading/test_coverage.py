"""Coverage (`loading/coverage.py`): exact completion from the regions loaders wrote (the regions
themselves: test_region.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.coverage import Coverage, DuplicateWriteError
from streamquant.loading.region import volume

from .helpers import SETTINGS, SHAPES, boxes, region_mask


def test_same_region_same_source_counts_once():
    cov = Coverage((4, 2))
    cov.add(((0, 4), (0, 2)), "w")
    cov.add(((0, 4), (0, 2)), "w")
    assert cov.written == 8 and cov.complete and cov.sources == {"w"}


def test_same_region_different_source_raises():
    cov = Coverage((4,))
    cov.add(((0, 4),), "a.weight")
    with pytest.raises(DuplicateWriteError) as info:
        cov.add(((0, 4),), "b.weight")
    assert isinstance(info.value, ValueError)
    assert "a.weight" in str(info.value) and "b.weight" in str(info.value)


def test_overlapping_regions_from_different_sources_raise():
    cov = Coverage((4, 4))
    cov.add(((0, 2), (0, 4)), "gate")
    with pytest.raises(DuplicateWriteError, match=r"\[1:3, 2:3\]"):
        cov.add(((1, 3), (2, 3)), "up")
    cov.add(((2, 4), (0, 4)), "up")  # the disjoint rest is still accepted
    assert cov.complete


@st.composite
def grid_partition(draw):
    """A shape cut into a grid of disjoint boxes, in random order."""
    shape = draw(SHAPES)
    cuts = []
    for n in shape:
        inner = draw(st.lists(st.integers(1, n - 1), unique=True)) if n > 1 else []
        points = [0, *sorted(inner), n]
        cuts.append(list(zip(points, points[1:])))
    return shape, draw(st.permutations(list(itertools.product(*cuts))))


@SETTINGS
@given(case=grid_partition(), drop=st.integers(0, 10**6))
def test_complete_exactly_when_disjoint_regions_cover_everything(case, drop):
    shape, regions = case
    cov = Coverage(shape)
    assert cov.numel == int(torch.zeros(shape).numel())
    for i, region in enumerate(regions):
        assert not cov.complete
        cov.add(region, f"t{i % 2}")
        cov.add(region, f"t{i % 2}")  # a repeat by the same tensor changes nothing
    assert cov.complete and cov.written == cov.numel
    partial = Coverage(shape)
    skipped = drop % len(regions)
    for i, region in enumerate(regions):
        if i != skipped:
            partial.add(region, f"t{i}")
    assert not partial.complete
    assert partial.written == cov.numel - volume(regions[skipped])
    assert f"{partial.written} of {partial.numel}" in partial.summary()


def test_zero_dim_parameter():
    cov = Coverage(())
    assert not cov.complete
    cov.add((), "scale")
    assert cov.complete and cov.numel == 1


@SETTINGS
@given(data=st.data(), shape=st.lists(st.integers(1, 8), min_size=1, max_size=3))
def test_coverage_refuses_exactly_the_writes_that_meet_an_earlier_one(data, shape):
    """Many regions, in any order: `add` raises iff an element mask says the box meets an earlier box
    of another source (the bisected first-dimension index never misses a clash, never invents one)."""
    cov, written = Coverage(shape), torch.zeros(shape, dtype=torch.bool)
    for i in range(data.draw(st.integers(1, 12))):
        region = data.draw(boxes(shape))
        mask = region_mask(shape, [region])
        if bool((mask & written).any()):
            with pytest.raises(DuplicateWriteError):
                cov.add(region, f"t{i}")
        else:
            cov.add(region, f"t{i}")
            written |= mask
        assert cov.written == int(written.sum())
    assert cov.complete == bool(written.all())
