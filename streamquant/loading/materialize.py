"""Moving parameters between the meta device and real memory without changing their identity.

Streaming loads create checkpoint-format parameters on `meta` (no memory) and give them storage
only while their layer is in flight. `torch.utils.swap_tensors` keeps the Python object (so tied
modules, optimizers and dicts holding it stay valid), its class and its attributes
(`weight_loader`, `output_dim`, ...); only the storage changes.

A `StagingPool` (one per load) keeps the storage of released parameters and hands it to the next
parameter of the same shape, dtype and device: layer after layer of a model reuses the same few
buffers. Their pages are already mapped (no page faults, no allocator churn), and the allocator
cannot strand freed layers in a fragmented heap, which on glibc raised the resident peak of a
1 GB load by a quarter. The pool keeps at most `keep` free buffers per key.
"""

from __future__ import annotations

import torch


class StagingPool:
    """Free buffers by (shape, dtype, device), reused by `materialize_` and refilled by `release_`."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, torch.device(device)))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        free = self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), [])
        if len(free) < self.keep:
            free.append(tensor)

    def clear(self) -> None:
        self._free.clear()


def _swap_storage(param: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Give `param` the storage of `data`; returns a tensor holding `param`'s previous storage."""
    replacement = type(param).__new__(type(param), data)
    replacement.requires_grad_(param.requires_grad)
    replacement.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, replacement)
    return replacement


def materialize_(param: torch.Tensor, device: torch.device | str, fill: float | None = None,
                 pool: StagingPool | None = None) -> None:
    """Give a meta parameter real (uninitialized, or `fill`-ed) storage on `device` (from `pool` if given)."""
    if not param.is_meta:
        return
    if pool is not None:
        data = pool.take(param.shape, param.dtype, device)
    else:
        data = torch.empty(param.shape, dtype=param.dtype, device=device)
    if fill is not None:
        data.fill_(fill)
    _swap_storage(param, data)


def release_(param: torch.Tensor, pool: StagingPool | None = None) -> None:
    """Drop a parameter's storage (into `pool` if given): it goes back to `meta`, same shape, dtype, attributes."""
    if param.is_meta:
        return
    old = _swap_storage(param, torch.empty(param.shape, dtype=param.dtype, device="meta"))
    if pool is not None:
        pool.give(old.detach())
