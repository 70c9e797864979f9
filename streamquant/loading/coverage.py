"""Exact completion tracking: which regions of each parameter were written, and by which tensor.

A region written twice by the same checkpoint tensor (a loader that writes, then transforms in
place) counts once. A region written by two different checkpoint tensors is an error. A parameter
is complete when the disjoint regions written add up to all its elements; nothing is counted from
the size of incoming tensors.
"""

from __future__ import annotations

import bisect
import math

import torch

from streamquant.loading.region import Region, describe, overlaps, volume


class DuplicateWriteError(ValueError):
    """Two checkpoint tensors wrote the same elements of one parameter."""


class Coverage:
    """Regions written into one parameter."""

    def __init__(self, shape: torch.Size | tuple[int, ...]):
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.written = 0
        self._regions: dict[Region, str] = {}
        # Regions grouped by their first dimension's range, the ranges kept sorted: a new region is
        # compared only with groups whose range meets its own, found by bisection (an MoE stack's 2 x E
        # expert regions: ~2 comparisons each instead of 2 x E, which made a 128-expert refit quadratic).
        self._by_first: dict[tuple[int, int], list[Region]] = {}
        self._firsts: list[tuple[int, int]] = []  # the keys of `_by_first`, sorted
        self._longest_first = 0  # the longest first-dimension range recorded

    def add(self, region: Region, source: str) -> None:
        """Record that `source` wrote `region`; raises `DuplicateWriteError` on a clash."""
        previous = self._regions.get(region)
        if previous == source:
            return
        first = region[0] if region else (0, 1)  # a 0-dim parameter: one region, as if of one row
        # a group meeting `first` starts in (first.lo - longest, first.hi): bisect that span
        start = bisect.bisect_right(self._firsts, (first[0] - self._longest_first, math.inf))
        stop = bisect.bisect_left(self._firsts, (first[1], -math.inf))
        for key in self._firsts[start:stop]:
            for other in self._by_first[key]:
                if overlaps(region, other):
                    raise DuplicateWriteError(f"{source!r} writes {describe(region)}, which {self._regions[other]!r} "
                                              f"already wrote ({describe(other)})")
        self._regions[region] = source
        if first not in self._by_first:
            self._by_first[first] = []
            bisect.insort(self._firsts, first)
            self._longest_first = max(self._longest_first, first[1] - first[0])
        self._by_first[first].append(region)
        self.written += volume(region)

    @property
    def complete(self) -> bool:
        return self.written == self.numel

    def source_at(self, index: tuple[int, ...]) -> str | None:
        """The checkpoint tensor that wrote element `index` (None if nothing did)."""
        for region, source in self._regions.items():
            if all(start <= i < stop for i, (start, stop) in zip(index, region)):
                return source
        return None

    @property
    def sources(self) -> set[str]:
        return set(self._regions.values())

    def summary(self) -> str:
        return f"{self.written} of {self.numel} elements written (shape {list(self.shape)})"
