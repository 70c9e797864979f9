"""Loading a pre-quantized checkpoint (fp8, int8, int4): which layers keep codes, and the tensors' journey in.

A checkpoint's `quantization_config` is config.json's or GPTQ's quantize_config.json
(`checkpoint_quantization_config`). A GPTQ / AWQ checkpoint loads as the compressed-tensors int4
checkpoint its layers convert to as they stream in (`loadable_checkpoint`, `source_view` for its header
shapes, `formats/int4.py`); its group_size -1 (one scale per output channel) is refused.

`plan_prequantized(model, checkpoint, shapes)` reads the checkpoint's tensor names
(headers only) against the model's own weight mapping, on a `meta` model:
  - a layer whose checkpoint weights all have a scale beside them (`X.weight_scale` or
    `X.weight_scale_inv`), or are packed int4 (`X.weight_packed`), is a quantized layer: its codes and
    scales (zero points, group indices) are loaded as they are (no high-precision weight is ever
    materialized, no requantization; fused q/k/v and gate/up keep one scale grid per logical weight);
  - a quantizable layer without scales (a format's `ignore` list) stays in the model dtype: it is
    given to the quant config as an `ignore` pattern;
  - a layer streamquant always keeps in high precision (embeddings, LM head, MoE router) whose
    checkpoint tensor is quantized anyway (llm-compressor quantizes `embed_tokens` although its
    `targets` say Linear) is DEQUANTIZED on the way in (`codes.float() * scale`, in the model dtype;
    packed int4 there is refused);
  - a layer with some weights quantized and some not is refused, naming it.
`prequantized_tensors` is that journey: each `X.weight_shape` checked against its packed codes and
dropped (the models' mappings take `X.weight_packed` as the codes `X.weight` and hf-fp8's
`X.weight_scale_inv` as `X.weight_scale`: `WeightMapping.leaf_aliases`), stray quantized tensors
dequantized (each held, as a zero-copy reference, until its partner arrives). `reload_source` gives a reload the same view of a checkpoint directory (which
says itself whether it is pre-quantized) or of an iterable the caller says is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from streamquant.checkpoint.reader import checkpoint_shapes, iterate_weights, resolve_checkpoint
from streamquant.loading.errors import WeightLoadError
from streamquant.formats import (
    Int4Checkpoint,
    QuantizationConfigError,
    QuantizedCheckpoint,
    checkpoint_quantization_config,
    read_quantization_config,
    shapes_as_compressed_tensors,
    to_compressed_tensors,
)
from streamquant.formats.compressed_tensors import COMPRESSED_TENSORS
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.math.quantize import dequantize
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor

SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")
PACKED = "weight_packed"  # compressed-tensors' int4 codes, eight per int32 along the input
PACK_FACTOR = 8


@dataclass(frozen=True)
class PrequantizedLoad:
    checkpoint: QuantizedCheckpoint
    ignore: tuple[str, ...]  # anchored regexes of layers kept in the model dtype
    dequantize: frozenset[str]  # checkpoint module names whose fp8 weight is dequantized on the way in
    source: Int4Checkpoint | None = None  # GPTQ / AWQ: converted to compressed-tensors' int4 as it streams in
    shapes: dict[str, tuple[int, ...]] | None = None  # the header shapes as the tensors stream in (`source_view`)


def loadable_checkpoint(found: QuantizedCheckpoint | Int4Checkpoint | None) -> QuantizedCheckpoint | None:
    """What a read `quantization_config` loads as: a GPTQ / AWQ checkpoint as the compressed-tensors int4
    checkpoint its tensors convert to (`formats/int4.py`), keeping its own format name."""
    if not isinstance(found, Int4Checkpoint):
        return found
    if found.group_size is None:
        raise QuantizationConfigError(f"quantization_config.group_size = -1 ({found.format}, one scale per output "
                                      "channel): int4 layers load grouped weights only (group_size > 0)")
    return replace(COMPRESSED_TENSORS.read_config(found.compressed_tensors_config()), format=found.format)


def source_view(found: QuantizedCheckpoint | Int4Checkpoint | None,
                shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A checkpoint's header shapes as its tensors will stream in (GPTQ / AWQ: converted)."""
    return shapes_as_compressed_tensors(shapes, found) if isinstance(found, Int4Checkpoint) else shapes


def _scale_name(module: str, shapes: dict) -> str | None:
    return next((f"{module}.{s}" for s in SCALE_SUFFIXES if f"{module}.{s}" in shapes), None)


def plan_prequantized(model: torch.nn.Module, checkpoint: QuantizedCheckpoint, shapes: dict[str, tuple[int, ...]],
                      source: QuantizedCheckpoint | Int4Checkpoint | None = None) -> PrequantizedLoad:
    """The plan for `model`: a meta model built to plan a load, or the live model of a reload. `shapes`: as the
    tensors stream in (`source_view`); `source`: what the config read (an `Int4Checkpoint` is converted)."""
    modules = dict(model.named_modules())
    status: dict[str, dict[str, bool]] = {}
    packed = set()
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        name = f"{module}.weight"
        if leaf not in ("weight", PACKED) or model.weight_mapping.should_skip(name):
            continue
        target = model.weight_mapping.map(name)[0].rpartition(".")[0]
        status.setdefault(target, {})[name] = leaf == PACKED or _scale_name(module, shapes) is not None
        if leaf == PACKED:
            packed.add(module)
    ignore, stray = [], set()
    for target, sources in sorted(status.items()):
        quantized = set(sources.values())
        module = modules.get(target)
        if len(quantized) > 1:
            raise QuantizationConfigError(f"layer {target!r} is partly quantized in the checkpoint (with scales: "
                                          f"{sorted(n for n, q in sources.items() if q)}; without: "
                                          f"{sorted(n for n, q in sources.items() if not q)})")
        if not getattr(module, "uses_quant_config", False):
            if True in quantized:
                stray.update(n[: -len(".weight")] for n in sources)
                if stray & packed:
                    raise QuantizationConfigError(f"layer {target!r} stays in high precision in streamquant, but the "
                                                  f"checkpoint holds packed int4 codes for it ({sorted(stray & packed)});"
                                                  " dequantizing int4 on the way in is not supported")
        elif quantized == {False}:
            ignore.append(f"^{re.escape(target)}$")
    return PrequantizedLoad(checkpoint, tuple(ignore), frozenset(stray),
                            source if isinstance(source, Int4Checkpoint) else None, shapes)


def _granularity(codes: torch.Tensor, scale: torch.Tensor, checkpoint: QuantizedCheckpoint):
    if scale.numel() == 1:
        return PerTensor(), scale.reshape(1, 1)
    if scale.dim() >= 1 and scale.shape[-1] == 1 and checkpoint.scheme is not ScaledScheme.FP8_BLOCK:
        return PerRow(), scale.reshape(*codes.shape[:-1], 1)
    return PerBlock(checkpoint.block_size), scale


def prequantized_tensors(weights: Iterable[tuple[str, torch.Tensor]], plan: PrequantizedLoad,
                         dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model's quantized loaders take them (see the module docstring)."""
    if plan.source is not None:
        weights = to_compressed_tensors(weights, plan.source)
    return normalized_names(_dequantize_strays(weights, plan, dtype))


def _dequantize_strays(weights: Iterable[tuple[str, torch.Tensor]], plan: PrequantizedLoad,
                       dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if module in plan.dequantize and leaf in ("weight", *SCALE_SUFFIXES):
            pair = held.setdefault(module, {})
            pair[leaf if leaf == "weight" else "scale"] = tensor
            if len(pair) == 2:
                granularity, scale = _granularity(pair["weight"], pair["scale"], plan.checkpoint)
                yield f"{module}.weight", dequantize(pair["weight"], scale.float(), granularity, dtype)
                del held[module]
            continue
        yield name, tensor
    if held:
        raise QuantizationConfigError(f"a quantized tensor arrived without its partner (weight and scale): "
                                      f"{sorted(held)}")


def prequantized_plan(model_class, hf_config, checkpoint: Path, shapes, quantization: str | None,
                      options: dict[str, Any]) -> tuple[PrequantizedLoad | None, str | None, dict[str, Any]]:
    """(plan, scheme, quantization options) for a checkpoint directory with a `quantization_config`
    (config.json's, or GPTQ's quantize_config.json: `checkpoint_quantization_config`); `shapes`: its headers.

    The checkpoint decides the scheme: `quantization` must be None or agree. Options the user gives
    override the checkpoint's (`activation_scheme`, `formula` -- which a reload quantizes with), except
    `block_size` and `ignore`, which the checkpoint's tensors fix."""
    source = read_quantization_config(checkpoint_quantization_config(checkpoint))
    found = loadable_checkpoint(source)
    if found is None:
        return None, quantization, options
    if quantization not in (None, found.scheme.value):
        raise QuantizationConfigError(f"quantization={quantization!r} disagrees with the checkpoint, which is "
                                      f"pre-quantized as {found.scheme.value!r} ({found.format})")
    for key in ("block_size", "ignore"):
        if key in options:
            raise QuantizationConfigError(f"{key}= cannot be given for a pre-quantized checkpoint (its tensors fix it)")
    with torch.device("meta"):  # the ignore list must be known before the model is built: a planning model
        model = model_class(hf_config, tp=TPContext(), quant_config=ScaledConfig(found.scheme),
                            params_dtype=torch.bfloat16)
    plan = plan_prequantized(model, found, source_view(source, shapes), source)
    return plan, found.scheme.value, {**found.options, "ignore": plan.ignore, **options}


def normalized_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pre-quantized tensors as the loaders take them: every `X.weight_shape` checked against its
    `X.weight_packed` and dropped (the codes' own shape is what loads). (The models' mappings take
    `X.weight_packed` and `X.weight_scale_inv` as `X.weight` / `X.weight_scale`: `leaf_aliases`.)"""
    declared: dict[str, torch.Tensor] = {}  # module -> its weight_shape, until its packed codes arrive
    packed: dict[str, tuple[int, int]] = {}  # module -> the [out, in] its packed codes hold, until its shape arrives
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_shape":
            declared[module] = tensor
        elif leaf == PACKED:
            packed[module] = (tensor.shape[-2], tensor.shape[-1] * PACK_FACTOR) if tensor.dim() >= 2 else ()
        if module in declared and module in packed:
            _check_weight_shape(module, declared.pop(module), packed.pop(module))
        if leaf != "weight_shape":
            yield name, tensor
    if declared:
        raise QuantizationConfigError(f"weight_shape without packed codes ({PACKED}) beside it: "
                                      f"{sorted(f'{m}.weight_shape' for m in declared)}")


def _check_weight_shape(module: str, declared: torch.Tensor, packed: tuple[int, ...]) -> None:
    shape = [int(n) for n in declared.flatten()] if not declared.is_floating_point() else None
    if shape != list(packed):
        hint = (f"; an input size not a multiple of {PACK_FACTOR} does not pack into whole int32 words"
                if shape and len(shape) == 2 and shape[1] % PACK_FACTOR else "")
        raise QuantizationConfigError(f"{module}.weight_shape is {shape if shape else declared.tolist()}, but "
                                      f"{module}.{PACKED} holds a {list(packed)} weight ({PACK_FACTOR} int4 codes "
                                      f"per int32){hint}")


def checkpoint_source(checkpoint: Path, model, dtype: torch.dtype) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """A checkpoint directory's tensors for a reload of `model`, and whether they are pre-quantized."""
    weights = iterate_weights(checkpoint)
    source = read_quantization_config(checkpoint_quantization_config(checkpoint))
    found = loadable_checkpoint(source)
    if found is None:
        return weights, False
    plan = plan_prequantized(model, found, source_view(source, checkpoint_shapes(checkpoint)), source)
    return prequantized_tensors(weights, plan, dtype), True


def reload_source(model: torch.nn.Module, weights: str | Path | Iterable[tuple[str, torch.Tensor]],
                  quantized_source: bool | None) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """A reload's (tensors, pre-quantized or not): a checkpoint directory or hub id says itself (its
    `quantization_config`); an iterable is pre-quantized when the caller says so."""
    if isinstance(weights, (str, Path)):
        tensors, found = checkpoint_source(resolve_checkpoint(weights), model, model.params_dtype)
        if quantized_source is not None and quantized_source != found:
            raise WeightLoadError(f"quantized_source={quantized_source}, but {weights} is "
                                  + ("" if found else "not ") + "a pre-quantized checkpoint")
        return tensors, found
    return (normalized_names(weights), True) if quantized_source else (weights, False)
