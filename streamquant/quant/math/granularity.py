"""Scale granularity and tensor-parallel windows: which tile of a global weight each element is in.

Owns the vocabulary (torchao's words): `PerTensor()`, `PerRow()` (one scale per output row, i.e.
per output channel) and `PerBlock(block_size)`, and the geometry that maps a rank's elements to the
tiles of the GLOBAL weight. Scales always belong to tiles of the global [R, C] weight, never of a
rank's shard, so a tile may straddle two ranks (out / tp not a multiple of the block, or a shard
smaller than one block); the ranks then agree on that tile's scale by all-reducing its amax.

A `Window` is the rectangle of the global weight that one rank holds: rows [row0, row0 + rows) and
cols [col0, col0 + cols). `window_pieces` cuts a window into at most 3 x 3 rectangular pieces
(a partial tile at the start, whole tiles, a partial tile at the end, per dimension) so that each
piece views as [n_row_tiles, tile_rows, n_col_tiles, tile_cols] without a copy: every per-tile
operation is then a reduction or a broadcast over that view, never an expanded per-element scale.

Weights may carry leading batch dimensions (experts: [E, out, in]); a window always describes the
last two dimensions and every batch element is an independent weight with its own tiles.

A fused parameter (q/k/v, gate/up) stacks its logical weights' local rows; `shard_layouts` says where
each one's rows and local tile grid sit (`ShardLayout`), which is what the per-tile tensors of
`loading/tiled.py` (scales, zero points, group indices) and the quantized methods share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole (global) weight."""


@dataclass(frozen=True)
class PerRow:
    """One scale per output row (output channel) of the global weight."""


@dataclass(frozen=True)
class PerBlock:
    """One scale per `block_size = (rows, cols)` tile; edge tiles of non-divisible shapes are partial."""

    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        block = tuple(self.block_size)
        if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
            raise ValueError(f"block_size must be two positive ints, got {self.block_size!r}")
        object.__setattr__(self, "block_size", block)


Granularity = Union[PerTensor, PerRow, PerBlock]


def tile_shape(granularity: Granularity, global_shape: tuple[int, int]) -> tuple[int, int]:
    """(tile_rows, tile_cols) of `granularity` on a global 2-D weight of `global_shape`."""
    rows, cols = global_shape
    if isinstance(granularity, PerTensor):
        return (rows, cols)
    if isinstance(granularity, PerRow):
        return (1, cols)
    if isinstance(granularity, PerBlock):
        return granularity.block_size
    raise TypeError(f"unknown granularity {granularity!r}")


def grid_shape(tile: tuple[int, int], global_shape: tuple[int, int]) -> tuple[int, int]:
    """Number of tiles (grid_rows, grid_cols) covering `global_shape`: a ceil-division."""
    return (-(-global_shape[0] // tile[0]), -(-global_shape[1] // tile[1]))


@dataclass(frozen=True)
class Window:
    """The rows [row0, row0 + rows) and cols [col0, col0 + cols) of a global [global_rows, global_cols] weight.

    `rows` / `cols` default to "up to the global edge", so `Window(0, 0, R, C)` is the whole weight.
    Column parallel rank k of tp: `Window(k * r, 0, r * tp, C, rows=r)`; row parallel:
    `Window(0, k * c, R, c * tp, cols=c)`. A window that disagrees with the tensor it describes is
    rejected by every function that takes both, so a forgotten `rows=` fails loudly.
    """

    row0: int
    col0: int
    global_rows: int
    global_cols: int
    rows: int | None = None
    cols: int | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            object.__setattr__(self, "rows", self.global_rows - self.row0)
        if self.cols is None:
            object.__setattr__(self, "cols", self.global_cols - self.col0)
        for start, size, total, dim in ((self.row0, self.rows, self.global_rows, "rows"),
                                        (self.col0, self.cols, self.global_cols, "cols")):
            if total < 1 or start < 0 or size < 0 or start + size > total:
                raise ValueError(f"window {dim} [{start}, {start + size}) outside a global size {total}: {self}")

    @property
    def global_shape(self) -> tuple[int, int]:
        return (self.global_rows, self.global_cols)

    @property
    def shape(self) -> tuple[int, int]:
        """The local (this rank's) 2-D shape."""
        return (self.rows, self.cols)

    def local_grid(self, tile: tuple[int, int]) -> tuple[slice, slice]:
        """The slices of the global tile grid this window touches (its local scale sub-grid)."""
        return (_tile_span(self.row0, self.rows, tile[0]), _tile_span(self.col0, self.cols, tile[1]))

    def sub(self, start: int, stop: int) -> Window:
        """The sub-window of local rows [start, stop) (used to process a window in row chunks)."""
        return Window(self.row0 + start, self.col0, self.global_rows, self.global_cols, stop - start, self.cols)


def _tile_span(start: int, size: int, tile: int) -> slice:
    return slice(start // tile, -(-(start + size) // tile)) if size else slice(start // tile, start // tile)


class LogicalShard(NamedTuple):
    """One logical weight of a (possibly fused) parameter: its name ("q", "gate", or "" when the
    parameter holds one weight) and this rank's window of it. A fused parameter stacks its logical
    shards' local rows in order; each logical weight has its own tiles and scales."""

    label: str
    window: Window


class Segment(NamedTuple):
    """A run of local indices [start, stop) covering `n` tiles of `length` elements each,
    the first being global tile `tile0`."""

    start: int
    stop: int
    n: int
    length: int
    tile0: int


def segments(start: int, size: int, tile: int) -> list[Segment]:
    """Cut the global range [start, start + size) into a partial head tile, whole tiles, a partial tail.

    Local indices count from `start`. A partial global edge tile (global size not divisible by
    `tile`) is simply a tail here: nothing beyond the window is ever touched.
    """
    out: list[Segment] = []
    pos, end = start, start + size
    if pos % tile and pos < end:
        stop = min(end, (pos // tile + 1) * tile)
        out.append(Segment(pos - start, stop - start, 1, stop - pos, pos // tile))
        pos = stop
    whole = (end - pos) // tile
    if whole:
        out.append(Segment(pos - start, pos - start + whole * tile, whole, tile, pos // tile))
        pos += whole * tile
    if pos < end:
        out.append(Segment(pos - start, end - start, 1, end - pos, pos // tile))
    return out


class Piece(NamedTuple):
    """A rectangle of a window whose rows are `row.n` tiles of `row.length` and cols likewise."""

    row: Segment
    col: Segment


def window_pieces(window: Window, tile: tuple[int, int]) -> list[Piece]:
    """The (at most 9) tile-uniform rectangles a window consists of, in row-major order."""
    rows = segments(window.row0, window.rows, tile[0])
    cols = segments(window.col0, window.cols, tile[1])
    return [Piece(r, c) for r in rows for c in cols]


def check_tile(tile: tuple[int, int]) -> None:
    if len(tile) != 2 or any(not isinstance(t, int) or t < 1 for t in tile):
        raise ValueError(f"a tile is two positive ints, got {tile!r}")



class ShardLayout(NamedTuple):
    """Where a logical shard lives: its window and tile, its rows in the parameter and in the per-tile
    tensors (its local tile grid's rows, stacked after the previous shards')."""

    label: str
    window: Window
    tile: tuple[int, int]
    rows: slice
    scale_rows: slice


def shard_layouts(shards: tuple[LogicalShard, ...], granularity: Granularity) -> list[ShardLayout]:
    """The logical shards stacked along rows, each with its tile and local scale-grid rows."""
    out, row, scale_row = [], 0, 0
    for label, window in shards:
        tile = tile_shape(granularity, window.global_shape)
        grid_rows, _ = window.local_grid(tile)
        n = grid_rows.stop - grid_rows.start
        out.append(ShardLayout(label, window, tile, slice(row, row + window.rows), slice(scale_row, scale_row + n)))
        row, scale_row = row + window.rows, scale_row + n
    return out


def grid_columns(layouts: list[ShardLayout]) -> int:
    """The local tile-grid columns the logical shards of one parameter share (they must agree)."""
    cols = set()
    for lay in layouts:
        span = lay.window.local_grid(lay.tile)[1]
        cols.add(span.stop - span.start)
    if len(cols) != 1:
        raise ValueError(f"logical shards of one parameter must share their column tiles, got {sorted(cols)}")
    return cols.pop()


def whole_columns(layouts: list[ShardLayout]) -> list[ShardLayout]:
    """The layouts with windows over every input column (rows unchanged): per-tile tensors a rank keeps
    whole along the input, as act-order scales are (any column of the rank's may use any group)."""
    return [lay._replace(window=Window(lay.window.row0, 0, lay.window.global_rows, lay.window.global_cols,
                                       rows=lay.window.rows)) for lay in layouts]


def column_layouts(layouts: list[ShardLayout]) -> list[ShardLayout]:
    """One grid row per logical shard and one tile per input column (a tile of all the shard's rows):
    the layout of per-column tensors such as act-order group indices (`g_idx`)."""
    return [lay._replace(tile=(lay.window.global_rows, 1), scale_rows=slice(i, i + 1))
            for i, lay in enumerate(layouts)]
