"""On-disk quantized checkpoint formats, one module per format, each owning read and write.

`compressed_tensors` (llm-compressor's output, vLLM's and transformers' reader) and `hf_fp8`
(transformers' FineGrainedFP8 / DeepSeek block fp8) are read and written; `FORMATS` names them. `gptq`
and `awq` are read only: their layers are converted, as they stream in, into compressed-tensors'
`pack-quantized` int4 layout (`to_compressed_tensors`; `shapes_as_compressed_tensors` for headers). `read_quantization_config` turns a checkpoint's
`quantization_config` into a `QuantizedCheckpoint` (fp8), an `Int4Checkpoint` (GPTQ / AWQ), None (not
quantized) or a `QuantizationConfigError` naming the field and value it cannot load;
`checkpoint_quantization_config` finds that dict for a checkpoint directory (config.json's, else
GPTQ's quantize_config.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import MappingProxyType

import torch

from streamquant.formats import gptq
from streamquant.formats.awq import AWQ
from streamquant.formats.base import CheckpointFormat, QuantizationConfigError, QuantizedCheckpoint, QuantizedWeight
from streamquant.formats.compressed_tensors import COMPRESSED_TENSORS
from streamquant.formats.gptq import GPTQ
from streamquant.formats.hf_fp8 import HF_FP8
from streamquant.formats.int4 import Int4Checkpoint, PackedTensorError

# Read-only: format name -> format.
FORMATS: MappingProxyType[str, CheckpointFormat] = MappingProxyType({f.name: f for f in (COMPRESSED_TENSORS, HF_FP8)})
DEFAULT_FORMAT = COMPRESSED_TENSORS.name
# quantization_config.quant_method -> format
_BY_METHOD = MappingProxyType({"compressed-tensors": COMPRESSED_TENSORS, "fp8": HF_FP8, "gptq": GPTQ, "awq": AWQ})
# Int4Checkpoint.format -> the read-only format that converts its tensors
_INT4 = MappingProxyType({GPTQ.name: GPTQ, AWQ.name: AWQ})


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


def read_quantization_config(config: dict | None) -> QuantizedCheckpoint | Int4Checkpoint | None:
    """What a checkpoint's `quantization_config` (a dict, or None) says it holds."""
    if not config:
        return None
    if not isinstance(config, dict):
        raise QuantizationConfigError(f"quantization_config must be a JSON object, got {type(config).__name__}")
    method = config.get("quant_method")
    if method not in _BY_METHOD:
        raise QuantizationConfigError(f"quantization_config.quant_method = {method!r} is not supported "
                                      f"(supported: {', '.join(repr(m) for m in _BY_METHOD)})")
    return _BY_METHOD[method].read_config(config)


def checkpoint_quantization_config(directory: str | Path) -> dict | None:
    """A checkpoint directory's `quantization_config`: config.json's, else GPTQ's quantize_config.json, else None."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    found = config.get("quantization_config") if isinstance(config, dict) else None
    return found if found else gptq.quantize_config(directory)


def to_compressed_tensors(weights: Iterable[tuple[str, torch.Tensor]],
                          checkpoint: Int4Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """A GPTQ / AWQ checkpoint's tensors in compressed-tensors' pack-quantized layout (formats/int4.py)."""
    return _INT4[checkpoint.format].to_compressed_tensors(weights, checkpoint)


def shapes_as_compressed_tensors(shapes: dict[str, tuple[int, ...]], checkpoint: Int4Checkpoint) -> dict:
    """A GPTQ / AWQ checkpoint's header shapes as `to_compressed_tensors` will emit its tensors (to plan a load)."""
    return _INT4[checkpoint.format].shapes_as_compressed_tensors(shapes, checkpoint)


__all__ = ["DEFAULT_FORMAT", "FORMATS", "CheckpointFormat", "Int4Checkpoint", "PackedTensorError",
           "QuantizationConfigError", "QuantizedCheckpoint", "QuantizedWeight", "checkpoint_quantization_config", "get_format",
           "read_quantization_config", "shapes_as_compressed_tensors", "to_compressed_tensors"]
