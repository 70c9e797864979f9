"""Reading quantized weights back: dequantization, per-row multipliers, the quantization error.

Shared by the matmuls (`scaled.linear`) and the load's error log (`scaled.online`); works on every code
format of `code_format.py` (packed int4 codes are unpacked first, asymmetric ones use their zero points,
packed eight rows per int32; with act order each input column takes its group's scale and zero point by
its group index, `int4.dequantize_grouped`).
"""

from __future__ import annotations

import time
import torch

from streamquant.parallel.context import TPContext, all_reduce
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.granularity import ShardLayout
from streamquant.quant.math.quantize import dequantize_window
from streamquant.quant.math.int4 import dequantize_grouped, dequantize_window_asymmetric
from streamquant.quant.math.int4_pack import unpack_int4, unpack_int4_rows



def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, layouts: list[ShardLayout],
                      dtype: torch.dtype, zero_points: torch.Tensor | None = None,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """`codes.float() * scale` (`(codes - zero) * scale` with zero points) for every logical shard, in
    `dtype` (a new tensor shaped like the unpacked codes; packed int4 codes and zero points are unpacked
    first); with `g_idx` (act order, [..., shards, input columns]) column j of shard i takes group g_idx[i, j]."""
    if codes.dtype == torch.int32:
        codes = unpack_int4(codes)
    if zero_points is not None and zero_points.dtype == torch.int32:
        zero_points = unpack_int4_rows(zero_points)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for i, lay in enumerate(layouts):
        shard_codes, shard_scales = codes[..., lay.rows, :], scales[..., lay.scale_rows, :]
        if g_idx is not None:
            zeros = None if zero_points is None else zero_points[..., lay.scale_rows, :]
            out[..., lay.rows, :] = dequantize_grouped(shard_codes, shard_scales, zeros, g_idx[..., i, :], dtype)
        elif zero_points is None:  # each shard straight into its rows of `out`
            dequantize_window(shard_codes, shard_scales, lay.window, lay.tile, dtype, out=out[..., lay.rows, :])
        else:
            out[..., lay.rows, :] = dequantize_window_asymmetric(shard_codes, shard_scales,
                                                                 zero_points[..., lay.scale_rows, :], lay.window,
                                                                 lay.tile, dtype)
    return out


def _dequantize_shard(codes, scales, zero_points, window, tile, dtype) -> torch.Tensor:
    if zero_points is None:
        return dequantize_window(codes, scales, window, tile, dtype)
    return dequantize_window_asymmetric(codes, scales, zero_points, window, tile, dtype)


def row_scales(scales: torch.Tensor, layouts: list[ShardLayout]) -> torch.Tensor:
    """Per-output-row float32 multipliers [..., rows] for granularities with one tile column
    (per tensor, per row): a per-tensor shard's scale repeated over its rows."""
    parts = []
    for lay in layouts:
        grid = scales[..., lay.scale_rows, 0]
        first = lay.window.row0 // lay.tile[0]
        tile_of_row = torch.arange(lay.window.row0, lay.window.row0 + lay.window.rows, device=scales.device)
        parts.append(grid[..., tile_of_row // lay.tile[0] - first])
    return torch.cat(parts, dim=-1)


ERROR_CHUNK_ELEMENTS = 1 << 20  # float32 temporaries of the error measurement: a few MB at a time


def _shard_energy(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, lay: ShardLayout,
                  zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """[sum w^2, sum (w - dequant)^2] of one logical shard in float64, over row chunks."""
    out = torch.zeros(2, dtype=torch.float64, device=w.device)
    step = max(1, ERROR_CHUNK_ELEMENTS // max(1, w[..., :1, :].numel()))
    base = lay.window.local_grid(lay.tile)[0].start
    for start in range(0, lay.window.rows, step):
        sub = lay.window.sub(start, min(start + step, lay.window.rows))
        grid = sub.local_grid(lay.tile)[0]
        rows = slice(lay.rows.start + start, lay.rows.start + start + sub.rows)
        grid_rows = slice(lay.scale_rows.start + grid.start - base, lay.scale_rows.start + grid.stop - base)
        part_zeros = None if zero_points is None else zero_points[..., grid_rows, :]
        deq = _dequantize_shard(codes[..., rows, :], scales[..., grid_rows, :], part_zeros, sub, lay.tile, torch.float32)
        chunk = w[..., rows, :].float()
        out[1] += deq.sub_(chunk).square_().sum(dtype=torch.float64)
        out[0] += chunk.square_().sum(dtype=torch.float64)  # in place: one float32 temporary less
    return out


def record_error(layer, name, slot, codes, layouts, tp: TPContext, error_log: QuantErrorLog, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None) -> None:
    """Signal and error energy per logical shard (summed over ranks and experts) into `error_log`;
    `codes` unpacked (int4: the int8 codes before packing), `scales` / `zeros` (int8) the local tile grids
    the codes were made with."""
    start = time.perf_counter()
    sums = torch.cat([_shard_energy(slot, codes, scales, lay, zeros) for lay in layouts])
    sums = all_reduce(sums, tp).cpu()
    prefix = getattr(layer, "prefix", "")
    for i, lay in enumerate(layouts):
        label = f"{prefix}.{name}" + (f"[{lay.label}]" if lay.label else "")
        error_log.record(label, float(sums[2 * i]), float(sums[2 * i + 1]))
    error_log.seconds += time.perf_counter() - start
