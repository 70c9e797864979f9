"""`linear`: `F.linear` whose result may be wider than its inputs.

A row-parallel layer's output is a partial sum that the ranks all-reduce. Rounded to bf16 before
the sum, it carries one rounding per rank that TP=1 never makes (reported on a 135M Llama at TP=3:
bf16 logits 0.875 away from TP=1's; measured here on a small Llama at TP=2: 7.6e-3 mean, 0 with
float32 partial sums, `tests/models/test_tp_reduce_dtype.py`). With `out_dtype=torch.float32` the product of bf16 / fp16
operands is kept in float32: the operands are cast up (bf16 x bf16 products are exact in float32,
as inside a bf16 GEMM, which accumulates in float32), so the only rounding to the model dtype is
the one after the all-reduce, as at TP=1. An MoE layer rounds each expert's output at TP=1
before weighting and summing the experts, so its float32 partial sums are the per-(token, expert)
down-projection outputs, reduced in one collective of K times the layer output (`PartialSums`).

Cost: on CPU (no `mm(out_dtype=)` kernel there in torch 2.13) the weight is cast to float32 at
every call, so the row-parallel matmuls read three times the bytes (measured in
`benchmarks/rollout.py`). On CUDA the same float32 path is taken (correct, not the fastest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PartialSums:
    """How a row-parallel MoE layer reduces its experts' partial outputs itself: computed in `dtype`,
    summed across the ranks by `reduce` (in place), before the routing weights are applied."""

    dtype: torch.dtype
    reduce: Callable[[torch.Tensor], torch.Tensor]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, its result in `out_dtype` without an intermediate rounding to
    `x.dtype` (None, or `x.dtype`: exactly `F.linear`)."""
    if out_dtype is None or out_dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(out_dtype), weight.to(out_dtype), None if bias is None else bias.to(out_dtype))
