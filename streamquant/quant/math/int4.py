"""Asymmetric int4 (with zero points): the formula and its window kernels (`int4` with symmetric=False).

Per group (tile) of the GLOBAL weight, with q_min = -8 and q_max = 7 (the stored nibble is q + 8):

    hi    = max(max w, 0),  lo = max(-min w, 0)            exact (a max of the weight's own values)
    scale = max((hi + lo) / 15, 1 / (15 * 512))             float32, true IEEE division
    zero  = clamp(round(-8 + lo / scale), -8, 7)            round half to even, stored as int8
    q     = clamp(round(w / scale) + zero, -8, 7)           int8
    w    ~= (q - zero) * scale

compressed-tensors' asymmetric int formula (range including 0, `q_min - min / scale` zero points),
in float32 with streamquant's floor instead of an epsilon. A zero group gets the floor scale and zero
point -8 + 0 = -8, so its codes are -8 and dequantize to exactly 0.

Act order (GPTQ's `desc_act`, compressed-tensors' `actorder="group"`): the columns of one group are
scattered over the input; `dequantize_grouped` takes each column's group from its group index
(`g_idx`), `(q - zero[:, g_idx[j]]) * scale[:, g_idx[j]]`, symmetric codes with no zero point.

Tensor parallelism as for every scheme: `window_range` gives this rank's [hi, lo] per tile of the
global grid (0 where the rank holds nothing, which never changes a range that always includes 0);
the ranks all-reduce it with MAX; every rank then derives the same scales and zero points.
"""

from __future__ import annotations

import torch

from streamquant.quant.math.convert import fp8_to_float32
from streamquant.quant.math import torch_kernels
from streamquant.quant.math.granularity import Window, grid_shape, window_pieces

Q_MIN, Q_MAX = -8, 7
LEVELS = Q_MAX - Q_MIN  # 15 steps between the extreme codes
MIN_SCALE = 1.0 / (LEVELS * 512.0)


def window_range(w_local: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """float32 [2, ..., grid_rows, grid_cols]: per tile of the global grid, max(max w, 0) and
    max(-min w, 0) over this rank's elements (NaN propagates; reduce across ranks with MAX)."""
    batch = tuple(w_local.shape[:-2])
    grid = torch.zeros((2,) + batch + grid_shape(tile, window.global_shape), dtype=torch.float32,
                       device=w_local.device)
    for offset, sub in torch_kernels.chunks(window, torch_kernels.chunk_rows(w_local, window, False)):
        rows = w_local[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            view = torch_kernels.view(rows, piece)
            hi, lo = torch_kernels.grid_part(grid[0], piece, (0, 0)), torch_kernels.grid_part(grid[1], piece, (0, 0))
            torch.maximum(hi, view.amax(dim=(-3, -1)).float(), out=hi)
            torch.maximum(lo, view.amin(dim=(-3, -1)).float().neg_(), out=lo)
    return grid


def range_scales(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scales, int8 zero points) from a [2, ...] range grid (module doc)."""
    hi, lo = grid[0], grid[1]
    floor = torch.full((), MIN_SCALE, dtype=torch.float32, device=grid.device)
    levels = torch.full((), float(LEVELS), dtype=torch.float32, device=grid.device)
    scales = torch.maximum(torch.div(hi + lo, levels), floor)
    zero = torch.div(lo, scales).add_(Q_MIN).round_().clamp_(Q_MIN, Q_MAX).to(torch.int8)
    return scales, zero


def quantize_window_asymmetric_(out: torch.Tensor, w_local: torch.Tensor, scales: torch.Tensor,
                                zero_points: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """Write `clamp(round(w / scale) + zero, -8, 7)` into int8 `out` in place; scales and zero points
    are this window's local tile grids."""
    base = (window.row0 // tile[0], window.col0 // tile[1])
    zeros = zero_points.float()
    for offset, sub in torch_kernels.chunks(window, torch_kernels.chunk_rows(w_local, window, False)):
        src = w_local[..., offset : offset + sub.rows, :]
        dst = out[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            values = torch.div(torch_kernels.view(src, piece).float(), torch_kernels.scale_view(scales, piece, base)).round_()  # never in place
            values.add_(torch_kernels.scale_view(zeros, piece, base)).clamp_(Q_MIN, Q_MAX)
            torch_kernels.view(dst, piece).copy_(values)
    return out


def dequantize_window_asymmetric(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, window: Window,
                                 tile: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """`(q - zero) * scale` per tile, in `dtype` (a new tensor shaped like `q`)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    base = (window.row0 // tile[0], window.col0 // tile[1])
    zeros = zero_points.float()
    for offset, sub in torch_kernels.chunks(window, torch_kernels.chunk_rows(q, window, False)):
        src = q[..., offset : offset + sub.rows, :]
        dst = out[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            values = fp8_to_float32(torch_kernels.view(src, piece)).sub_(torch_kernels.scale_view(zeros, piece, base))
            torch_kernels.view(dst, piece).copy_(values.mul_(torch_kernels.scale_view(scales, piece, base)))
    return out


def dequantize_grouped(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, g_idx: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """`(q - zero[..., g]) * scale[..., g]` for every column j with g = g_idx[..., j], in `dtype` (rounded once):
    q int8 [..., rows, cols], scales float32 and zero points int8 [..., rows, groups], g_idx [..., cols]."""
    index = g_idx.long().unsqueeze(-2).expand(*q.shape)
    values = q.float()
    if zero_points is not None:
        values.sub_(torch.gather(zero_points, -1, index).float())
    return values.mul_(torch.gather(scales, -1, index)).to(dtype)
