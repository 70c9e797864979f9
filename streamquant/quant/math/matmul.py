"""`linear`: `F.linear` whose result may be wider than its inputs; `int8_mm`: the exact int8 product.

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

`int8_mm(a, b)` is the exact int32 product of int8 matrices, by whichever kernel is faster for the
shape; every route gives the same bits, so the choice never changes a result (batch size included):
  - `torch._int_mm` on CUDA (more than 16 rows, dims multiples of 8) and on CPU up to
    `INT_MM_CPU_MAX_ROWS` rows: torch 2.13's CPU kernel costs ~1-2 ms per row of a 1024-4096 wide
    layer, linear in the rows (measured on the 2-core AVX2 machine: 4096x4096 at 128 rows 1137 ms);
  - otherwise a float32 GEMM of the codes over slices of `INT8_EXACT_DEPTH` columns, each slice's
    result converted to int32 and summed in int32. Exact: every product is at most 128 * 127 (weight
    codes reach -128 under the compressed-tensors formula; activation codes stay within +-127) and a
    slice's partial sums stay below 128 * 127 * 1024 < 2^24, so float32 holds every intermediate of
    any summation order exactly (4096x4096 at 128 rows: 102 ms; 8 rows: 36 vs 70 ms).

`int8_weight_only_linear(x, codes, scales)` is int8 weight-only (W8A16) by torch's CPU kernel
`torch._weight_int8pack_mm` (bf16 / fp16 activations, scales in the activation dtype): it never
materializes a dequantized weight, and on the AVX2 test machine it beats even a plain bf16 `F.linear`
(1024x2816: 0.82 vs 1.22 ms at 1 row, 3.2 vs 9.0 ms at 8; dequantize-then-linear: 4.3 / 12.1 ms).
Its error against a float64 reference equals dequantize-then-linear's (the bf16 output rounding dominates).
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


INT8_EXACT_DEPTH = 1024  # 128 * 127 * 1024 = 16,646,144 < 2^24: float32 sums of this many products are exact
INT_MM_CPU_MAX_ROWS = 2  # measured crossover of torch._int_mm and the float32 route on CPU (module doc)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int32 product `a @ b` of int8 `a` [M, K] and `b` [K, N] (see the module doc)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm multiplies int8 matrices, got {a.dtype} and {b.dtype}")
    rows, depth, cols = a.shape[0], a.shape[1], b.shape[1]
    if a.device.type == "cpu" and rows <= INT_MM_CPU_MAX_ROWS:
        return torch._int_mm(a, b)
    if a.device.type == "cuda" and rows > 16 and depth % 8 == 0 and cols % 8 == 0:
        return torch._int_mm(a, b)
    out = None
    for start in range(0, depth, INT8_EXACT_DEPTH):
        stop = start + INT8_EXACT_DEPTH
        part = torch.mm(a[:, start:stop].float(), b[start:stop].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(rows, cols, dtype=torch.int32, device=a.device)


def int8_weight_only_applies(x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """Whether `int8_weight_only_linear` serves this call: CPU, bf16 / fp16 activations, output in their
    dtype (no wider partial sums), no bias (the kernel has none: adding it after would round twice)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and out_dtype == x.dtype and bias is None


def int8_weight_only_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (codes * scales[:, None]).T` for int8 `codes` [out, in] and per-row `scales` [out] (see the
    module doc); the scales are used in `x`'s dtype, as the kernel requires."""
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), codes.contiguous(), scales.to(x.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
