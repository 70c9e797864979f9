"""Unquantized methods: weights stay in the model dtype. The first implementation of the seam."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamquant.loading.parameters import ColumnParameter, ModelWeightParameter
from streamquant.quant.base import EmbeddingMethod, LinearMethod, MoEMethod
from streamquant.quant.matmul import linear
from streamquant.quant.moe import UnquantizedFusedMoEMethod


def linear_weight(output_partition_sizes, input_size_per_partition, params_dtype, tp, weight_loader) -> ModelWeightParameter:
    """The [out_per_rank, in_per_rank] weight in checkpoint layout that the linear loaders write."""
    return ModelWeightParameter(
        data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
        input_dim=1,
        output_dim=0,
        weight_loader=weight_loader,
        tp=tp,
    )


class UnquantizedLinearMethod:
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


class UnquantizedEmbeddingMethod:
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


class UnquantizedConfig:
    """No quantization: every layer gets an unquantized method."""

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def get_moe_method(self, prefix: str) -> MoEMethod:
        return UnquantizedFusedMoEMethod()

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()
