"""Checkpoint tensors in, checkpoint-layout quantized tensors out: the one function offline quantization,
the `quantize` command and trainer-side quantization (`WeightSender(quantization=...)`) share.

`quantize_weights(weights, plan)` turns `(name, high-precision tensor)` pairs into the format's tensors
of each quantized weight (codes and scales; int4 in compressed-tensors: packed codes, scales, zero
points, shape) in the plan's format and naming (`QuantizePlan`, `CheckpointFormat.disk_tensors`);
tensors the plan keeps in high precision pass through, cast to the plan's dtype; fused MoE expert
tensors come out per expert (`QuantizePlan.expand`). The codes and scales are bitwise
what an online `load_model(quantization=..., formula=...)` computes for the same weight (same
formula, same tiles of the same logical weight), which is what makes a pre-quantized load or reload
equal to an online one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from streamquant.formats import QuantizedWeight
from streamquant.loading.validate import check_tensor
from streamquant.offline.plan import QuantizedTensor, QuantizePlan
from streamquant.quant.math.int4 import quantize_asymmetric
from streamquant.quant.math.quantize import quantize


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in `dtype` (no copy when they already are); others unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class Quantized(NamedTuple):
    weight: torch.Tensor  # the high-precision weight in the plan's dtype
    quantized: QuantizedWeight  # codes (unpacked), float32 tile grid of scales, zero points or None
    disk: list[tuple[str, torch.Tensor]]  # the same as the format stores them (`CheckpointFormat.disk_tensors`)


def quantize_tensor(name: str, tensor: torch.Tensor, rule: QuantizedTensor, plan: QuantizePlan) -> Quantized:
    """One checkpoint tensor quantized as the plan says (NaN / Inf refused, naming the tensor)."""
    check_tensor(name, tensor, finite=False)  # the dtype; NaN / Inf show up in the scales below
    w = tensor.to(plan.dtype)
    spec = rule.spec
    if spec.fmt.zero_point:
        quantized = QuantizedWeight(*quantize_asymmetric(w, spec.granularity.block_size, spec.formula))
    else:
        quantized = QuantizedWeight(*quantize(w, spec.granularity, spec.fmt, formula=spec.formula))
    if not bool(torch.isfinite(quantized.scales).all()):
        raise ValueError(f"checkpoint tensor {name!r} holds NaN or Inf values; refusing to quantize it")
    return Quantized(w, quantized, plan.fmt.disk_tensors(name, quantized, rule.config, w.dtype))


def quantize_weights(weights: Iterable[tuple[str, torch.Tensor]], plan: QuantizePlan,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs in checkpoint layout -> the same in the plan's quantized format (see module doc)."""
    for fused_name, fused in weights:
        for name, tensor in plan.expand(fused_name, fused):
            rule = plan.rule(name)
            if rule is None:
                yield name, cast(tensor, plan.dtype)
                continue
            yield from quantize_tensor(name, tensor, rule, plan).disk
