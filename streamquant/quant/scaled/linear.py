"""Quantized linear layers (fp8, int8, MXFP8 codes): `ScaledLinearMethod` and the matmul it shares with the MoE method.

`scaled_matmul(x, codes, scales, layouts, spec, activation)` computes `x @ dequant(W).T`:
  - `activation=None` (weight only): W dequantized to `x.dtype`, then `F.linear`; int8 codes with bf16 /
    fp16 activations on CPU and no bias take torch's int8 weight-only kernel instead
    (`matmul.int8_weight_only_linear`: no dequantized weight, faster than a bf16 `F.linear` there).
  - dynamic activations: `x` is quantized at call time with the same formula as the weights
    (`math.quantize`), per token (`PerRow()`) or per 1x128 group (`PerBlock((1, 128))`); groups are
    over this rank's columns of `x`.
    * per-tensor and per-row weights, where `torch._scaled_mm` has row-wise scaling (CPU; CUDA
      sm90+ with bf16 output): `_scaled_mm(x_q, W_q.T, scale_a=[N, 1], scale_b=[1, out])`. A
      fused layer's per-shard per-tensor scales are expanded to one scale per output row, so q, k
      and v keep their own scales in a single matmul.
    * int8 codes (per-row weights, per-token activations): the exact int32 product (`matmul.int8_mm`:
      `torch._int_mm` or an exact float32 route, the same bits), then
      `acc.float() * scale_x[N, 1] * scale_w[1, out]` (+ bias) in float32, rounded once to the output dtype.
    * otherwise (128x128 blocks or MX 1x32 blocks everywhere, older GPUs, float16/float32 output on CUDA): both
      operands dequantized to float32 and multiplied with `F.linear`, then cast to `x.dtype`.
  The bias is added to the product before its one rounding to the output dtype, as `F.linear` and
  `_scaled_mm(bias=)` do (so a row-parallel layer's float32 partial sums round as TP=1 does).
  With `out_dtype` (a row-parallel layer's float32 partial sums, `quant/math/matmul.py`) the product is
  computed and returned in that dtype instead of `x.dtype`.

Activation tiles live on the GLOBAL input columns of the layer (the weight window's columns), as
weight tiles do: a 1x128 group of a row-parallel layer is a group of the full hidden vector. With
`reduce_over` (the layer's TP context; `tp_invariant_activations=True`) the ranks all-reduce each
token's (group's) amax with MAX before quantizing, so every rank uses the TP=1 activation scales and
the layer's output equals TP=1's up to the order of the final sum. Without it (the default) each
rank scales by its own shard's amax: one collective less per row-parallel matmul, outputs that move
with the TP size by about the activation quantization error.

Tolerance: the result is within the activation quantization error of `F.linear(x, dequant(W))`
computed in float32; the tests state the bound.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from streamquant.parallel.context import TPContext, all_reduce
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.code_format import INT8, CodeFormat
from streamquant.quant.math.quantize import (
    dequantize_window,
    local_scales,
    quantize_window_,
    scale_from_amax,
    window_amax,
)
from streamquant.quant.scaled.online import quantize_layer_weight_
from streamquant.quant.scaled.weights import (
    ScaledWeightSpec,
    ShardLayout,
    create_scaled_weight,
    ScaledWeights,
    require_quantized,
    shard_layouts,
)
from streamquant.quant.scaled.readback import dequantize_weight, row_scales
from streamquant.quant.math.granularity import Granularity, PerBlock, PerRow, PerTensor, Window, tile_shape
from streamquant.quant.math.matmul import int8_mm, int8_weight_only_applies, int8_weight_only_linear, linear
from streamquant.quant.unquantized import linear_weight


def rowwise_scaled_mm_supported(device: torch.device, out_dtype: torch.dtype, k: int, n: int,
                                fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> bool:
    """Whether `torch._scaled_mm` takes row-wise scales for these operands on `device`
    (CPU: any fp8 format and output dtype; NVIDIA CUDA: sm90+, e4m3fn, bf16 output, dims % 16)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.version.cuda is not None:
        major_minor = torch.cuda.get_device_capability(device)
        return (major_minor >= (9, 0) and out_dtype == torch.bfloat16 and fp8_dtype == torch.float8_e4m3fn
                and k % 16 == 0 and n % 16 == 0)
    return False


def quantize_activation(x2: torch.Tensor, activation: Granularity, fmt: CodeFormat, columns: Window,
                        reduce_over: TPContext | None) -> tuple[torch.Tensor, torch.Tensor, Window, tuple[int, int]]:
    """(codes, local scales, window, tile) of activations x2 [N, k] whose columns are `columns`' of the
    global input; with `reduce_over` the amax grid is all-reduced (MAX) first (see the module doc)."""
    window = Window(0, columns.col0, x2.shape[0], columns.global_cols, cols=columns.cols)
    tile = tile_shape(activation, window.global_shape)
    amax = window_amax(x2, window, tile)
    if reduce_over is not None and reduce_over.size > 1 and columns.cols != columns.global_cols:
        all_reduce(amax, reduce_over, dist.ReduceOp.MAX)
    scales = local_scales(scale_from_amax(amax, fmt), window, tile)
    codes = torch.empty(x2.shape, dtype=fmt.dtype, device=x2.device)
    quantize_window_(codes, x2, scales, window, tile, scales_cover_amax=fmt.scales_cover_amax, fmt=fmt)
    return codes, scales, window, tile


def scaled_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    layouts: list[ShardLayout],
    spec: ScaledWeightSpec,
    activation: Granularity | None,
    bias: torch.Tensor | None = None,
    reduce_over: TPContext | None = None,
    out_dtype: torch.dtype | None = None,
    zero_points: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequant(codes, scales).T (+ bias)` for x [..., in] and codes [out, in], in `out_dtype`
    (default `x.dtype`); see the module doc. `zero_points` (packed) and `g_idx`: int4 (weight-only)."""
    out_dtype = out_dtype or x.dtype
    if activation is None:
        if spec.fmt == INT8 and int8_weight_only_applies(x, bias, out_dtype):
            return int8_weight_only_linear(x, codes, row_scales(scales, layouts))
        # the weight in x.dtype, as at TP=1: wider partial sums must not change the weight itself
        return linear(x, dequantize_weight(codes, scales, layouts, x.dtype, zero_points, g_idx), bias, out_dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rowwise = isinstance(spec.granularity, (PerTensor, PerRow)) and isinstance(activation, PerRow)
    xq, sx, window, tile = quantize_activation(x2, activation, spec.fmt, layouts[0].window, reduce_over)
    if rowwise and spec.fmt.integer:
        y = int8_mm(xq, codes.t()).float().mul_(sx).mul_(row_scales(scales, layouts).unsqueeze(0))
        y = (y if bias is None else y.add_(bias.float())).to(out_dtype)
    elif rowwise and not spec.fmt.integer and rowwise_scaled_mm_supported(x.device, out_dtype, k, codes.shape[0],
                                                                           codes.dtype):
        sw = row_scales(scales, layouts).unsqueeze(0)
        bias = None if bias is None else bias.to(out_dtype)
        y = torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=out_dtype)
    else:
        xd = dequantize_window(xq, sx, window, tile, torch.float32)
        bias = None if bias is None else bias.float()
        y = F.linear(xd, dequantize_weight(codes, scales, layouts, torch.float32), bias).to(out_dtype)
    return y.reshape(*lead, y.shape[-1])


class ScaledLinearMethod(ScaledWeights):
    """Online fp8 for a linear layer: bf16 checkpoint weight in, fp8 `weight` + `weight_scale` out.

    One instance per layer (`create_weights` records the layer's TP context and shard layouts).
    """

    def __init__(self, spec: ScaledWeightSpec, activation: Granularity | None, error_log: QuantErrorLog | None = None,
                 tp_invariant: bool = False):
        self.spec = spec
        self.activation = activation
        self.error_log = error_log
        self.tp_invariant = tp_invariant  # all-reduce activation amaxes of row-parallel layers (module doc)

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, tp, weight_loader) -> None:
        checkpoint_weight = linear_weight(output_partition_sizes, input_size_per_partition, params_dtype, tp,
                                          weight_loader)
        create_scaled_weight(layer, "weight", checkpoint_weight, self.spec)
        self.tp = tp  # the context the weight is split over (a replicated layer gets a single rank)
        self.layouts = shard_layouts(layer.logical_shards["weight"], self.spec.granularity)

    def process_weights_after_loading(self, layer) -> None:
        quantize_layer_weight_(layer, "weight", self.spec, self.tp, self.error_log)

    def apply(self, layer, x, bias=None, out_dtype=None):
        require_quantized(layer, "weight")
        return scaled_matmul(x, layer.weight, layer.weight_scale, self.layouts, self.spec, self.activation, bias,
                          self.tp if self.tp_invariant else None, out_dtype, getattr(layer, "weight_zero_point", None),
                          getattr(layer, "weight_g_idx", None))


def default_activation(granularity: Granularity) -> Granularity:
    """Dynamic activation groups matching a weight granularity: 1 x block cols for blocks, else per token."""
    if isinstance(granularity, PerBlock):
        return PerBlock((1, granularity.block_size[1]))
    return PerRow()
