"""A layer's quantized weights: the checkpoint-format parameter, and the codes, scales (zero points, group
indices) derived from it or loaded as they are.

For each quantized parameter `name` of a layer ("weight" for linear layers, "w13_weight" and
"w2_weight" for MoE experts) the layer holds:
  - `layer.checkpoint_params[name]`: a parameter in the checkpoint's dtype and the layer's sharded
    layout, with the layer's `weight_loader`. Loaders write it; it lives on `meta` (no memory)
    except while its layer is being loaded: the load session materializes it at the layer's first
    tensor and releases it right after `process_weights_after_loading` (`loading/contract.py`).
  - `layer.<name>`: the codes, same shape (int4: `PackedParameter`, eight codes per int32 along the
    input, `int4_pack.py`); `layer.<name>_scale`: float32 dequantization multipliers [..., S, C], the
    local tile grids of the layer's logical shards (`layer.logical_shards[name]`, e.g. q, k, v)
    stacked along rows, as one of `loading/tiled.py`'s scale kinds (per tensor, channel, group, block);
  - asymmetric int4: `layer.<name>_zero_point`, int32 [..., S / 8, C], eight rows' zero points per
    int32 along the output (`PackedColumnParameter`, compressed-tensors' layout); act order (a
    pre-quantized GPTQ-style checkpoint): `layer.<name>_g_idx`, int32 [..., shards, input columns], the
    group of each input column of each logical shard (`GroupIndexParameter`), and scales (zero
    points) kept for every group of the input on every rank (`granularity.whole_columns`).
Derived tensors are created once (on `meta` when the model is built there), get storage from the
session before the layer is first quantized, and every later quantization (a reload) writes into the
same storage. `ScaledWeights` answers the session's questions (`loading.contract.WeightMethod`);
`online.py` quantizes a loaded high-precision weight into them.

Pre-quantized sources (a quantized checkpoint, trainer-side quantized weights): `layer.quantized_loaders`
maps `name` and each per-tile tensor to the loader that writes checkpoint codes and grids straight into
it, this rank's shard of each (`loading.contract.module_loadables(quantized_source=True)` makes them
the load targets instead of the checkpoint-format parameter). The codes parameter has the checkpoint
parameter's class (int4: `PackedParameter`) and layout attributes (`output_dim`, `tp`, ...) but no
`weight_loader` of its own, so the same tensor-parallel loader narrows codes as it narrows bf16
weights (in packed units along a packed input); the per-tile tensors take this rank's tiles of each
logical weight's GLOBAL grid (`loading/tiled.py`), so a block or group straddling two ranks is kept
by both, never refused.

Scales are per logical shard: q, k and v (gate and up) of a fused parameter each get the scales
they would get as separate layers, which is what a checkpoint quantized per projection holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.loading.parameters import PackedParameter, WeightLoader
from streamquant.loading.tiled import (BlockQuantScaleParameter, ChannelQuantScaleParameter, GroupIndexParameter,
                                       GroupQuantScaleParameter, PackedColumnParameter, PerTensorScaleParameter,
                                       TiledParameter, tiles_loader)
from streamquant.quant.math.code_format import CodeFormat
from streamquant.quant.math.formula import Formula
from streamquant.quant.math.granularity import (Granularity, PerRow, PerTensor, ShardLayout, column_layouts,
                                                grid_columns, grid_shape, shard_layouts, whole_columns)
from streamquant.quant.math.int4_pack import PACK_FACTOR, packed_size

DERIVED_SUFFIXES = ("", "_scale", "_zero_point", "_g_idx")  # codes, then the per-tile tensors

__all__ = ["ScaledWeightSpec", "ScaledWeights", "ShardLayout", "create_scaled_weight", "require_quantized",
           "scale_layouts", "shard_layouts"]


@dataclass(frozen=True)
class ScaledWeightSpec:
    """How weights are quantized: scale granularity, code format (fp8, int8, int4, MXFP8), compiled CPU
    kernel or not, formula; `act_order`: int4 codes grouped by a per-column group index (`g_idx`)."""

    granularity: Granularity
    fmt: CodeFormat
    compiled: bool = False
    formula: Formula = Formula.STREAMQUANT
    act_order: bool = False


def scale_layouts(layouts: list[ShardLayout], spec: ScaledWeightSpec) -> list[ShardLayout]:
    """The layouts of a weight's scales (zero points): its own, or with act order every group of the input."""
    return whole_columns(layouts) if spec.act_order else layouts


def _scale_kind(spec: ScaledWeightSpec) -> type[TiledParameter]:
    if isinstance(spec.granularity, PerTensor):
        return PerTensorScaleParameter
    if isinstance(spec.granularity, PerRow):
        return ChannelQuantScaleParameter
    return GroupQuantScaleParameter if spec.fmt.packed else BlockQuantScaleParameter


def _derived(layer: torch.nn.Module, name: str, checkpoint_param: torch.nn.Parameter, spec: ScaledWeightSpec,
             layouts: list[ShardLayout]) -> dict[str, TiledParameter]:
    """The per-tile tensors of `name`: scales, and for int4 zero points and group indices as the spec says."""
    batch = tuple(checkpoint_param.shape[:-2])
    tiles = scale_layouts(layouts, spec)
    rows, cols = tiles[-1].scale_rows.stop, grid_columns(tiles)
    out = {f"{name}_scale": _scale_kind(spec)(torch.empty(batch + (rows, cols), dtype=torch.float32), layouts=tiles)}
    if spec.fmt.zero_point:
        zeros = torch.empty(batch + (rows // PACK_FACTOR, cols), dtype=torch.int32)
        out[f"{name}_zero_point"] = PackedColumnParameter(zeros, layouts=tiles)
    if spec.act_order:
        groups = grid_shape(layouts[0].tile, layouts[0].window.global_shape)[1]
        index = torch.empty(batch + (len(layouts), checkpoint_param.shape[-1]), dtype=torch.int32)
        out[f"{name}_g_idx"] = GroupIndexParameter(index, layouts=column_layouts(layouts), num_groups=groups)
    return out


def create_scaled_weight(layer: torch.nn.Module, name: str, checkpoint_param: torch.nn.Parameter,
                         spec: ScaledWeightSpec) -> None:
    """Register `checkpoint_param` as the loaders' target and the quantized `name`, `name_scale` (and int4's
    `name_zero_point` / `name_g_idx`) parameters, with the loaders of pre-quantized sources."""
    layouts = shard_layouts(layer.logical_shards[name], spec.granularity)
    if layouts[-1].rows.stop != checkpoint_param.shape[-2]:
        raise ValueError(f"{name}: logical shards cover {layouts[-1].rows.stop} rows, the parameter has "
                         f"{checkpoint_param.shape[-2]}")
    if spec.act_order and not spec.fmt.packed:
        raise ValueError("act order (g_idx) applies to int4 codes only")
    try:
        derived = _derived(layer, name, checkpoint_param, spec, layouts)
    except ValueError as e:
        raise ValueError(f"layer {getattr(layer, 'prefix', '')!r}, {name}: {e}") from None
    layer.checkpoint_params = {**(getattr(layer, "checkpoint_params", None) or {}), name: checkpoint_param}
    scale_name = f"{name}_scale"
    layer.register_parameter(scale_name, derived.pop(scale_name))
    if spec.fmt.packed:
        words = packed_size(checkpoint_param.shape[-1], f"{name}'s input size on this rank")
        packed = torch.empty(tuple(checkpoint_param.shape[:-1]) + (words,), dtype=torch.int32)
        codes = _like_param(checkpoint_param, packed, PackedParameter, packed_factor=PACK_FACTOR,
                            packed_dim=checkpoint_param.dim() - 1, marlin_tile_size=None)
    else:
        codes = _like_param(checkpoint_param, torch.empty(checkpoint_param.shape, dtype=spec.fmt.dtype))
    layer.register_parameter(name, codes)
    for extra, param in derived.items():
        layer.register_parameter(extra, param)
    layer.quantized_loaders = {**(getattr(layer, "quantized_loaders", None) or {}),
                               name: checkpoint_param.weight_loader,
                               **{n: tiles_loader for n in (scale_name, *derived)}}


def _like_param(template: torch.nn.Parameter, data: torch.Tensor, cls: type | None = None,
                **attributes) -> torch.nn.Parameter:
    """A parameter of `template`'s class (or `cls`) and layout attributes over `data`, without a
    `weight_loader` (derived parameters have none; `quantized_loaders` says how pre-quantized codes reach it)."""
    param = torch.nn.Parameter.__new__(cls or type(template), data, requires_grad=False)
    param.__dict__.update({k: v for k, v in template.__dict__.items() if k != "weight_loader"}, **attributes)
    return param


class ScaledWeights:
    """The `loading.contract.WeightMethod` answers of the scaled methods (linear and MoE): the
    checkpoint-format parameters `create_scaled_weight` registered, the loaders of pre-quantized codes
    and per-tile tensors, and the codes, scales (int4 zero points, group indices) derived from the former."""

    def checkpoint_params(self, layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return layer.checkpoint_params

    def quantized_loaders(self, layer: torch.nn.Module) -> dict[str, WeightLoader]:
        return layer.quantized_loaders

    def derived_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}{suffix}": layer.get_parameter(f"{name}{suffix}") for name in layer.checkpoint_params
                for suffix in DERIVED_SUFFIXES if f"{name}{suffix}" in layer._parameters}


def require_quantized(layer: torch.nn.Module, name: str) -> None:
    """Raise if `layer.<name>` never received fp8 codes (its load was incomplete, e.g. strict=False)."""
    if getattr(layer, name).is_meta:
        raise RuntimeError(f"layer {getattr(layer, 'prefix', '')!r} has no fp8 {name!r}: its checkpoint weights were "
                           "never completely loaded (a strict=False load that missed some of them?)")
