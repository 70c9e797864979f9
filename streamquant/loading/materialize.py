"""Moving parameters between the meta device and real memory without changing their identity.

Streaming loads create checkpoint-format parameters on `meta` (no memory) and give them storage
only while their layer is in flight. `torch.utils.swap_tensors` keeps the Python object (so tied
modules, optimizers and dicts holding it stay valid), its class and its attributes
(`weight_loader`, `output_dim`, ...); only the storage changes.
"""

from __future__ import annotations

import torch


def _swap_storage(param: torch.Tensor, data: torch.Tensor) -> None:
    replacement = type(param).__new__(type(param), data)
    replacement.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, replacement)


def materialize_(param: torch.Tensor, device: torch.device | str, fill: float | None = None) -> None:
    """Give a meta parameter real (uninitialized, or `fill`-ed) storage on `device`."""
    if not param.is_meta:
        return
    data = torch.empty(param.shape, dtype=param.dtype, device=device)
    if fill is not None:
        data.fill_(fill)
    _swap_storage(param, data)


def release_(param: torch.Tensor) -> None:
    """Drop a parameter's storage: it goes back to `meta` with the same shape, dtype and attributes."""
    if param.is_meta:
        return
    _swap_storage(param, torch.empty(param.shape, dtype=param.dtype, device="meta"))
