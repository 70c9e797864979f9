"""`load_model`: the one orchestrator that turns a checkpoint into a ready, evaluated model.

Data flows one way: resolve the checkpoint -> read its HF config -> pick the model class -> build
the model on `meta` (no memory) -> stream `iterate_weights` through a `StreamingLoadSession`, which
gives each module storage on the target device at its first tensor and runs its quant method's
`process_weights_after_loading` at its last (strict by default) -> move buffers computed at build
time to the device -> `eval()`. A parameter never written (only possible with `strict=False`) stays
on `meta`, so using it fails loudly instead of computing with uninitialized memory. A frozen `LoadReport` is attached to the
model as `model.load_report`.

Invariants: the tensor-parallel context is either given or read once from the initialized
`torch.distributed` group, and handed to the model constructor; nothing else reads the group.

Pre-quantized checkpoints (`config.json` has a `quantization_config`): the checkpoint decides the
scheme (`formats/prequantized.py`), and the session loads its fp8 codes and scales straight into the fp8
layers (`quantized_source=True`): nothing is quantized and no high-precision weight exists.

Quantization: `make_quant_config` is the single place that turns a scheme name ("fp8",
"fp8-channel", "fp8-block", "int8", "mxfp8") and its options into a quant config; the fp8 methods quantize each
layer inside the streaming session the moment its last element arrives, so high-precision weights
exist only for the layers in flight.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from streamquant.checkpoint.config_sizes import check_config_sizes, check_model_fits
from streamquant.checkpoint.reader import (
    checkpoint_bytes,
    checkpoint_shapes,
    iterate_weights,
    load_hf_config,
    resolve_checkpoint,
)
from streamquant.loading.session import load_weights, loadable_parameters, process_weights_after_loading
from streamquant.loading.materialize import materialize_
from streamquant.loading.offload import DEFAULT_QUANTIZE_ON, OffloadPlan
from streamquant.loading.streaming import stream_weights
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext
from streamquant.formats.prequantized import prequantized_plan, prequantized_tensors
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.torchao import TORCHAO_PRESETS, TorchaoConfig, inner_tensors, is_torchao_scheme, resolve

# Scheme names accepted by `load_model(quantization=...)`; None means unquantized (weights in `dtype`).
SUPPORTED_QUANTIZATION: tuple[str | None, ...] = (None, *(s.value for s in ScaledScheme), *TORCHAO_PRESETS)
# Options `load_model` accepts with an fp8 scheme (see `make_quant_config`).
FP8_OPTIONS = ("fp8_dtype", "activation_scheme", "ignore", "block_size", "group_size", "symmetric", "compile", "formula",
               "tp_invariant_activations", "measure_error")
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


@dataclass(frozen=True)
class LoadReport:
    """What one `load_model` call read and built (on this rank)."""

    checkpoint_bytes: int  # bytes of tensor data in the checkpoint files (all ranks read the same files)
    model_bytes: int  # bytes of unique parameter and buffer storage of the model on this rank
    load_seconds: float  # wall time of the `load_model` call, less `quantization_error["measure_seconds"]`
    quantization: str | None = None  # the scheme, None when unquantized
    fp8_weight_bytes: int = 0  # bytes of fp8 weights on this rank (scales not included)
    quantization_error: dict | None = None  # `QuantErrorLog.summary()` when measure_error=True (its own seconds)


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
    (record per-weight SQNR). Every option is validated here.

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
    allowed = FP8_OPTIONS if quantization is not None else ()
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
    if "group_size" in options and quantization != ScaledScheme.INT4.value:
        raise ValueError(f"group_size applies to quantization='int4' only, not {quantization!r}")
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


def fp8_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of code tensors (fp8, int8, packed int4; torchao weights' inner codes included) on this rank."""
    codes = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz, torch.int8,
             torch.int32)  # int32: packed int4 codes (no other parameter is int32)
    inner = [t for p in model.parameters() for t in inner_tensors(p).values()]
    return sum(t.numel() * t.element_size() for t in inner if t.dtype in codes and not t.is_meta)


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


def default_tp() -> TPContext:
    """This process's TP context: the whole initialized process group, or a single rank."""
    if dist.is_available() and dist.is_initialized():
        return TPContext.from_process_group()
    return TPContext()


def model_storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers.

    Tied or aliased tensors (views of one storage) are counted once, with their whole storage.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for tensor in [plain for t in tensors for plain in inner_tensors(t).values()]:  # tensor subclasses: their insides
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if tensor.is_meta:  # never written (strict=False): no memory
            continue
        if key[1] == 0 or key not in seen:  # address 0: empty storage, nothing shared
            seen.add(key)
            total += storage.nbytes()
    return total


def _move_buffers_(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers made at build time (e.g. rotary `inv_freq`, computed on the CPU) go to `device`."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[name] = buf.to(device)


def _load_naive(model: torch.nn.Module, checkpoint: Path, device: str | torch.device, check_finite: bool) -> None:
    """Every checkpoint-format weight in memory first, then quantize (the baseline streaming beats)."""
    for param in loadable_parameters(model).values():
        materialize_(param, device)
    load_weights(model, iterate_weights(checkpoint), model.weight_mapping, strict=True, check_finite=check_finite)
    process_weights_after_loading(model)


def load_model(
    path: str | Path,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    tp: TPContext | None = None,
    strict: bool = True,
    streaming: bool = True,
    staging_budget: int | None = None,
    offload_before_quant: bool = False,
    quantize_on: str | None = None,
    check_finite: bool = True,
    **options: Any,
) -> torch.nn.Module:
    """Load the checkpoint at `path` (directory or hub id) into streamquant's model for it.

    `quantization`: None, "fp8", "fp8-channel", "fp8-block", "int8" or "mxfp8" (`quant/scaled/config.py`), or
    a torchao scheme: a preset name ("torchao:int8-weight-only", ...) or any torchao `AOBaseConfig`
    that applies to `nn.Linear` (`quant/torchao.py`); `options` are the options of `make_quant_config`. A pre-quantized checkpoint (compressed-tensors or hf-fp8, see `formats/`)
    is loaded as it is: `quantization` may be None or must agree, `activation_scheme` and `formula`
    may be given (the formula a later bf16 reload quantizes with), and `model.prequantized` holds
    what its config said (None for high-precision checkpoints). `tp` defaults to the initialized process group (or a single rank).
    `strict=False` tolerates checkpoint tensors without a parameter and parameters left unwritten.
    `streaming=False` is the naive baseline kept for comparisons: the whole high-precision model
    is loaded first, then every layer is quantized; the resulting model is bitwise the same.
    `staging_budget` (bytes) bounds the high-precision staging of layers in flight when the
    checkpoint arrives out of layer order (see `loading/streaming.py`); None: unbounded.
    `offload_before_quant=True` stages the high-precision weights in host memory (pinned for CUDA)
    and places only quantized weights on `device`; `quantize_on` ("device", the default, or "cpu")
    says where each complete layer is quantized (see `loading/offload.py`). A model loaded so
    keeps the plan (`model.offload_plan`), and `reload_weights` stages the same way.
    Every checkpoint tensor must be bf16 / fp16 / fp32 / fp64 and free of NaN and Inf
    (`loading/validate.py`); `check_finite=False` skips the NaN / Inf pass over unquantized tensors
    (measured ~20% of a bf16 load, a few percent of an fp8 one; quantized weights stay checked).
    The returned model is in eval mode and carries `model.load_report` (a `LoadReport`).
    """
    start = time.perf_counter()
    if not streaming and not strict:
        raise ValueError("streaming=False (the naive baseline) needs strict=True")
    if quantization is not None or not options:  # options alone may belong to a pre-quantized checkpoint
        make_quant_config(quantization, options)  # validated before the checkpoint is touched
    offload = make_offload_plan(offload_before_quant, quantize_on, quantization=quantization, device=device,
                                streaming=streaming)
    params_dtype = resolve_dtype(dtype)
    checkpoint = resolve_checkpoint(path)
    hf_config = load_hf_config(checkpoint)
    model_class = get_model_class(hf_config)
    shapes = checkpoint_shapes(checkpoint)
    prequantized, quantization, options = prequantized_plan(checkpoint, model_class, hf_config, shapes,
                                                            quantization, options)
    if quantization is None and options:
        raise QuantizationOptionError(f"fp8 option(s) {', '.join(sorted(options))} need a quantization scheme "
                                      "(quantization=..., --quantization) or a pre-quantized checkpoint")
    quant_config = make_quant_config(quantization, options)
    tp = default_tp() if tp is None else tp
    check_config_sizes(hf_config, shapes)
    with torch.device("meta"):
        model = model_class(hf_config, tp=tp, quant_config=quant_config, params_dtype=params_dtype)
    if strict:  # strict=False may load a partial checkpoint on purpose
        check_model_fits(model, loadable_parameters(model, prequantized is not None), shapes)
    check_ignore_patterns(model, quant_config)
    weights = iterate_weights(checkpoint)
    if prequantized is not None:
        if not streaming or offload is not None:
            raise ValueError("a pre-quantized checkpoint loads its fp8 codes directly: streaming=False and "
                             "offload_before_quant=True do not apply")
        weights = prequantized_tensors(weights, prequantized, params_dtype)
    model.prequantized = prequantized.checkpoint if prequantized is not None else None
    if streaming:
        stream_weights(model, weights, model.weight_mapping, device=device, strict=strict,
                       check_finite=check_finite, staging_budget=staging_budget, offload=offload,
                       quantized_source=prequantized is not None)
    else:
        _load_naive(model, checkpoint, device, check_finite)
    _move_buffers_(model, torch.device(device))
    model.offload_plan = offload
    model.eval()
    error_log = quant_config.error_log if quant_config else None
    model.load_report = LoadReport(
        checkpoint_bytes=checkpoint_bytes(checkpoint),
        model_bytes=model_storage_bytes(model),
        load_seconds=time.perf_counter() - start - (error_log.seconds if error_log else 0.0),
        quantization=quant_config.name if isinstance(quant_config, TorchaoConfig) else quantization,
        fp8_weight_bytes=fp8_weight_bytes(model),
        quantization_error=error_log.summary() if error_log else None,
    )
    return model
