"""Exact completion tracking: which regions of each parameter were written, and by which tensor.

A region written twice by the same checkpoint tensor (a loader that writes, then transforms in
place) counts once. A region written by two different checkpoint tensors is an error. A parameter
is complete when the disjoint regions written add up to all its elements; nothing is counted from
the size of incoming tensors.
"""

from __future__ import annotations

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

    def add(self, region: Region, source: str) -> None:
        """Record that `source` wrote `region`; raises `DuplicateWriteError` on a clash."""
        previous = self._regions.get(region)
        if previous == source:
            return
        for other, other_source in self._regions.items():
            if overlaps(region, other):
                raise DuplicateWriteError(
                    f"{source!r} writes {describe(region)}, which {other_source!r} already wrote ({describe(other)})"
                )
        self._regions[region] = source
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
