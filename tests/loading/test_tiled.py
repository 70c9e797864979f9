"""Per-tile parameters (`loading/tiled.py`): every rank keeps exactly the tiles of the GLOBAL grid its
window touches (a tile straddling two ranks on both), in its logical shard's rows; packed zero points in
packed rows; group indices split with the input. Expected cuts are computed here from the tile
arithmetic (ceil / floor of window edges), not with the library's `local_grid`; NaN sentinels show
every write and every non-write."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.parameters import WeightShapeError, write_region
from streamquant.loading.tiled import (BlockQuantScaleParameter, ChannelQuantScaleParameter, GroupIndexParameter,
                                       GroupQuantScaleParameter, PackedColumnParameter, PerTensorScaleParameter,
                                       tiles_loader)
from streamquant.quant.math.granularity import (LogicalShard, PerBlock, PerRow, PerTensor, Window, column_layouts,
                                                shard_layouts, whole_columns)

from .helpers import SETTINGS, assert_written, nan_tensor


def tile_span(start: int, size: int, tile: int) -> tuple[int, int]:
    return start // tile, math.ceil((start + size) / tile)


def column_windows(rows: int, cols: int, n: int, r: int) -> Window:
    return Window(r * (rows // n), 0, rows, cols, rows=rows // n)


def row_windows(rows: int, cols: int, n: int, r: int) -> Window:
    return Window(0, r * (cols // n), rows, cols, cols=cols // n)


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), n=st.integers(1, 4), tile=st.tuples(st.integers(1, 5),
       st.integers(1, 5)), column=st.booleans())
def test_each_rank_keeps_the_tiles_its_window_touches(rows, cols, n, tile, column):
    rows, cols = rows * n, cols * n
    grid = torch.randn(math.ceil(rows / tile[0]), math.ceil(cols / tile[1])).abs() + 0.1
    for r in range(n):
        window = (column_windows if column else row_windows)(rows, cols, n, r)
        layouts = shard_layouts((LogicalShard("", window),), PerBlock(tile))
        (r0, r1), (c0, c1) = tile_span(window.row0, window.rows, tile[0]), tile_span(window.col0, window.cols, tile[1])
        p = BlockQuantScaleParameter(nan_tensor((r1 - r0, c1 - c0)), layouts=layouts)
        assert_written(p, tiles_loader(p, grid), grid[r0:r1, c0:c1])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_fused_qkv_scales_fill_their_own_rows(n):
    """Per-channel scales of q (8 rows), k and v (4 rows each; with n = 4 kv replicated over 2 ranks)."""
    full = {"q": torch.rand(8, 1) + 0.5, "k": torch.rand(4, 1) + 0.5, "v": torch.rand(4, 1) + 0.5}
    for r in range(n):
        kv_rows = 4 // min(n, 2)
        kv_start = (r // max(1, n // 2)) * kv_rows
        shards = (LogicalShard("q", Window(r * 8 // n, 0, 8, 16, rows=8 // n)),
                  LogicalShard("k", Window(kv_start, 0, 4, 16, rows=kv_rows)),
                  LogicalShard("v", Window(kv_start, 0, 4, 16, rows=kv_rows)))
        p = ChannelQuantScaleParameter(nan_tensor((8 // n + 2 * kv_rows, 1)), layouts=shard_layouts(shards, PerRow()))
        expected, regions = nan_tensor(p.shape), []
        for sid in "vqk":
            regions += tiles_loader(p, full[sid], shard_id=sid, shard_offset=0, shard_size=0)
        expected[: 8 // n] = full["q"][r * 8 // n: (r + 1) * 8 // n]
        expected[8 // n: 8 // n + kv_rows] = full["k"][kv_start: kv_start + kv_rows]
        expected[8 // n + kv_rows:] = full["v"][kv_start: kv_start + kv_rows]
        assert_written(p, regions, expected)


def test_per_tensor_scales_of_moe_experts_one_by_one_or_all_at_once():
    shards = (LogicalShard("gate", Window(4, 0, 8, 16, rows=4)), LogicalShard("up", Window(4, 0, 8, 16, rows=4)))
    layouts = shard_layouts(shards, PerTensor())
    p = PerTensorScaleParameter(nan_tensor((3, 2, 1)), layouts=layouts)
    regions = tiles_loader(p, torch.tensor(2.0), shard_id="w1", expert_id=1)  # 0-d, as per-tensor scales come
    regions += tiles_loader(p, torch.tensor([3.0]), shard_id="w3", expert_id=1)
    expected = nan_tensor((3, 2, 1))
    expected[1] = torch.tensor([[2.0], [3.0]])
    assert_written(p, regions, expected)
    every = PerTensorScaleParameter(nan_tensor((3, 2, 1)), layouts=layouts)
    expected = nan_tensor((3, 2, 1))
    expected[:, 1] = torch.tensor([[1.0], [2.0], [4.0]])
    assert_written(every, tiles_loader(every, torch.tensor([[1.0], [2.0], [4.0]]), shard_id="w3"), expected)
    with pytest.raises(WeightShapeError, match="expert id 3 out of range for 3 experts"):
        tiles_loader(p, torch.tensor(1.0), shard_id="w1", expert_id=3)


def test_packed_zero_points_land_in_packed_rows_of_their_shard():
    """Zero points of q (32 rows) and k (16) at TP 2: words 2 (q) and 1 (k) per rank, in groups of 4 columns."""
    full = {sid: torch.randint(-2**31, 2**31 - 1, (rows // 8, 3), dtype=torch.int32) for sid, rows in (("q", 32),
                                                                                                  ("k", 16))}
    for r in range(2):
        shards = (LogicalShard("q", Window(16 * r, 0, 32, 12, rows=16)), LogicalShard("k", Window(8 * r, 0, 16, 12,
                                                                                                 rows=8)))
        layouts = shard_layouts(shards, PerBlock((1, 4)))
        p = PackedColumnParameter(torch.zeros(3, 3, dtype=torch.int32), layouts=layouts)
        tiles_loader(p, full["k"], shard_id="k")
        tiles_loader(p, full["q"], shard_id="q")
        assert torch.equal(p.detach(), torch.cat([full["q"][2 * r: 2 * r + 2], full["k"][r: r + 1]]))


def test_packed_zero_points_refuse_a_shard_that_does_not_start_on_a_word():
    shards = (LogicalShard("q", Window(4, 0, 8, 16, rows=4)),)  # rank 1 of 2: rows 4..8, half a word
    with pytest.raises(ValueError, match="zero points pack 8 output rows per int32.*rows \\[4, 8\\)"):
        PackedColumnParameter(torch.zeros(0, 1, dtype=torch.int32), layouts=shard_layouts(shards, PerBlock((1, 16))))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_act_order_scales_are_whole_and_group_indices_follow_the_input(n):
    """A row-parallel layer: every rank keeps every group's scale, and its own columns' group indices."""
    scales, g_idx = torch.rand(4, 3) + 0.5, torch.randperm(12).to(torch.int32) // 4
    for r in range(n):
        layouts = shard_layouts((LogicalShard("", row_windows(4, 12, n, r)),), PerBlock((1, 4)))
        s = GroupQuantScaleParameter(nan_tensor((4, 3)), layouts=whole_columns(layouts))
        assert_written(s, tiles_loader(s, scales), scales)
        index = GroupIndexParameter(torch.full((1, 12 // n), -1, dtype=torch.int32), layouts=column_layouts(layouts),
                                    num_groups=3)
        tiles_loader(index, g_idx)
        assert torch.equal(index.detach()[0], g_idx[r * 12 // n: (r + 1) * 12 // n])


def test_bad_values_and_shapes_are_named():
    layouts = shard_layouts((LogicalShard("", Window(0, 0, 4, 8)),), PerBlock((1, 4)))
    s = GroupQuantScaleParameter(nan_tensor((4, 2)), layouts=layouts)
    with pytest.raises(WeightShapeError, match=r"scale of shape \[4, 3\] is not the \[4, 2\] grid of a \[4, 8\] "
                                               "weight in groups of 4 input columns"):
        tiles_loader(s, torch.ones(4, 3))
    with pytest.raises(WeightShapeError, match="scales must be positive"):
        tiles_loader(s, torch.zeros(4, 2))
    index = GroupIndexParameter(torch.zeros(1, 8, dtype=torch.int32), layouts=column_layouts(layouts), num_groups=2)
    with pytest.raises(WeightShapeError, match=r"group indices must lie in \[0, 2\), got \[0, 2\]"):
        tiles_loader(index, torch.tensor([0, 1, 2, 0, 1, 0, 1, 0], dtype=torch.int32))
    with pytest.raises(WeightShapeError, match="no logical weight 'x'"):
        tiles_loader(s, torch.ones(4, 2), shard_id="x")
    assert s.detach().isnan().all()
    with pytest.raises(ValueError, match="per-channel scale covers one whole row"):
        ChannelQuantScaleParameter(nan_tensor((4, 2)), layouts=layouts)


def test_codes_are_never_cast_into_an_integer_parameter():
    codes = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(WeightShapeError, match="expected dtype int32, received int64"):
        write_region(codes, ((0, 2), (0, 2)), torch.ones(2, 2, dtype=torch.int64))
