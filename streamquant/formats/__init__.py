"""On-disk quantized checkpoint formats, one module per format, each owning read and write.

`compressed_tensors` (llm-compressor's output, vLLM's and transformers' reader) and `hf_fp8`
(transformers' FineGrainedFP8 / DeepSeek block fp8). `FORMATS` names them; `read_quantization_config`
turns a checkpoint's `quantization_config` into a `QuantizedCheckpoint` (None: not quantized) or a
`QuantizationConfigError` naming the field and value it cannot load.
"""

from __future__ import annotations

from types import MappingProxyType

from streamquant.formats.base import CheckpointFormat, QuantizationConfigError, QuantizedCheckpoint, QuantizedWeight
from streamquant.formats.compressed_tensors import COMPRESSED_TENSORS
from streamquant.formats.hf_fp8 import HF_FP8

# Read-only: format name -> format.
FORMATS: MappingProxyType[str, CheckpointFormat] = MappingProxyType({f.name: f for f in (COMPRESSED_TENSORS, HF_FP8)})
DEFAULT_FORMAT = COMPRESSED_TENSORS.name
# quantization_config.quant_method -> format
_BY_METHOD = MappingProxyType({"compressed-tensors": COMPRESSED_TENSORS, "fp8": HF_FP8})


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


def read_quantization_config(config: dict | None) -> QuantizedCheckpoint | None:
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


__all__ = ["DEFAULT_FORMAT", "FORMATS", "CheckpointFormat", "QuantizationConfigError", "QuantizedCheckpoint",
           "QuantizedWeight", "get_format", "read_quantization_config"]
