"""Regions: which box of a parameter a weight loader wrote.

Every weight loader returns the regions it wrote, in the coordinates of the parameter as created
by `create_weights`. A region is a tuple of half-open `(start, stop)` ranges, one per dimension.
Loaders only ever narrow or index whole dimensions, so a box describes every write exactly; this is
what lets completion be tracked by what was written, never by the size of the incoming tensor.
"""

from __future__ import annotations

import math

import torch

Region = tuple[tuple[int, int], ...]


def full_region(shape: torch.Size | tuple[int, ...]) -> Region:
    """The box covering a whole tensor of `shape`."""
    return tuple((0, n) for n in shape)


def narrow_region(region: Region, dim: int, start: int, length: int) -> Region:
    """`region` narrowed along `dim` to `[start, start + length)` relative to its own start."""
    lo, hi = region[dim]
    if start < 0 or start + length > hi - lo:
        raise ValueError(f"narrow [{start}, {start + length}) outside dimension {dim} of size {hi - lo}")
    return region[:dim] + ((lo + start, lo + start + length),) + region[dim + 1 :]


def volume(region: Region) -> int:
    """Number of elements in `region`."""
    return math.prod(hi - lo for lo, hi in region)


def overlaps(a: Region, b: Region) -> bool:
    """Whether two boxes of the same tensor share at least one element."""
    return all(max(alo, blo) < min(ahi, bhi) for (alo, ahi), (blo, bhi) in zip(a, b))


def to_slices(region: Region) -> tuple[slice, ...]:
    """Index that selects `region` from the full tensor."""
    return tuple(slice(lo, hi) for lo, hi in region)


def describe(region: Region) -> str:
    """Compact human form, e.g. `[0:64, 0:128]`."""
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in region) + "]"
