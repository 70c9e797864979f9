"""Offline quantization: high-precision checkpoints or tensors in, quantized checkpoint layout out.

`quantize_checkpoint` (the `streamquant quantize` command) writes a checkpoint directory;
`quantize_weights` does the same to an iterator of tensors (trainer-side quantization);
`QuantizePlan` decides, per tensor, what the online path would quantize.
"""

from streamquant.offline.plan import QuantizePlan
from streamquant.offline.quantize import QuantizeReport, quantize_checkpoint
from streamquant.offline.tensors import quantize_weights

__all__ = ["QuantizePlan", "QuantizeReport", "quantize_checkpoint", "quantize_weights"]
