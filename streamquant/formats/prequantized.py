"""Loading a pre-quantized (fp8) checkpoint: which layers keep fp8 codes, and the tensors' journey in.

`plan_prequantized(model_class, hf_config, checkpoint, shapes)` reads the checkpoint's tensor names
(headers only) against the model's own weight mapping, on a `meta` model:
  - a layer whose checkpoint weights all have a scale beside them (`X.weight_scale` or
    `X.weight_scale_inv`) is an fp8 layer: its codes and scales are loaded as they are (no
    high-precision weight is ever materialized, no requantization; fused q/k/v and gate/up keep
    one scale grid per logical weight);
  - a quantizable layer without scales (a format's `ignore` list) stays in the model dtype: it is
    given to the fp8 config as an `ignore` pattern;
  - a layer streamquant always keeps in high precision (embeddings, LM head, MoE router) whose
    checkpoint tensor is quantized anyway (llm-compressor quantizes `embed_tokens` although its
    `targets` say Linear) is DEQUANTIZED on the way in (`codes.float() * scale`, in the model dtype);
  - a layer with some weights quantized and some not is refused, naming it.
`prequantized_tensors` is that journey: scale names normalized to `weight_scale` (hf-fp8 calls them
`weight_scale_inv`), stray quantized tensors dequantized (each held, as a zero-copy reference, until
its partner arrives). `reload_source` gives a reload the same view of a checkpoint directory (which
says itself whether it is pre-quantized) or of an iterable the caller says is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamquant.checkpoint.reader import CONFIG_FILE, checkpoint_shapes, iterate_weights, resolve_checkpoint
from streamquant.loading.errors import WeightLoadError
from streamquant.formats import Int4Checkpoint, QuantizationConfigError, QuantizedCheckpoint, read_quantization_config
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.math.quantize import dequantize
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor

SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


@dataclass(frozen=True)
class PrequantizedLoad:
    checkpoint: QuantizedCheckpoint
    ignore: tuple[str, ...]  # anchored regexes of layers kept in the model dtype
    dequantize: frozenset[str]  # checkpoint module names whose fp8 weight is dequantized on the way in


def _scale_name(module: str, shapes: dict) -> str | None:
    return next((f"{module}.{s}" for s in SCALE_SUFFIXES if f"{module}.{s}" in shapes), None)


def plan_prequantized(model: torch.nn.Module, checkpoint: QuantizedCheckpoint,
                      shapes: dict[str, tuple[int, ...]]) -> PrequantizedLoad:
    """The plan for `model`: a meta model built to plan a load, or the live model of a reload."""
    modules = dict(model.named_modules())
    status: dict[str, dict[str, bool]] = {}
    for name in shapes:
        if not name.endswith(".weight") or model.weight_mapping.should_skip(name):
            continue
        target = model.weight_mapping.map(name)[0].rpartition(".")[0]
        status.setdefault(target, {})[name] = _scale_name(name[: -len(".weight")], shapes) is not None
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
        elif quantized == {False}:
            ignore.append(f"^{re.escape(target)}$")
    return PrequantizedLoad(checkpoint, tuple(ignore), frozenset(stray))


def _granularity(codes: torch.Tensor, scale: torch.Tensor, checkpoint: QuantizedCheckpoint):
    if scale.numel() == 1:
        return PerTensor(), scale.reshape(1, 1)
    if scale.dim() >= 1 and scale.shape[-1] == 1 and checkpoint.scheme is not ScaledScheme.FP8_BLOCK:
        return PerRow(), scale.reshape(*codes.shape[:-1], 1)
    return PerBlock(checkpoint.block_size), scale


def prequantized_tensors(weights: Iterable[tuple[str, torch.Tensor]], plan: PrequantizedLoad,
                         dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model's fp8 loaders take them (see the module docstring)."""
    return normalized_scale_names(_dequantize_strays(weights, plan, dtype))


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


def prequantized_plan(model_class, hf_config, shapes, quantization: str | None,
                      options: dict[str, Any]) -> tuple[PrequantizedLoad | None, str | None, dict[str, Any]]:
    """(plan, scheme, fp8 options) for a checkpoint whose config.json has a `quantization_config`.

    The checkpoint decides the scheme: `quantization` must be None or agree. Options the user gives
    override the checkpoint's (`activation_scheme`, `formula` -- which a reload quantizes with), except
    `block_size` and `ignore`, which the checkpoint's tensors fix."""
    found = _fp8_only(read_quantization_config(getattr(hf_config, "quantization_config", None)))
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
    plan = plan_prequantized(model, found, shapes)
    return plan, found.scheme.value, {**found.options, "ignore": plan.ignore, **options}


def _fp8_only(found: QuantizedCheckpoint | Int4Checkpoint | None) -> QuantizedCheckpoint | None:
    if isinstance(found, Int4Checkpoint):
        raise QuantizationConfigError(f"{found.format} checkpoints are read and converted to compressed-tensors' "
                                      "int4 layout (streamquant.formats.to_compressed_tensors), but int4 layers "
                                      "cannot be loaded yet")
    return found


def normalized_scale_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pre-quantized tensors with hf-fp8's `X.weight_scale_inv` named `X.weight_scale` (what the loaders take)."""
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        yield (f"{module}.weight_scale" if leaf == "weight_scale_inv" else name), tensor


def checkpoint_source(checkpoint: Path, model, dtype: torch.dtype) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """A checkpoint directory's tensors for a reload of `model`, and whether they are pre-quantized."""
    weights = iterate_weights(checkpoint)
    try:
        raw = json.loads((checkpoint / CONFIG_FILE).read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        raw = None  # the reload's strict checks refuse what does not fit
    found = _fp8_only(read_quantization_config(raw))
    if found is None:
        return weights, False
    return prequantized_tensors(weights, plan_prequantized(model, found, checkpoint_shapes(checkpoint)), dtype), True


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
    return (normalized_scale_names(weights), True) if quantized_source else (weights, False)
