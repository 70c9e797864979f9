"""`load_model`: the one orchestrator that turns a checkpoint into a ready, evaluated model.

Data flows one way: resolve the checkpoint -> read its HF config -> pick the model class -> build
the model on `meta` (no memory) -> stream `iterate_weights` (counted on a progress bar where one is drawn,
`progress.py`) through `loading.streaming.stream_weights`,
which gives each module storage on the target device at its first tensor and runs its quant method's
`process_weights_after_loading` at its last (strict by default) -> move buffers computed at build
time to the device -> `eval()`. A parameter never written (only possible with `strict=False`) stays
on `meta`, so using it fails loudly instead of computing with uninitialized memory. A frozen `LoadReport` is attached to the
model as `model.load_report`.

Invariants: the tensor-parallel context is either given or read once from the initialized
`torch.distributed` group, and handed to the model constructor; nothing else reads the group.

Pre-quantized checkpoints (`config.json` has a `quantization_config`, or GPTQ's quantize_config.json is
beside it): the checkpoint decides the scheme (`formats/prequantized.py`: fp8, int8 or int4; GPTQ and AWQ
convert to compressed-tensors' int4 as they stream in), and the session loads its codes and scales straight into the quantized
layers (`quantized_source=True`): nothing is quantized and no high-precision weight exists.

Quantization: `make_quant_config` is the single place that turns a scheme name ("fp8",
"fp8-channel", "fp8-block", "int8", "mxfp8") and its options into a quant config; the fp8 methods quantize each
layer inside the streaming session the moment its last element arrives, so high-precision weights
exist only for the layers in flight.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamquant.checkpoint.config_sizes import check_config_sizes, check_model_fits
from streamquant.config import (
    QuantizationOptionError,
    check_ignore_patterns,
    make_offload_plan,
    make_quant_config,
    resolve_dtype,
)
from streamquant.checkpoint.reader import (
    checkpoint_bytes,
    checkpoint_shapes,
    checkpoint_totals,
    iterate_weights,
    load_hf_config,
    resolve_checkpoint,
)
from streamquant.loading.contract import loadable_parameters
from streamquant.loading.streaming import stream_weights
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext, default_tp
from streamquant.progress import progress_over, wants_progress
from streamquant.formats.prequantized import prequantized_plan, prequantized_tensors
from streamquant.quant.torchao import TorchaoConfig, inner_tensors

@dataclass(frozen=True)
class LoadReport:
    """What one `load_model` call read and built (on this rank)."""

    checkpoint_bytes: int  # bytes of tensor data in the checkpoint files (all ranks read the same files)
    model_bytes: int  # bytes of unique parameter and buffer storage of the model on this rank
    load_seconds: float  # wall time of the `load_model` call, less `quantization_error["measure_seconds"]`
    quantization: str | None = None  # the scheme, None when unquantized
    quantized_weight_bytes: int = 0  # bytes of code tensors (fp8, int8, packed int4) on this rank, scales not included
    quantization_error: dict | None = None  # `QuantErrorLog.summary()` when measure_error=True (its own seconds)
    checkpoint_elements: int = 0  # elements of every checkpoint tensor (x 2: the checkpoint's size in bf16)

    @property
    def fp8_weight_bytes(self) -> int:
        """Deprecated alias of `quantized_weight_bytes` (it counts int8 and int4 codes too); removed in 0.3."""
        warnings.warn("LoadReport.fp8_weight_bytes is deprecated: use quantized_weight_bytes", DeprecationWarning,
                      stacklevel=2)
        return self.quantized_weight_bytes


def quantized_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of code tensors (fp8, int8, packed int4; torchao weights' inner codes included) on this rank."""
    codes = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz, torch.int8,
             torch.int32)  # int32: packed int4 codes (no other parameter is int32)
    inner = [t for p in model.parameters() for t in inner_tensors(p).values()]
    return sum(t.numel() * t.element_size() for t in inner if t.dtype in codes and not t.is_meta)


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
    progress: bool | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Load the checkpoint at `path` (directory or hub id) into streamquant's model for it.

    `quantization`: None, "fp8", "fp8-channel", "fp8-block", "int8" or "mxfp8" (`quant/scaled/config.py`), or
    a torchao scheme: a preset name ("torchao:int8-weight-only", ...) or any torchao `AOBaseConfig`
    that applies to `nn.Linear` (`quant/torchao.py`); `options` are the options of `make_quant_config`. A pre-quantized checkpoint (compressed-tensors, hf-fp8, GPTQ or AWQ, see `formats/`)
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
    `progress`: a bar of bytes and tensors on stderr (`streamquant/progress.py`); None (default): only
    where stderr is a terminal, as `from_pretrained` does; only tensor-parallel rank 0 draws.
    The returned model is in eval mode and carries `model.load_report` (a `LoadReport`).
    """
    start = time.perf_counter()
    if not streaming and not strict:
        raise ValueError("streaming=False (the naive baseline) needs strict=True")
    # validated before the checkpoint is touched; options alone may belong to a pre-quantized checkpoint
    quant_config = make_quant_config(quantization, options, device) if quantization is not None or not options else None
    offload = make_offload_plan(offload_before_quant, quantize_on, quantization=quantization, device=device,
                                streaming=streaming)
    params_dtype = resolve_dtype(dtype)
    checkpoint = resolve_checkpoint(path)
    hf_config = load_hf_config(checkpoint)
    model_class = get_model_class(hf_config)
    shapes = checkpoint_shapes(checkpoint)
    prequantized, quantization, options = prequantized_plan(model_class, hf_config, checkpoint, shapes,
                                                            quantization, options)
    model_shapes = prequantized.shapes if prequantized is not None else shapes  # GPTQ / AWQ: as converted
    if quantization is None and options:
        raise QuantizationOptionError(f"fp8 option(s) {', '.join(sorted(options))} need a quantization scheme "
                                      "(quantization=..., --quantization) or a pre-quantized checkpoint")
    if prequantized is not None:  # the checkpoint's scheme, its options under the user's
        quant_config = make_quant_config(quantization, options, device)
    tp = default_tp() if tp is None else tp
    check_config_sizes(hf_config, model_shapes)
    with torch.device("meta"):
        model = model_class(hf_config, tp=tp, quant_config=quant_config, params_dtype=params_dtype)
    if strict:  # strict=False may load a partial checkpoint on purpose
        check_model_fits(model, loadable_parameters(model, prequantized is not None), model_shapes)
    check_ignore_patterns(model, quant_config)
    if prequantized is not None and (not streaming or offload is not None):
        raise ValueError("a pre-quantized checkpoint loads its codes directly: streaming=False and "
                         "offload_before_quant=True do not apply")
    model.prequantized = prequantized.checkpoint if prequantized is not None else None
    with progress_over(iterate_weights(checkpoint), "load", enabled=wants_progress(progress, rank=tp.rank),
                       totals=lambda: checkpoint_totals(checkpoint)) as weights:
        if prequantized is not None:
            weights = prequantized_tensors(weights, prequantized, params_dtype)
        stream_weights(model, weights, model.weight_mapping, device=device, strict=strict, check_finite=check_finite,
                       staging_budget=staging_budget, offload=offload, quantized_source=prequantized is not None,
                       hold_layers=not streaming)
    _move_buffers_(model, torch.device(device))
    model.offload_plan = offload
    model.eval()
    error_log = quant_config.error_log if quant_config else None
    model.load_report = LoadReport(
        checkpoint_bytes=checkpoint_bytes(checkpoint),
        model_bytes=model_storage_bytes(model),
        load_seconds=time.perf_counter() - start - (error_log.seconds if error_log else 0.0),
        quantization=quant_config.name if isinstance(quant_config, TorchaoConfig) else quantization,
        quantized_weight_bytes=quantized_weight_bytes(model),
        quantization_error=error_log.summary() if error_log else None,
        checkpoint_elements=sum(math.prod(shape) for shape in shapes.values()),
    )
    return model
