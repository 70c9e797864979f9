"""Weight parameters: `torch.nn.Parameter` subclasses that know how to take their shard.

Each parameter carries a `weight_loader` (a function of values, never a bound method of its layer,
so there is no parameter -> module -> parameter cycle) and the layout metadata the loader needs:
`output_dim` (column-parallel), `input_dim` (row-parallel), `packed_dim` / `packed_factor`.
The `load_*` methods narrow a full checkpoint tensor to this rank's shard and copy it into the
right slot of the parameter. Every method returns the list of regions it wrote
(`streamquant.loading.region`), which is what completion tracking counts.

Rank and size come from the `TPContext` value given at construction, never from globals.
Shape mismatches raise `WeightShapeError` (a `ValueError`) with both shapes. The per-tile tensors of
quantized weights (scales, zero points, group indices) are `loading/tiled.py`'s kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch

from streamquant.loading.region import Region, full_region, narrow_region, to_slices
from streamquant.parallel.context import TPContext

WeightLoader = Callable[..., list[Region]]

QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}


class WeightShapeError(ValueError):
    """A checkpoint tensor (or its shard) does not fit the parameter slot it is loaded into."""


def shard_id_as_int(shard_id: str | int) -> int:
    """`"q"/"k"/"v"` -> 0/1/2; integer ids pass through."""
    if isinstance(shard_id, int):
        return shard_id
    if shard_id not in QKV_SHARD_IDS:
        raise ValueError(f"unknown shard id {shard_id!r}; expected an int or one of q, k, v")
    return QKV_SHARD_IDS[shard_id]


def narrow_checked(t: torch.Tensor, dim: int, start: int, length: int, what: str, full: int) -> torch.Tensor:
    """`t.narrow(dim, start, length)` of a checkpoint tensor that must be exactly `full` long along `dim`.

    A tensor too short or too long (which narrowing would silently truncate) raises, naming both.
    """
    if t.dim() <= dim:
        raise WeightShapeError(f"{what}: expected a checkpoint tensor with a dim {dim}, received shape {tuple(t.shape)}")
    if t.shape[dim] != full:
        expected = tuple(full if d == dim else n for d, n in enumerate(t.shape))
        raise WeightShapeError(f"{what}: expected checkpoint shape {expected}, received {tuple(t.shape)}")
    return t.narrow(dim, start, length)


def write_region(param: torch.Tensor, region: Region, loaded: torch.Tensor) -> list[Region]:
    """Copy `loaded` into `region` of `param`; the single place where loaders write. Codes (integer or
    fp8 parameters) take exactly their dtype: a cast would wrap or re-round them."""
    dst = param.data[to_slices(region)]
    if loaded.dtype != dst.dtype and (not dst.is_floating_point() or dst.element_size() == 1):
        raise WeightShapeError(f"expected dtype {str(dst.dtype).removeprefix('torch.')}, received "
                               f"{str(loaded.dtype).removeprefix('torch.')} (codes are never cast)")
    if loaded.shape != dst.shape:
        if loaded.numel() == 1 and dst.numel() == 1:
            loaded = loaded.reshape(dst.shape)
        else:
            raise WeightShapeError(
                f"expected shape {tuple(dst.shape)}, received {tuple(loaded.shape)} "
                f"(parameter shape {tuple(param.shape)})"
            )
    dst.copy_(loaded)
    return [region]


class BaseParameter(torch.nn.Parameter):
    """A replicated parameter: the whole checkpoint tensor, shape-checked."""

    def __new__(cls, data: torch.Tensor, **kwargs):
        return super().__new__(cls, data=data, requires_grad=False)

    def __init__(self, data: torch.Tensor, weight_loader: WeightLoader, tp: TPContext = TPContext()):
        self.weight_loader = weight_loader
        self.tp = tp

    def _load_whole(self, loaded: torch.Tensor) -> list[Region]:
        return write_region(self, full_region(self.shape), loaded)

    def load_column_parallel_weight(self, loaded: torch.Tensor) -> list[Region]:
        return self._load_whole(loaded)

    def load_row_parallel_weight(self, loaded: torch.Tensor) -> list[Region]:
        return self._load_whole(loaded)

    def load_merged_column_weight(self, loaded: torch.Tensor, **kwargs) -> list[Region]:
        return self._load_whole(loaded)

    def load_qkv_weight(self, loaded: torch.Tensor, **kwargs) -> list[Region]:
        return self._load_whole(loaded)


class ColumnParameter(BaseParameter):
    """Split along `output_dim` across ranks (column parallelism and fused column layers)."""

    def __init__(self, output_dim: int, **kwargs):
        self.output_dim = output_dim
        super().__init__(**kwargs)

    def _packed_shard(self, shard_offset: int, shard_size: int) -> tuple[int, int]:
        return shard_offset, shard_size

    def load_column_parallel_weight(self, loaded: torch.Tensor) -> list[Region]:
        size = self.shape[self.output_dim]
        src = narrow_checked(loaded, self.output_dim, self.tp.rank * size, size, "column shard", size * self.tp.size)
        return write_region(self, full_region(self.shape), src)

    def _load_shard(self, loaded: torch.Tensor, shard_offset: int, shard_size: int, source_index: int, sources: int):
        shard_offset, shard_size = self._packed_shard(shard_offset, shard_size)
        region = narrow_region(full_region(self.shape), self.output_dim, shard_offset, shard_size)
        src = narrow_checked(
            loaded, self.output_dim, source_index * shard_size, shard_size, "fused shard", shard_size * sources)
        return write_region(self, region, src)

    def load_merged_column_weight(
        self, loaded: torch.Tensor, *, shard_offset: int, shard_size: int, **kwargs
    ) -> list[Region]:
        return self._load_shard(loaded, shard_offset, shard_size, self.tp.rank, self.tp.size)

    def load_qkv_weight(
        self,
        loaded: torch.Tensor,
        *,
        shard_id: str,
        shard_offset: int,
        shard_size: int,
        num_kv_head_replicas: int = 1,
        **kwargs,
    ) -> list[Region]:
        if shard_id_as_int(shard_id) == 0:  # q: every rank its own heads
            return self._load_shard(loaded, shard_offset, shard_size, self.tp.rank, self.tp.size)
        sources = self.tp.size // num_kv_head_replicas  # k/v: replicated when kv heads < ranks
        return self._load_shard(loaded, shard_offset, shard_size, self.tp.rank // num_kv_head_replicas, sources)


class RowParameter(BaseParameter):
    """Split along `input_dim` across ranks (row parallelism). 0-d tensors load as shape [1]."""

    def __init__(self, input_dim: int, **kwargs):
        self.input_dim = input_dim
        super().__init__(**kwargs)

    def load_row_parallel_weight(self, loaded: torch.Tensor) -> list[Region]:
        if loaded.dim() == 0:
            loaded = loaded.reshape(1)
        size = self.shape[self.input_dim]
        src = narrow_checked(loaded, self.input_dim, self.tp.rank * size, size, "row shard", size * self.tp.size)
        return write_region(self, full_region(self.shape), src)


class ModelWeightParameter(ColumnParameter, RowParameter):
    """A linear layer's weight: column and row parallel."""


def adjust_shard_indexes_for_packing(
    shard_size: int, shard_offset: int, packed_factor: int | Fraction, marlin_tile_size: int | None
) -> tuple[int, int]:
    """Shard size and offset in packed units (and marlin tiles when given)."""
    shard_size = round(shard_size // packed_factor)
    shard_offset = round(shard_offset // packed_factor)
    if marlin_tile_size is not None:
        return shard_size * marlin_tile_size, shard_offset * marlin_tile_size
    return shard_size, shard_offset


class _PackedMixin:
    """Packed storage (e.g. eight int4 values in one int32) along `packed_dim`."""

    def _init_packing(self, packed_factor: int | Fraction, packed_dim: int, marlin_tile_size: int | None):
        if packed_factor <= 0:
            raise ValueError(f"packed_factor must be positive, got {packed_factor}")
        self.packed_factor = packed_factor
        self.packed_dim = packed_dim
        self.marlin_tile_size = marlin_tile_size

    def adjust_shard_indexes_for_packing(self, shard_size: int, shard_offset: int) -> tuple[int, int]:
        return adjust_shard_indexes_for_packing(
            shard_size, shard_offset, self.packed_factor, self.marlin_tile_size
        )

    def _packed_shard(self, shard_offset: int, shard_size: int) -> tuple[int, int]:
        if self.packed_dim != self.output_dim:
            return shard_offset, shard_size
        size, offset = self.adjust_shard_indexes_for_packing(shard_size, shard_offset)
        return offset, size


class PackedParameter(_PackedMixin, ModelWeightParameter):
    """Packed storage (int4 codes, eight per int32 along the input), column and row parallel: a row-parallel
    shard narrows the packed input dim in packed units; fused shards packed along the output dim take
    their offsets in packed units (`adjust_shard_indexes_for_packing`)."""

    def __init__(self, packed_factor, packed_dim: int, marlin_tile_size: int | None = None, **kwargs):
        self._init_packing(packed_factor, packed_dim, marlin_tile_size)
        super().__init__(**kwargs)
