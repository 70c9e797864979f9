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

Limitations: only unquantized loading today. The quantization seam is `make_quant_config` below:
it is the single place that turns a scheme name and its options into a quant config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist

from streamquant.checkpoint.reader import checkpoint_bytes, iterate_weights, load_hf_config, resolve_checkpoint
from streamquant.loading.streaming import stream_weights
from streamquant.models import get_model_class
from streamquant.parallel import TPContext

# Scheme names accepted by `load_model(quantization=...)`; None means unquantized (weights in `dtype`).
SUPPORTED_QUANTIZATION: tuple[str | None, ...] = (None,)

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


@dataclass(frozen=True)
class LoadReport:
    """What one `load_model` call read and built (on this rank)."""

    checkpoint_bytes: int  # bytes of tensor data in the checkpoint files (all ranks read the same files)
    model_bytes: int  # bytes of unique parameter and buffer storage of the model on this rank
    load_seconds: float  # wall time of the whole `load_model` call


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A `torch.dtype` from a dtype or one of the names in `DTYPE_NAMES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {', '.join(DTYPE_NAMES)}")


def make_quant_config(quantization: str | None, options: dict[str, Any]) -> Any:
    """The quant config for scheme `quantization` with its `options` (None: unquantized).

    The fp8 work replaces this function; every scheme and option is validated here, and nowhere
    else in `load_model`.
    """
    if quantization not in SUPPORTED_QUANTIZATION:
        supported = ", ".join(repr(q) for q in SUPPORTED_QUANTIZATION)
        raise UnsupportedQuantizationError(f"unsupported quantization {quantization!r}; supported values: {supported}")
    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"load_model() got unknown option(s) for quantization={quantization!r}: {names}")
    return None


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
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key[1] == 0 or key not in seen:  # address 0: empty (or meta) storage, nothing shared
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
    **options: Any,
) -> torch.nn.Module:
    """Load the checkpoint at `path` (directory or hub id) into streamquant's model for it.

    `tp` defaults to the initialized process group (or a single rank). `strict=False` tolerates
    checkpoint tensors without a parameter and parameters left unwritten. The returned model is in
    eval mode and carries `model.load_report` (a `LoadReport`).
    """
    start = time.perf_counter()
    quant_config = make_quant_config(quantization, options)
    params_dtype = resolve_dtype(dtype)
    tp = default_tp() if tp is None else tp
    checkpoint = resolve_checkpoint(path)
    hf_config = load_hf_config(checkpoint)
    model_class = get_model_class(hf_config)
    with torch.device("meta"):
        model = model_class(hf_config, tp=tp, quant_config=quant_config, params_dtype=params_dtype)
    stream_weights(model, iterate_weights(checkpoint), model.weight_mapping, device=device, strict=strict)
    _move_buffers_(model, torch.device(device))
    model.eval()
    model.load_report = LoadReport(
        checkpoint_bytes=checkpoint_bytes(checkpoint),
        model_bytes=model_storage_bytes(model),
        load_seconds=time.perf_counter() - start,
    )
    return model
