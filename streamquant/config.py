"""What a load is asked for, validated before anything is read: schemes, their options, dtypes, offload.

The single place that turns user input (`load_model`'s and `quantize_checkpoint`'s arguments, the
command line's flags) into frozen values: a dtype from its name, a quant config from a scheme name
and its options (`make_quant_config`), an `OffloadPlan` from the offload flags. Every option is
checked here, so a typo fails before a checkpoint is read or any memory is given.
"""

from __future__ import annotations

import re
import warnings
from types import MappingProxyType
from typing import Any

import torch

from streamquant.loading.offload import DEFAULT_QUANTIZE_ON, OffloadPlan
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.torchao import TORCHAO_PRESETS, TorchaoConfig, is_torchao_scheme, resolve

# Scheme names accepted by `load_model(quantization=...)`; None means unquantized (weights in `dtype`).
SUPPORTED_QUANTIZATION: tuple[str | None, ...] = (None, *(s.value for s in ScaledScheme), *TORCHAO_PRESETS)
# Options `load_model` accepts with a scaled-code scheme (fp8, int8, int4, mxfp8) (see `make_quant_config`).
SCALED_OPTIONS = ("fp8_dtype", "activation_scheme", "ignore", "block_size", "group_size", "symmetric", "act_order",
                  "compile", "formula", "tp_invariant_activations", "measure_error")
# Options `load_model` accepts with a torchao scheme.
TORCHAO_OPTIONS = ("ignore", "measure_error")

# Read-only: accepted dtype spellings (CLI and API alike).
DTYPE_NAMES = MappingProxyType(
    {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
)


class UnsupportedQuantizationError(ValueError):
    """`quantization=` named a scheme this build of streamquant cannot load."""


class QuantizationOptionError(TypeError, ValueError):
    """An fp8 option that does not apply (unknown, or given without a scheme): a TypeError, as for any
    unexpected keyword, and a ValueError, the bad-input class the command line reports in one line."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A `torch.dtype` from a dtype or one of the names in `DTYPE_NAMES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {', '.join(DTYPE_NAMES)}")


def make_quant_config(quantization: Any, options: dict[str, Any]) -> ScaledConfig | TorchaoConfig | None:
    """The quant config for scheme `quantization` with its `options` (None: unquantized).

    Options: `fp8_dtype` ("e4m3fn" default, "e4m3fnuz"; not for int8 / mxfp8), `activation_scheme` ("dynamic"
    default, "none" for weight-only), `ignore` (regexes over module names), `block_size`
    (fp8-block, default (128, 128)), `compile` (inductor-compiled CPU quantization kernel for the pure-torch
    fallback, bitwise the same codes; streamquant formula only; the native CPU kernels, when built, run
    instead), `formula` ("streamquant" default, "compressed-tensors",
    "transformers": whose fp8 arithmetic, see `quant/math/formula.py`; fp8 schemes only), `tp_invariant_activations` (all-reduce
    the dynamic activation amaxes of row-parallel layers, so TP > 1 computes with TP=1's activation
    scales: one small collective per row-parallel matmul, see `quant/scaled/linear.py`), `measure_error`
    (record per-weight SQNR), `group_size` / `symmetric` / `act_order` (int4: input elements per scale, zero
    points, a group index per input column -- what a pre-quantized GPTQ-style checkpoint sets). Every option
    is validated here.

    torchao (`quant/torchao.py`): `quantization` a preset name ("torchao:int8-weight-only", ...)
    or a torchao `AOBaseConfig` object; options `ignore` and `measure_error`.
    """
    if is_torchao_scheme(quantization):
        unknown = sorted(set(options) - set(TORCHAO_OPTIONS))
        if unknown:
            raise QuantizationOptionError(f"load_model() got unknown option(s) for a torchao scheme: {', '.join(unknown)}; "
                                          f"accepted: {', '.join(TORCHAO_OPTIONS)}")
        config, name = resolve(quantization)
        error_log = QuantErrorLog() if options.get("measure_error") else None
        return TorchaoConfig(config, name, ignore=options.get("ignore", ()), error_log=error_log)
    if quantization not in SUPPORTED_QUANTIZATION:
        supported = ", ".join(repr(q) for q in SUPPORTED_QUANTIZATION)
        raise UnsupportedQuantizationError(f"unsupported quantization {quantization!r}; supported values: {supported}")
    allowed = SCALED_OPTIONS if quantization is not None else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise QuantizationOptionError(
            f"load_model() got unknown option(s) for quantization={quantization!r}: {', '.join(unknown)}"
            + (f"; accepted: {', '.join(allowed)}" if allowed else ""))
    if quantization is None:
        return None
    options = dict(options)
    if "block_size" in options and quantization != ScaledScheme.FP8_BLOCK.value:
        raise ValueError(f"block_size applies to quantization='fp8-block' only, not {quantization!r}")
    for key in ("group_size", "act_order"):
        if key in options and quantization != ScaledScheme.INT4.value:
            raise ValueError(f"{key} applies to quantization='int4' only, not {quantization!r}")
    error_log = QuantErrorLog() if options.pop("measure_error", False) else None
    return ScaledConfig(ScaledScheme(quantization), error_log=error_log, **options)


def check_ignore_patterns(model: torch.nn.Module, config: ScaledConfig | None) -> None:
    """Raise if an `ignore` pattern matches no layer the quant config decides about (likely a typo).

    Matched against each layer's `prefix`, as `ScaledConfig.is_ignored` is (the module's name in the model).
    """
    if config is None or not config.ignore:
        return
    names = [m.prefix for m in model.modules() if getattr(m, "uses_quant_config", False)]
    for pattern in config.ignore:
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(f"ignore pattern {pattern!r} matches no linear or MoE layer; layer names look like "
                             f"{', '.join(names[:4])}")


def make_offload_plan(offload_before_quant: bool, quantize_on: str | None, *, quantization: str | None,
                      device: str | torch.device, streaming: bool) -> OffloadPlan | None:
    """Validate the offload options against the rest of the load (before any memory is touched)."""
    if not offload_before_quant:
        if quantize_on is not None:
            raise ValueError(f"quantize_on={quantize_on!r} only applies with offload_before_quant=True")
        return None
    if quantization is None:
        raise ValueError("offload_before_quant=True needs a quantization scheme (it stages high-precision weights "
                         f"in host memory until they are quantized); choose one of "
                         f"{', '.join(q for q in SUPPORTED_QUANTIZATION if q)}")
    if not streaming:
        raise ValueError("offload_before_quant=True streams layer by layer; it cannot be combined with "
                         "streaming=False (the naive baseline holds the whole high-precision model)")
    plan = OffloadPlan(quantize_on if quantize_on is not None else DEFAULT_QUANTIZE_ON)
    if torch.device(device).type == "cpu":
        warnings.warn("offload_before_quant=True with a CPU target saves nothing: host and device are the same "
                      "memory (the load is bitwise the same, with extra copies)", stacklevel=3)
    return plan
