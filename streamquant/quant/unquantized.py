"""Unquantized methods: weights stay in the model dtype. The first implementation of the seam."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamquant.loading.parameters import ColumnParameter, ModelWeightParameter, WeightLoader
from streamquant.parallel.context import TPContext
from streamquant.quant.base import DirectWeights
from streamquant.quant.math.matmul import PartialSums, linear
from streamquant.quant.experts import dense_expert_linears, expert_weights, fused_experts


def linear_weight(output_partition_sizes, input_size_per_partition, params_dtype, tp, weight_loader) -> ModelWeightParameter:
    """The [out_per_rank, in_per_rank] weight in checkpoint layout that the linear loaders write."""
    return ModelWeightParameter(
        data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
        input_dim=1,
        output_dim=0,
        weight_loader=weight_loader,
        tp=tp,
    )


class UnquantizedLinearMethod(DirectWeights):
    """Weights stay in `params_dtype`; `apply` is `F.linear`."""

    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        tp,
        weight_loader,
    ) -> None:
        weight = linear_weight(output_partition_sizes, input_size_per_partition, params_dtype, tp, weight_loader)
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer) -> None:
        return None

    def apply(self, layer, x, bias=None, out_dtype=None):
        return linear(x, layer.weight, bias, out_dtype)


class UnquantizedEmbeddingMethod(DirectWeights):
    """Embedding / LM head weight [vocab_per_rank, hidden] in `params_dtype`, split along the vocab.

    `embedding` is `F.embedding` (ids already local to this rank); `apply` is `F.linear`.
    """

    def create_weights(
        self, layer, num_embeddings_per_partition, embedding_dim, params_dtype, tp, weight_loader
    ) -> None:
        weight = ColumnParameter(
            data=torch.empty(num_embeddings_per_partition, embedding_dim, dtype=params_dtype),
            output_dim=0,
            weight_loader=weight_loader,
            tp=tp,
        )
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer) -> None:
        return None

    def embedding(self, layer, input_ids):
        return F.embedding(input_ids, layer.weight)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class UnquantizedFusedMoEMethod(DirectWeights):
    """w13 [E, 2I/tp, H] and w2 [E, H, I/tp] in the model dtype; `apply` is `fused_experts`.

    Both weights are `ModelWeightParameter`s with `output_dim=1, input_dim=2`: each expert's slice
    is an ordinary [out, in] linear weight, which is what a later quantizing method needs to know
    (per-output-channel scales run along dim 1). The sharding itself is done by the layer's
    `weight_loader` (`streamquant.layers.moe.moe_weight_loader`), not by the parameter's `load_*`
    methods: w13 is split along its output dim, w2 along its input dim.
    """

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        tp: TPContext,
        weight_loader: WeightLoader,
    ) -> None:
        params = expert_weights(num_experts, hidden_size, intermediate_size_per_partition, params_dtype, tp, weight_loader)
        for name, param in params.items():
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        partial_sums: PartialSums | None = None,
    ) -> torch.Tensor:
        out_dtype = partial_sums.dtype if partial_sums else None
        return fused_experts(x, topk_weights, topk_ids, *dense_expert_linears(layer.w13_weight, layer.w2_weight, out_dtype),
                             partial_sums)
