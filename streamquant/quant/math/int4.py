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

`Formula.COMPRESSED_TENSORS` is that library's own arithmetic (0.20 `calculate_qparams` and
`_quantize`, what llm-compressor 0.14's round-to-nearest W4A16_ASYM writes), every step in the
weight's dtype (bf16 for a bf16 model; float32 for float32), with lo = -min:

    scale = dt(dt(hi + lo) / 15)                            the range rounded to dt, then divided in dt
    zero  = round(clamp(dt(-8 - dt(-lo / scale)), -8, 7))   computed BEFORE the epsilon below
    scale = eps(dt) where scale == 0                       a zero group: zero 0 (the library's 0/0 zero
                                                            point is NaN; its int8 cast gives 0 on x86)
    q     = round(clamp(dt(dt(w / scale) + zero), -8, 7))

so its codes differ from the float32 formula's where a rounding to dt moves a value across a half.

Tensor parallelism as for every scheme: `window_range` gives this rank's [hi, lo] per tile of the
global grid (0 where the rank holds nothing, which never changes a range that always includes 0);
the ranks all-reduce it with MAX; every rank then derives the same scales and zero points.
"""

from __future__ import annotations

import torch

from streamquant.quant.math.convert import fp8_to_float32
from streamquant.quant.math.formula import Formula, formula_of
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


def _library_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


def range_scales(grid: torch.Tensor, formula: Formula = Formula.STREAMQUANT,
                 weight_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scales, int8 zero points) from a [2, ...] range grid of a `weight_dtype` weight (module doc)."""
    if formula_of(formula) is Formula.COMPRESSED_TENSORS:
        return _library_range_scales(grid, _library_dtype(weight_dtype))
    hi, lo = grid[0], grid[1]
    floor = torch.full((), MIN_SCALE, dtype=torch.float32, device=grid.device)
    levels = torch.full((), float(LEVELS), dtype=torch.float32, device=grid.device)
    scales = torch.maximum(torch.div(hi + lo, levels), floor)
    zero = torch.div(lo, scales).add_(Q_MIN).round_().clamp_(Q_MIN, Q_MAX).to(torch.int8)
    return scales, zero


def _library_range_scales(grid: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' scales and zero points, its operations in its order on `dtype` values (module doc)."""
    lowest, highest = grid[1].neg().to(dtype), grid[0].to(dtype)  # exact: values of a `dtype` weight
    scales = torch.div(highest - lowest, torch.full((), float(LEVELS), dtype=dtype, device=grid.device))
    zero = torch.full((), float(Q_MIN), device=grid.device) - torch.div(lowest, scales)  # stays in `dtype`
    zero = zero.clamp_(Q_MIN, Q_MAX).round_().nan_to_num_(0.0).to(torch.int8)
    eps = torch.full((), torch.finfo(dtype).eps, dtype=dtype, device=grid.device)
    return torch.where(scales == 0, eps, scales).float(), zero


def quantize_window_asymmetric_(out: torch.Tensor, w_local: torch.Tensor, scales: torch.Tensor,
                                zero_points: torch.Tensor, window: Window, tile: tuple[int, int],
                                formula: Formula = Formula.STREAMQUANT) -> torch.Tensor:
    """Write `clamp(round(w / scale) + zero, -8, 7)` (or `formula`'s codes, module doc) into int8 `out` in
    place; scales and zero points are this window's local tile grids."""
    base = (window.row0 // tile[0], window.col0 // tile[1])
    library = formula_of(formula) is Formula.COMPRESSED_TENSORS
    dtype = _library_dtype(w_local.dtype) if library else torch.float32
    scales, zeros = (scales.to(dtype), zero_points.to(dtype)) if library else (scales, zero_points.float())
    for offset, sub in torch_kernels.chunks(window, torch_kernels.chunk_rows(w_local, window, False)):
        src = w_local[..., offset : offset + sub.rows, :]
        dst = out[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            values = torch.div(torch_kernels.view(src, piece).to(dtype), torch_kernels.scale_view(scales, piece, base))
            if not library:
                values.round_()  # streamquant rounds before adding the (integer) zero point
            values.add_(torch_kernels.scale_view(zeros, piece, base)).clamp_(Q_MIN, Q_MAX)
            torch_kernels.view(dst, piece).copy_(values.round_() if library else values)
    return out


def quantize_asymmetric(w: torch.Tensor, group: tuple[int, int], formula: Formula = Formula.STREAMQUANT,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like `w`, float32 scales, int8 zero points) of a whole weight in `group` tiles
    (int4: (1, group_size)); what a layer computes for it at TP 1."""
    window = Window(0, 0, *w.shape[-2:])
    scales, zeros = range_scales(window_range(w, window, group), formula, w.dtype)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    return quantize_window_asymmetric_(codes, w, scales, zeros, window, group, formula), scales, zeros


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
