"""Per-tile parameters: the scales, zero points and group indices of quantized weights, each taken from
the GLOBAL grid of its logical weight.

A quantized weight has one scale (zero point) per tile of its GLOBAL logical weight (q, k, v, gate,
up, one expert's down: `quant.math.granularity`), whatever the tensor-parallel split; a checkpoint
stores that grid whole, per logical weight. A per-tile parameter is [*batch, rows, cols]: the local
grids of the layer's logical shards stacked along rows (`ShardLayout.scale_rows`), sharing their
columns. `load_tiles(loaded, shard_id, expert_id)` picks the logical shard (q/k/v, a merged index, an
MoE shard id w1 / w3 / w2, one expert or all), checks the grid's shape and values, cuts out the tiles
this rank's window touches and writes them. A tile that straddles two ranks (a block or group split
by the tensor-parallel cut) is kept by both, its one value serving both halves, never refused. One
mechanism for every kind (vLLM's names; they differ in the tiles they accept and the values they check):
  - `PerTensorScaleParameter`: one scale per logical weight (fp8 per tensor);
  - `ChannelQuantScaleParameter`: one per output row (fp8-channel, int8);
  - `GroupQuantScaleParameter`: one per output row and group of input columns (int4); with act order
    the layouts span every input column (`granularity.whole_columns`), so each rank keeps every group;
  - `BlockQuantScaleParameter`: one per block (fp8-block; MXFP8's 1 x 32 blocks);
  - `PackedColumnParameter`: int4 zero points, stored as compressed-tensors writes them: the int4 value
    + 8 of eight consecutive output rows in one int32 (row 8k + i in bits [4i, 4i + 4)), one column per
    group. Rows count in packed units (`adjust_shard_indexes_for_packing` places q, k and v); every
    logical shard's rows on a rank must start and end on a word (a multiple of 8 rows);
  - `GroupIndexParameter`: act order's group index of every input column (`g_idx`), one row per logical
    shard (q, k and v each keep their own), split along the input like the weight.
Scales must be positive; group indices in [0, groups). None of them has a `weight_loader`: they are
derived tensors of a quant method, written from a checkpoint only through `tiles_loader` (a method's
`quantized_loaders`), so a high-precision load never waits for them.
"""

from __future__ import annotations

import torch

from streamquant.loading.parameters import WeightShapeError, adjust_shard_indexes_for_packing, write_region
from streamquant.loading.region import Region
from streamquant.quant.math.granularity import ShardLayout, grid_shape

# MoE shard ids (`layers.moe`) -> the logical shard labels of w13 / w2.
MOE_SHARD_LABELS = {"w1": "gate", "w3": "up", "w2": "down"}
PACK_FACTOR = 8  # int4 zero points per int32


class TiledParameter(torch.nn.Parameter):
    """A per-tile tensor of one (possibly fused) quantized parameter; see the module doc."""

    packed_factor = 1  # tile rows per stored row

    def __new__(cls, data: torch.Tensor, **kwargs):
        return super().__new__(cls, data=data, requires_grad=False)

    def __init__(self, data: torch.Tensor, layouts: tuple[ShardLayout, ...] | list[ShardLayout]):
        self.layouts = tuple(layouts)
        for lay in self.layouts:
            self.check_layout(lay)

    def check_layout(self, lay: ShardLayout) -> None:
        """Refuse a layout whose tile this kind does not describe (at creation, naming the shard)."""

    def check_values(self, local: torch.Tensor) -> None:
        """Refuse values this kind cannot hold (raises `WeightShapeError`, a ValueError)."""

    def layout(self, shard_id) -> ShardLayout:
        """The logical shard a checkpoint tensor with this `shard_id` fills."""
        if shard_id is None:
            if len(self.layouts) != 1:
                raise WeightShapeError(f"one tensor for the fused weights {[lay.label for lay in self.layouts]} "
                                       "cannot be split; expected one per logical weight")
            return self.layouts[0]
        if isinstance(shard_id, int):
            return self.layouts[shard_id]
        label = MOE_SHARD_LABELS.get(shard_id, shard_id)
        found = [lay for lay in self.layouts if lay.label == label]
        if not found:
            raise WeightShapeError(f"no logical weight {shard_id!r} among {[lay.label for lay in self.layouts]}")
        return found[0]

    def stored_grid(self, lay: ShardLayout) -> tuple[int, int]:
        """The global grid of a logical weight as stored (rows in packed units)."""
        rows, cols = grid_shape(lay.tile, lay.window.global_shape)
        return rows // self.packed_factor, cols

    def stored_rows(self, rows: slice) -> slice:
        """Tile rows -> stored rows (packed units)."""
        return slice(rows.start // self.packed_factor, rows.stop // self.packed_factor)

    def slot(self, lay: ShardLayout) -> tuple[int, int]:
        """The stored rows of `lay`'s local grid in this parameter."""
        size, offset = adjust_shard_indexes_for_packing(lay.scale_rows.stop - lay.scale_rows.start,
                                                        lay.scale_rows.start, self.packed_factor, None)
        return offset, offset + size

    def load_tiles(self, loaded: torch.Tensor, shard_id=None, expert_id: int | None = None) -> list[Region]:
        """Write this rank's tiles of one logical weight's GLOBAL grid (one expert's, or with
        `expert_id=None` on an expert stack every expert's) into its rows."""
        lay = self.layout(shard_id)
        batch = tuple(self.shape[:-2])
        experts = (0, batch[0]) if batch else None
        if expert_id is not None:
            if not batch or not 0 <= expert_id < batch[0]:
                raise WeightShapeError(f"expert id {expert_id} out of range for {batch[0] if batch else 0} experts")
            loaded, experts, batch = loaded.unsqueeze(0), (expert_id, expert_id + 1), (1,)
        grid = batch + self.stored_grid(lay)
        if loaded.numel() != torch.Size(grid).numel() or (loaded.dim() > 1 and loaded.shape[-1] != grid[-1]):
            raise WeightShapeError(f"{self.what} of shape {list(loaded.shape)} is not the {list(grid[-2:])} grid "
                                   f"of a {list(lay.window.global_shape)} weight" + self.grid_hint(lay))
        rows, cols = lay.window.local_grid(lay.tile)
        local = loaded.reshape(grid)[..., self.stored_rows(rows), cols]
        self.check_values(local)
        region = (experts,) if experts is not None else ()
        return write_region(self, region + (self.slot(lay), (0, self.shape[-1])), local)

    what = "per-tile tensor"

    def grid_hint(self, lay: ShardLayout) -> str:
        return ""


def tiles_loader(param: TiledParameter, loaded: torch.Tensor, shard_id=None, expert_id: int | None = None,
                 **kwargs) -> list[Region]:
    """The loader of every per-tile parameter: `param.load_tiles` (the mapping's other kwargs unused)."""
    return param.load_tiles(loaded, shard_id, expert_id)


class _Scales(TiledParameter):
    what = "scale"

    def check_values(self, local: torch.Tensor) -> None:
        if not bool((local > 0).all()):
            raise WeightShapeError("scales must be positive (dequantization multipliers); found one <= 0")


class PerTensorScaleParameter(_Scales):
    """One scale per logical weight: [*batch, logical shards, 1]."""

    def check_layout(self, lay: ShardLayout) -> None:
        if lay.tile != lay.window.global_shape:
            raise ValueError(f"a per-tensor scale covers its whole weight, not tiles of {lay.tile}")


class ChannelQuantScaleParameter(_Scales):
    """One scale per output row: [*batch, rows, 1]."""

    def check_layout(self, lay: ShardLayout) -> None:
        if lay.tile != (1, lay.window.global_cols):
            raise ValueError(f"a per-channel scale covers one whole row, not tiles of {lay.tile}")


class GroupQuantScaleParameter(_Scales):
    """One scale per output row and group of input columns: [*batch, rows, groups on this rank]."""

    def check_layout(self, lay: ShardLayout) -> None:
        if lay.tile[0] != 1:
            raise ValueError(f"a group scale covers one row of a group, not tiles of {lay.tile}")

    def grid_hint(self, lay: ShardLayout) -> str:
        return f" in groups of {lay.tile[1]} input columns"


class BlockQuantScaleParameter(_Scales):
    """One scale per block: [*batch, block rows, block cols on this rank]."""


class PackedColumnParameter(GroupQuantScaleParameter):
    """int4 zero points, eight output rows per int32 (compressed-tensors' layout): [*batch, rows / 8, groups]."""

    packed_factor = PACK_FACTOR
    what = "packed zero point"

    def check_layout(self, lay: ShardLayout) -> None:
        super().check_layout(lay)
        rows = lay.window.local_grid(lay.tile)[0]
        for n in (lay.scale_rows.start, lay.scale_rows.stop, rows.start, rows.stop):
            if n % PACK_FACTOR:
                raise ValueError(f"zero points pack {PACK_FACTOR} output rows per int32; logical weight "
                                 f"{lay.label or '(whole)'} has rows [{rows.start}, {rows.stop}) on this rank")

    def check_values(self, local: torch.Tensor) -> None:
        """Every int32 is eight valid nibbles."""


class GroupIndexParameter(TiledParameter):
    """Act order: the group of every input column, per logical weight: [*batch, logical shards, input columns]."""

    what = "group index (g_idx)"

    def __init__(self, data: torch.Tensor, layouts, num_groups: int):
        self.num_groups = num_groups
        super().__init__(data, layouts)

    def check_layout(self, lay: ShardLayout) -> None:
        if lay.tile != (lay.window.global_rows, 1):
            raise ValueError(f"a group index has one entry per input column, not tiles of {lay.tile}")

    def check_values(self, local: torch.Tensor) -> None:
        if local.numel() and not (0 <= int(local.min()) and int(local.max()) < self.num_groups):
            raise WeightShapeError(f"group indices must lie in [0, {self.num_groups}), got "
                                   f"[{int(local.min())}, {int(local.max())}]")
