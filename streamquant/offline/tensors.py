"""Checkpoint tensors in, checkpoint-layout fp8 tensors out: the one function offline quantization,
the `quantize` command and trainer-side quantization (`WeightSender(quantization=...)`) share.

`quantize_weights(weights, plan)` turns `(name, high-precision tensor)` pairs into `(name, fp8 codes)`
and `(scale name, scales)` pairs in the plan's format and naming (`QuantizePlan`); tensors the plan
keeps in high precision pass through, cast to the plan's dtype (`QuantizePlan.dtype_of`); fused MoE expert tensors come out per
expert (`QuantizePlan.expand`). The codes and scales are bitwise
what an online `load_model(quantization=..., formula=...)` computes for the same weight (same
formula, same tiles of the same logical weight), which is what makes a pre-quantized load or reload
equal to an online one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from streamquant.loading.validate import check_tensor
from streamquant.offline.plan import QuantizedTensor, QuantizePlan
from streamquant.quant.math.quantize import quantize


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in `dtype` (no copy when they already are); others unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class Quantized(NamedTuple):
    weight: torch.Tensor  # the high-precision weight in the plan's dtype
    codes: torch.Tensor
    scales: torch.Tensor  # float32 tile grid [..., grid_rows, grid_cols]
    disk_scales: torch.Tensor  # the same in the format's on-disk shape and dtype


def quantize_tensor(name: str, tensor: torch.Tensor, rule: QuantizedTensor, plan: QuantizePlan) -> Quantized:
    """One checkpoint tensor quantized as the plan says (NaN / Inf refused, naming the tensor)."""
    check_tensor(name, tensor, finite=False)  # the dtype; NaN / Inf show up in the scales below
    w = tensor.to(plan.dtype)
    codes, scales = quantize(w, rule.spec.granularity, rule.spec.fmt, formula=rule.spec.formula)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"checkpoint tensor {name!r} holds NaN or Inf values; refusing to quantize it")
    return Quantized(w, codes, scales, plan.fmt.scale_to_disk(scales, rule.scheme, w.dtype, rule.spec.formula))


def quantize_weights(weights: Iterable[tuple[str, torch.Tensor]], plan: QuantizePlan,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs in checkpoint layout -> the same in the plan's quantized format (see module doc)."""
    for fused_name, fused in weights:
        for name, tensor in plan.expand(fused_name, fused):
            rule = plan.rule(name)
            if rule is None:
                yield name, cast(tensor, plan.dtype_of(name))
                continue
            out = quantize_tensor(name, tensor, rule, plan)
            yield rule.name, out.codes
            yield rule.scale_name, out.disk_scales
