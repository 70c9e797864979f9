"""A layer's fp8 weights: the checkpoint-format parameter, and the codes and scales derived from it.

For each quantized parameter `name` of a layer ("weight" for linear layers, "w13_weight" and
"w2_weight" for MoE experts) the layer holds:
  - `layer.checkpoint_params[name]`: a parameter in the checkpoint's dtype and the layer's sharded
    layout, with the layer's `weight_loader`. Loaders write it; it lives on `meta` (no memory)
    except while its layer is being loaded: the load session materializes it at the layer's first
    tensor and releases it right after `process_weights_after_loading` (`loading/contract.py`).
  - `layer.<name>`: the fp8 codes, same shape; `layer.<name>_scale`: float32 dequantization
    multipliers [..., S, C], the local tile grids of the layer's logical shards
    (`layer.logical_shards[name]`, e.g. q, k, v) stacked along rows.
Codes and scales are created once (on `meta` when the model is built there), get storage from the
session before the layer is first quantized, and every later quantization (a reload) writes into the
same storage. `ScaledWeights` answers the session's questions (`loading.contract.WeightMethod`).

Pre-quantized sources (an fp8 checkpoint, trainer-side quantized weights): `layer.quantized_loaders`
maps `name` and `name_scale` to loaders that write checkpoint codes and scale grids straight into
those parameters, this rank's shard of each (`loading.contract.module_loadables(quantized_source=True)`
makes them the load targets instead of the checkpoint-format parameter). The codes parameter has the
checkpoint parameter's class and layout attributes (`output_dim`, `tp`, ...) but no `weight_loader` of
its own, so the same tensor-parallel loader narrows fp8 codes as it narrows bf16 weights; the scale
loader (`scale_loader`) cuts this rank's tiles out of the GLOBAL grid of one logical weight, so a
block straddling two ranks is handled (both ranks keep its scale), never refused.

Scales are per logical shard: q, k and v (gate and up) of a fused parameter each get the scales
they would get as separate layers, which is what a checkpoint quantized per projection holds.

Tensor parallelism: tiles belong to the GLOBAL logical weight (`granularity.py`). At TP > 1 the
ranks all-reduce their global amax grids with MAX, one small collective per layer (grids are a
few KB; a rank's tiles outside its window hold 0), so tiles that straddle ranks get one scale and
every rank's codes are bitwise the TP=1 codes of its shard. A non-finite amax is replaced by +inf
before that reduction, so every rank sees it and every rank raises: none waits forever in a later
collective. The reduction runs even where no tile straddles ranks, for exactly that reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from streamquant.loading.errors import NonFiniteWeightError
from streamquant.loading.parameters import WeightLoader, WeightShapeError, write_region
from streamquant.loading.region import Region
from streamquant.parallel.context import TPContext, all_reduce
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.code_format import CodeFormat
from streamquant.quant.math.formula import Formula, formula_of
from streamquant.quant.math.quantize import (formula_scales, local_scales, quantize_local_tiles_, quantize_window_,
                                         window_amax)
from streamquant.quant.math.granularity import Granularity, LogicalShard, Window, grid_shape, tile_shape
from streamquant.quant.math.int4 import quantize_window_asymmetric_, range_scales, window_range
from streamquant.quant.math.int4_pack import pack_int4, packed_size
from streamquant.quant.scaled.readback import record_error

# MoE shard ids (`layers.moe`) -> the logical shard labels of w13 / w2.
MOE_SHARD_LABELS = {"w1": "gate", "w3": "up", "w2": "down"}


@dataclass(frozen=True)
class ScaledWeightSpec:
    """How weights are quantized: scale granularity, code format (fp8, int8, MXFP8), compiled CPU kernel or not, formula."""

    granularity: Granularity
    fmt: CodeFormat
    compiled: bool = False
    formula: Formula = Formula.STREAMQUANT


class ShardLayout(NamedTuple):
    """Where a logical shard lives: its window and tile, its rows in the parameter and in the scales."""

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


def _grid_cols(layouts: list[ShardLayout]) -> int:
    cols = {(lay.window.local_grid(lay.tile)[1].stop - lay.window.local_grid(lay.tile)[1].start) for lay in layouts}
    if len(cols) != 1:
        raise ValueError(f"logical shards of one parameter must share their column tiles, got {sorted(cols)}")
    return cols.pop()


def create_scaled_weight(layer: torch.nn.Module, name: str, checkpoint_param: torch.nn.Parameter,
                      spec: ScaledWeightSpec) -> None:
    """Register `checkpoint_param` as the loaders' target and the fp8 `name` / `name_scale` parameters."""
    layouts = shard_layouts(layer.logical_shards[name], spec.granularity)
    if layouts[-1].rows.stop != checkpoint_param.shape[-2]:
        raise ValueError(f"{name}: logical shards cover {layouts[-1].rows.stop} rows, the parameter has "
                         f"{checkpoint_param.shape[-2]}")
    batch = tuple(checkpoint_param.shape[:-2])
    layer.checkpoint_params = {**(getattr(layer, "checkpoint_params", None) or {}), name: checkpoint_param}
    scales = torch.empty(batch + (layouts[-1].scale_rows.stop, _grid_cols(layouts)), dtype=torch.float32)
    layer.register_parameter(f"{name}_scale", torch.nn.Parameter(scales, requires_grad=False))
    if spec.fmt.packed:  # int4: packed int32 codes; they load from high-precision weights only
        words = packed_size(checkpoint_param.shape[-1], f"{name}'s input size on this rank")
        packed = torch.empty(tuple(checkpoint_param.shape[:-1]) + (words,), dtype=torch.int32)
        layer.register_parameter(name, torch.nn.Parameter(packed, requires_grad=False))
        if spec.fmt.zero_point:
            zero = torch.empty(scales.shape, dtype=torch.int8)
            layer.register_parameter(f"{name}_zero_point", torch.nn.Parameter(zero, requires_grad=False))
        return
    codes = _like_param(checkpoint_param, torch.empty(checkpoint_param.shape, dtype=spec.fmt.dtype))
    layer.register_parameter(name, codes)
    layer.quantized_loaders = {**(getattr(layer, "quantized_loaders", None) or {}),
                               name: checkpoint_param.weight_loader,
                               f"{name}_scale": functools.partial(scale_loader, layouts=tuple(layouts))}


def _like_param(template: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    """A parameter of `template`'s class and layout attributes over `data`, without a `weight_loader`
    (derived parameters have none; `quantized_loaders` says how pre-quantized codes reach it)."""
    param = torch.nn.Parameter.__new__(type(template), data, requires_grad=False)
    param.__dict__.update({k: v for k, v in template.__dict__.items() if k != "weight_loader"})
    return param


def _scale_targets(layouts: tuple[ShardLayout, ...], shard_id) -> list[ShardLayout]:
    if shard_id is None:
        if len(layouts) != 1:
            raise WeightShapeError(f"a scale for the fused weights {[lay.label for lay in layouts]} cannot be split; "
                                   "expected one scale tensor per logical weight")
        return list(layouts)
    if isinstance(shard_id, int):
        return [layouts[shard_id]]
    label = MOE_SHARD_LABELS.get(shard_id, shard_id)
    found = [lay for lay in layouts if lay.label == label]
    if not found:
        raise WeightShapeError(f"no logical weight {shard_id!r} among {[lay.label for lay in layouts]}")
    return found


def scale_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None, expert_id: int | None = None, *,
                     layouts: tuple[ShardLayout, ...], **kwargs) -> list[Region]:
    """Write this rank's tiles of one logical weight's GLOBAL scale grid (as a checkpoint stores it:
    [1] / 0-d per tensor, [out, 1] per channel, the block grid) into its rows of `param`."""
    lay = _scale_targets(layouts, shard_id)[0]
    batch = tuple(param.shape[:-2])
    if expert_id is not None:
        if not 0 <= expert_id < batch[0]:
            raise WeightShapeError(f"expert id {expert_id} out of range for {batch[0]} experts")
        loaded, experts, batch = loaded.unsqueeze(0), (expert_id, expert_id + 1), (1,)
    grid = batch + grid_shape(lay.tile, lay.window.global_shape)
    if loaded.numel() != torch.Size(grid).numel() or (loaded.dim() > 1 and loaded.shape[-1] != grid[-1]):
        raise WeightShapeError(f"scale of shape {list(loaded.shape)} is not the {list(grid[-2:])} tile grid of a "
                               f"{list(lay.window.global_shape)} weight")
    rows, cols = lay.window.local_grid(lay.tile)
    local = loaded.reshape(grid)[..., rows, cols]
    if not bool((local > 0).all()):
        raise WeightShapeError("scales must be positive (dequantization multipliers); found one <= 0")
    region = ((experts if expert_id is not None else (0, batch[0])),) if param.dim() == 3 else ()
    region += ((lay.scale_rows.start, lay.scale_rows.stop), (0, param.shape[-1]))
    return write_region(param, region, local)


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


@torch.no_grad()
def quantize_layer_weight_(layer: torch.nn.Module, name: str, spec: ScaledWeightSpec, tp: TPContext,
                           error_log: QuantErrorLog | None = None) -> bool:
    """Quantize `layer.checkpoint_params[name]` into `layer.<name>` and its scales (in place).

    Returns False (and does nothing) when the checkpoint-format parameter holds no data (`meta`):
    nothing was loaded, or the load already released it.
    """
    slot = layer.checkpoint_params[name]
    if slot.is_meta:
        return False
    codes, scales = getattr(layer, name), getattr(layer, f"{name}_scale")
    layouts = shard_layouts(layer.logical_shards[name], spec.granularity)
    if spec.fmt.zero_point:
        return _quantize_asymmetric_(layer, name, spec, tp, error_log, slot, layouts)
    # Plain aliases: torch.compile keeps weak references to its inputs, which would pin the
    # parameter objects (swap_tensors refuses to move a tensor with a weak reference).
    w, codes, scales = slot.detach(), codes.detach(), scales.detach()
    target = torch.empty(w.shape, dtype=torch.int8, device=w.device) if spec.fmt.packed else codes
    # Shards whose tiles are all their own take the one-read kernel (amax, scale, codes per tile); the
    # amax grids of every shard still go through the NaN check and the ranks' MAX reduction, which
    # leaves a local tile's amax unchanged (no other rank holds any of it).
    fused = [quantize_local_tiles_(target[..., lay.rows, :], w[..., lay.rows, :], scales[..., lay.scale_rows, :],
                                   lay.window, lay.tile, spec.fmt) if formula_of(spec.formula) is Formula.STREAMQUANT else None
             for lay in layouts]
    grids = _amax_grids(layer, name, slot, layouts, tp, measured=fused)
    for lay, amax, done in zip(layouts, grids, fused):
        if done is not None:
            continue
        local = scales[..., lay.scale_rows, :]
        tile_scales, factors = formula_scales(amax, spec.fmt, spec.formula, w.dtype)
        local.copy_(local_scales(tile_scales, lay.window, lay.tile))
        quantize_window_(target[..., lay.rows, :], w[..., lay.rows, :], local, lay.window, lay.tile, spec.compiled,
                         scales_cover_amax=spec.fmt.scales_cover_amax, formula=spec.formula,
                         local_factors=local_scales(factors, lay.window, lay.tile), fmt=spec.fmt)
    if spec.fmt.packed:
        pack_int4(target, out=codes)
    if error_log is not None:
        record_error(layer, name, slot, target, layouts, tp, error_log)
    return True


def _quantize_asymmetric_(layer, name, spec: ScaledWeightSpec, tp: TPContext, error_log, slot, layouts) -> bool:
    """`quantize_layer_weight_` for asymmetric int4 (`int4.py`): range grids, scales and zero
    points per tile, int8 codes in a scratch buffer, packed into the int32 codes."""
    codes, scales, zeros = (getattr(layer, f"{name}{suffix}") for suffix in ("", "_scale", "_zero_point"))
    grids = _amax_grids(layer, name, slot, layouts, tp, measure=window_range)
    w, codes, scales, zeros = slot.detach(), codes.detach(), scales.detach(), zeros.detach()
    target = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for lay, grid in zip(layouts, grids):
        tile_scales, tile_zeros = range_scales(grid, spec.formula, w.dtype)
        local, local_zeros = scales[..., lay.scale_rows, :], zeros[..., lay.scale_rows, :]
        local.copy_(local_scales(tile_scales, lay.window, lay.tile))
        local_zeros.copy_(local_scales(tile_zeros, lay.window, lay.tile))
        quantize_window_asymmetric_(target[..., lay.rows, :], w[..., lay.rows, :], local, local_zeros, lay.window,
                                    lay.tile, spec.formula)
    pack_int4(target, out=codes)
    if error_log is not None:
        record_error(layer, name, slot, target, layouts, tp, error_log)
    return True


class ScaledWeights:
    """The `loading.contract.WeightMethod` answers of the scaled methods (linear and MoE): the
    checkpoint-format parameters `create_scaled_weight` registered, the loaders of pre-quantized codes
    and scales, and the codes, scales (and int4 zero points) derived from the former."""

    def checkpoint_params(self, layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return layer.checkpoint_params

    def quantized_loaders(self, layer: torch.nn.Module) -> dict[str, WeightLoader]:
        return getattr(layer, "quantized_loaders", {})  # int4 registers none: it loads from high precision only

    def derived_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {derived: layer.get_parameter(derived) for name in layer.checkpoint_params
                for derived in (name, f"{name}_scale", f"{name}_zero_point") if derived in layer._parameters}


def require_quantized(layer: torch.nn.Module, name: str) -> None:
    """Raise if `layer.<name>` never received fp8 codes (its load was incomplete, e.g. strict=False)."""
    if getattr(layer, name).is_meta:
        raise RuntimeError(f"layer {getattr(layer, 'prefix', '')!r} has no fp8 {name!r}: its checkpoint weights were "
                           "never completely loaded (a strict=False load that missed some of them?)")
