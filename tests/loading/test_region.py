"""Regions (`loading/region.py`): the boxes a loader wrote, their narrowing, overlaps and volumes, checked
against element masks built from plain slices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.region import describe, full_region, narrow_region, overlaps, to_slices, volume

from .helpers import SETTINGS, SHAPES, boxes, region_mask


def test_full_region_to_slices_describe():
    assert full_region((64, 128)) == ((0, 64), (0, 128))
    assert full_region(()) == ()
    assert describe(((0, 64), (3, 128))) == "[0:64, 3:128]"
    t = torch.arange(24).reshape(2, 3, 4)
    assert torch.equal(t[to_slices(((1, 2), (0, 3), (1, 3)))], t[1:2, 0:3, 1:3])


@SETTINGS
@given(data=st.data(), shape=SHAPES)
def test_narrow_region_is_relative_to_the_region(data, shape):
    region = data.draw(boxes(shape))
    dim = data.draw(st.integers(0, len(shape) - 1))
    lo, hi = region[dim]
    start, length = data.draw(st.integers(-1, hi - lo + 1)), data.draw(st.integers(0, hi - lo + 1))
    if start < 0 or start + length > hi - lo:
        with pytest.raises(ValueError):
            narrow_region(region, dim, start, length)
        return
    narrowed = narrow_region(region, dim, start, length)
    assert narrowed == region[:dim] + ((lo + start, lo + start + length),) + region[dim + 1:]
    assert volume(narrowed) == int(region_mask(shape, [narrowed]).sum())


@SETTINGS
@given(data=st.data(), shape=SHAPES)
def test_overlaps_and_volume_match_masks(data, shape):
    a, b = data.draw(boxes(shape)), data.draw(boxes(shape))
    ma, mb = region_mask(shape, [a]), region_mask(shape, [b])
    assert volume(a) == int(ma.sum())
    assert overlaps(a, b) == overlaps(b, a) == bool((ma & mb).any())


def test_empty_region_overlaps_nothing():
    assert not overlaps(((2, 2),), ((0, 4),))
