"""Online quantization of a loaded layer weight: the checkpoint-format parameter in, the codes, scales (int4
zero points, group indices) of `weights.py` written in place.

Tensor parallelism: tiles belong to the GLOBAL logical weight (`granularity.py`). At TP > 1 the
ranks all-reduce their global amax grids with MAX, one small collective per layer (grids are a
few KB; a rank's tiles outside its window hold 0), so tiles that straddle ranks get one scale and
every rank's codes are bitwise the TP=1 codes of its shard. A non-finite amax is replaced by +inf
before that reduction, so every rank sees it and every rank raises: none waits forever in a later
collective. The reduction runs even where no tile straddles ranks, for exactly that reason.

Act order (a model loaded from a GPTQ-style checkpoint, then refit with high-precision weights): the
new weight is quantized in contiguous groups (what `quantize` writes for it), its group indices set
to `column // group_size`, its scales (zero points) stored for every group of the input: the reduced
global grid is whole on every rank anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from streamquant.loading.errors import NonFiniteWeightError
from streamquant.parallel.context import TPContext, all_reduce
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.formula import Formula, formula_of
from streamquant.quant.math.int4 import quantize_window_asymmetric_, range_scales, window_range
from streamquant.quant.math.int4_pack import pack_int4, pack_rows
from streamquant.quant.math.quantize import (formula_scales, local_scales, quantize_local_tiles_, quantize_window_,
                                             window_amax)
from streamquant.quant.scaled.readback import record_error
from streamquant.quant.scaled.weights import ScaledWeightSpec, ShardLayout, scale_layouts, shard_layouts


def _reduce_max_(grids: list[torch.Tensor], tp: TPContext) -> None:
    flat = torch.cat([g.flatten() for g in grids])
    all_reduce(flat, tp, dist.ReduceOp.MAX)
    for g, part in zip(grids, flat.split([g.numel() for g in grids])):
        g.copy_(part.view_as(g))


def _first_non_finite(w: torch.Tensor, row_offset: int) -> tuple[int, ...]:
    index = [int(i) for i in (~torch.isfinite(w)).nonzero()[0]]
    index[-2] += row_offset
    return tuple(index)


def _amax_grids(layer, name: str, slot: torch.Tensor, layouts: list[ShardLayout], tp: TPContext,
                measure=window_amax, measured: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Per-shard global amax grids (or what `measure` takes per tile: `int4.window_range`; a
    shard's grid in `measured` is taken as it is), reduced over ranks with MAX; raises on NaN / Inf."""
    measured = measured or [None] * len(layouts)
    grids = [grid if grid is not None else measure(slot[..., lay.rows, :], lay.window, lay.tile)
             for lay, grid in zip(layouts, measured)]
    local_bad = None
    for lay, grid in zip(layouts, grids):
        bad = ~torch.isfinite(grid)
        if bool(bad.any()):
            local_bad = local_bad or _first_non_finite(slot[..., lay.rows, :], lay.rows.start)
            grid[bad] = float("inf")
    if tp.size > 1:
        _reduce_max_(grids, tp)
    where = f"layer {getattr(layer, 'prefix', '')!r}, parameter {name!r}"
    if local_bad is not None:
        raise NonFiniteWeightError(f"{where} holds NaN or Inf (element {list(local_bad)}); refusing to quantize it",
                                   param=name, index=local_bad)
    if any(not bool(torch.isfinite(g).all()) for g in grids):
        raise NonFiniteWeightError(f"{where}: another tensor-parallel rank's shard holds NaN or Inf", param=name)
    return grids


def _store(param: torch.Tensor, lay: ShardLayout, stored: ShardLayout, grid: torch.Tensor) -> torch.Tensor:
    """Write `stored`'s cut of the global `grid` into `lay`'s rows of `param`; returns `lay`'s own cut
    (the tiles its codes use: the stored rows themselves unless act order keeps more columns)."""
    local = param[..., lay.scale_rows, :]
    local.copy_(local_scales(grid, stored.window, lay.tile))
    return local if stored is lay else local_scales(grid, lay.window, lay.tile)


def _set_group_index_(layer, name: str, layouts: list[ShardLayout]) -> None:
    """Act order after a high-precision quantization: every column in its contiguous group."""
    g_idx = getattr(layer, f"{name}_g_idx", None)
    if g_idx is None:
        return
    for i, lay in enumerate(layouts):
        columns = torch.arange(lay.window.col0, lay.window.col0 + lay.window.cols, device=g_idx.device)
        g_idx.detach()[..., i, :] = (columns // lay.tile[1]).to(torch.int32)


@torch.no_grad()
def quantize_layer_weight_(layer: torch.nn.Module, name: str, spec: ScaledWeightSpec, tp: TPContext,
                           error_log: QuantErrorLog | None = None) -> bool:
    """Quantize `layer.checkpoint_params[name]` into `layer.<name>` and its per-tile tensors (in place).

    Returns False (and does nothing) when the checkpoint-format parameter holds no data (`meta`):
    nothing was loaded (a pre-quantized load wrote the codes themselves), or the load already released it.
    """
    slot = layer.checkpoint_params[name]
    if slot.is_meta:
        return False
    layouts = shard_layouts(layer.logical_shards[name], spec.granularity)
    stored = scale_layouts(layouts, spec)
    if spec.fmt.zero_point:
        _quantize_asymmetric_(layer, name, spec, tp, error_log, slot, layouts, stored)
    else:
        _quantize_symmetric_(layer, name, spec, tp, error_log, slot, layouts, stored)
    _set_group_index_(layer, name, layouts)
    return True


def _quantize_symmetric_(layer, name, spec: ScaledWeightSpec, tp: TPContext, error_log, slot, layouts, stored):
    codes, scales = getattr(layer, name), getattr(layer, f"{name}_scale")
    # Plain aliases: torch.compile keeps weak references to its inputs, which would pin the
    # parameter objects (swap_tensors refuses to move a tensor with a weak reference).
    w, codes, scales = slot.detach(), codes.detach(), scales.detach()
    target = torch.empty(w.shape, dtype=torch.int8, device=w.device) if spec.fmt.packed else codes
    # Shards whose tiles are all their own take the one-read kernel (amax, scale, codes per tile); the
    # amax grids of every shard still go through the NaN check and the ranks' MAX reduction, which
    # leaves a local tile's amax unchanged (no other rank holds any of it).
    one_read = formula_of(spec.formula) is Formula.STREAMQUANT and not spec.act_order
    fused = [quantize_local_tiles_(target[..., lay.rows, :], w[..., lay.rows, :], scales[..., lay.scale_rows, :],
                                   lay.window, lay.tile, spec.fmt) if one_read else None for lay in layouts]
    grids = _amax_grids(layer, name, slot, layouts, tp, measured=fused)
    used = []
    for lay, keep, amax, done in zip(layouts, stored, grids, fused):
        if done is not None:
            used.append(scales[..., lay.scale_rows, :])
            continue
        tile_scales, factors = formula_scales(amax, spec.fmt, spec.formula, w.dtype)
        local = _store(scales, lay, keep, tile_scales)
        quantize_window_(target[..., lay.rows, :], w[..., lay.rows, :], local, lay.window, lay.tile, spec.compiled,
                         scales_cover_amax=spec.fmt.scales_cover_amax, formula=spec.formula,
                         local_factors=local_scales(factors, lay.window, lay.tile), fmt=spec.fmt)
        used.append(local)
    if spec.fmt.packed:
        pack_int4(target, out=codes)
    if error_log is not None:
        record_error(layer, name, slot, target, layouts, tp, error_log, torch.cat(used, dim=-2))


def _quantize_asymmetric_(layer, name, spec: ScaledWeightSpec, tp: TPContext, error_log, slot, layouts,
                          stored) -> None:
    """Asymmetric int4 (`int4.py`): range grids, scales and zero points per tile, int8 codes in a
    scratch buffer packed into the int32 codes, zero points packed eight rows per int32."""
    codes, scales, zeros = (getattr(layer, f"{name}{suffix}") for suffix in ("", "_scale", "_zero_point"))
    grids = _amax_grids(layer, name, slot, layouts, tp, measure=window_range)
    w, codes, scales, zeros = slot.detach(), codes.detach(), scales.detach(), zeros.detach()
    target = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    zeros_int8 = torch.empty(scales.shape, dtype=torch.int8, device=w.device)
    used, used_zeros = [], []
    for lay, keep, grid in zip(layouts, stored, grids):
        tile_scales, tile_zeros = range_scales(grid, spec.formula, w.dtype)
        local, local_zeros = _store(scales, lay, keep, tile_scales), _store(zeros_int8, lay, keep, tile_zeros)
        quantize_window_asymmetric_(target[..., lay.rows, :], w[..., lay.rows, :], local, local_zeros, lay.window,
                                    lay.tile, spec.formula)
        used.append(local)
        used_zeros.append(local_zeros)
    pack_int4(target, out=codes)
    pack_rows(zeros_int8, 4, out=zeros)
    if error_log is not None:
        record_error(layer, name, slot, target, layouts, tp, error_log, torch.cat(used, dim=-2),
                     torch.cat(used_zeros, dim=-2))
