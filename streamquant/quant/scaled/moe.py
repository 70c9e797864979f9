"""fp8 MoE experts: w13 and w2 quantized per expert, multiplied with the linear layers' fp8 matmul.

Each expert's slice of w13 [E, 2I/tp, H] and w2 [E, H, I/tp] is an independent weight with its own
scales (per expert, and per logical shard: gate and up get separate scales, as separate
`gate_proj` / `up_proj` layers would). Scales: `w13_weight_scale` [E, S13, C13], `w2_weight_scale`
[E, S2, C2]. Limitation: the experts run one at a time (`fused_experts`), no grouped fp8 GEMM.
"""

from __future__ import annotations

import torch

from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.scaled.linear import scaled_matmul
from streamquant.quant.scaled.online import quantize_layer_weight_
from streamquant.quant.scaled.weights import (
    ScaledWeightSpec,
    ScaledWeights,
    create_scaled_weight,
    require_quantized,
    shard_layouts,
)
from streamquant.quant.math.granularity import Granularity
from streamquant.quant.experts import expert_weights, fused_experts

WEIGHTS = ("w13_weight", "w2_weight")


class ScaledMoEMethod(ScaledWeights):
    """Online fp8 for fused experts; one instance per layer."""

    def __init__(self, spec: ScaledWeightSpec, activation: Granularity | None, error_log: QuantErrorLog | None = None,
                 tp_invariant: bool = False):
        self.spec = spec
        self.activation = activation
        self.error_log = error_log
        self.tp_invariant = tp_invariant  # see scaled.linear: w2's activations are row-parallel

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, tp,
                       weight_loader) -> None:
        params = expert_weights(num_experts, hidden_size, intermediate_size_per_partition, params_dtype, tp, weight_loader)
        for name, checkpoint_weight in params.items():
            create_scaled_weight(layer, name, checkpoint_weight, self.spec)
        self.tp = tp
        self.layouts = {name: shard_layouts(layer.logical_shards[name], self.spec.granularity) for name in WEIGHTS}

    def process_weights_after_loading(self, layer) -> None:
        for name in WEIGHTS:
            quantize_layer_weight_(layer, name, self.spec, self.tp, self.error_log)

    def _expert_linear(self, layer, name: str, out_dtype: torch.dtype | None = None):
        codes, scales, layouts = getattr(layer, name), getattr(layer, f"{name}_scale"), self.layouts[name]
        zeros, g_idx = getattr(layer, f"{name}_zero_point", None), getattr(layer, f"{name}_g_idx", None)
        reduce_over = self.tp if self.tp_invariant else None
        return lambda rows, e: scaled_matmul(rows, codes[e], scales[e], layouts, self.spec, self.activation, None,
                                          reduce_over, out_dtype, None if zeros is None else zeros[e],
                                          None if g_idx is None else g_idx[e])

    def apply(self, layer, x, topk_weights, topk_ids, partial_sums=None):
        for name in WEIGHTS:
            require_quantized(layer, name)
        down = self._expert_linear(layer, "w2_weight", partial_sums.dtype if partial_sums else None)
        return fused_experts(x, topk_weights, topk_ids, layer.w13_weight.shape[0],
                             self._expert_linear(layer, "w13_weight"), down, partial_sums)
