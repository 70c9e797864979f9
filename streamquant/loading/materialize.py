"""Moving parameters between the meta device and real memory without changing their identity.

Streaming loads create checkpoint-format parameters on `meta` (no memory) and give them storage
only while their layer is in flight. `torch.utils.swap_tensors` keeps the Python object (so tied
modules, optimizers and dicts holding it stay valid), its class and its attributes
(`weight_loader`, `output_dim`, ...); only the storage changes.
"""

from __future__ import annotations

import math

import torch


FLAT_ALIGN = 64  # bytes: a tensor placed at a multiple of this in a flat uint8 buffer can take any dtype


def align_up(nbytes: int, alignment: int = FLAT_ALIGN) -> int:
    """`nbytes` rounded up to a multiple of `alignment`."""
    return -(-nbytes // alignment) * alignment


def byte_view(flat: torch.Tensor, offset: int, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A `dtype` tensor of `shape` over the bytes of the flat uint8 buffer `flat` starting at `offset`."""
    nbytes = math.prod(shape) * dtype.itemsize
    return flat[offset:offset + nbytes].view(dtype).view(shape)


class StagingPool:
    """Flat byte buffers reused by the checkpoint-format parameters of one load.

    `release_` returns a parameter's storage here and `materialize_` carves the next parameter
    out of the smallest free buffer that holds it (and is at most `max_waste` times its size), so
    layer after layer of a model runs on the same buffer: its pages stay mapped (no page faults
    and zeroing on every layer) and at most `keep` idle buffers are held. Measured on a 1 GB,
    28-layer bf16 -> fp8 load (CPU): keep=1 peak 1.03-1.04x the final model and 1.35-1.5x the
    bf16 load time; no pool 1.03x and 1.7-2.1x; one buffer per shape (30 MB idle) 1.09x.
    """

    def __init__(self, keep: int = 1, max_waste: int = 4, pin_memory: bool = False):
        self.keep = keep
        self.max_waste = max_waste
        self.pin_memory = pin_memory  # host buffers page-locked (for fast copies to CUDA)
        self._free: list[torch.Tensor] = []

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as buffers report it
        fits = [i for i, b in enumerate(self._free)
                if b.device == device and nbytes <= b.numel() <= self.max_waste * max(nbytes, 1)]
        if fits:
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            pin = self.pin_memory and device.type == "cpu"
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        return byte_view(flat, 0, shape, dtype)

    def give(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, 0, (storage.nbytes(),))
        self._free.append(flat)
        if len(self._free) > self.keep:
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    @property
    def idle_bytes(self) -> int:
        """Bytes held in free buffers."""
        return sum(b.numel() for b in self._free)

    def clear(self) -> None:
        self._free.clear()


def swap_storage(param: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Give `param` the storage of `data` (same object, class and attributes); returns a tensor
    holding the previous storage."""
    if isinstance(param, torch.nn.Parameter):
        replacement = type(param).__new__(type(param), data, requires_grad=param.requires_grad)
    else:
        replacement = type(param).__new__(type(param), data)
        replacement.requires_grad_(param.requires_grad)
    replacement.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, replacement)
    return replacement


def materialize_(param: torch.Tensor, device: torch.device | str, fill: float | None = None,
                 pool: StagingPool | None = None) -> None:
    """Give a meta parameter real (uninitialized, or `fill`-ed) storage on `device`, from `pool` if given."""
    if not param.is_meta:
        return
    if pool is not None:
        data = pool.take(param.shape, param.dtype, device)
    else:
        data = torch.empty(param.shape, dtype=param.dtype, device=device)
    if fill is not None:
        data.fill_(fill)
    swap_storage(param, data)


def release_(param: torch.Tensor, pool: StagingPool | None = None) -> None:
    """Drop a parameter's storage (into `pool` if given): back to `meta`, same shape, dtype, attributes."""
    if param.is_meta:
        return
    old = swap_storage(param, torch.empty(param.shape, dtype=param.dtype, device="meta"))
    if pool is not None:
        pool.give(old.detach())
