"""The quant-method seam: what every weight-bearing layer delegates its weights to.

A layer never creates its own weights. It asks its quant method to `create_weights` on it, the
loader fills them through each parameter's `weight_loader`, the load calls
`process_weights_after_loading` once a layer is complete, and `forward` calls `apply`.
A `QuantConfig` picks the method for each layer by the layer's kind and prefix (its module name).

Every method is also a `loading.contract.WeightMethod`: it tells the load session which parameters
take checkpoint tensors (`checkpoint_params`, `quantized_loaders`) and which it derives from them
(`derived_tensors`). A method whose layer computes with exactly what the checkpoint writes inherits
`DirectWeights` (nothing staged, nothing derived).

The unquantized methods live in `unquantized.py`; the scaled-code (`scaled/`) and torchao
(`torchao.py`) methods implement the same protocols.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch

from streamquant.loading.contract import WeightMethod
from streamquant.loading.parameters import WeightLoader
from streamquant.parallel.context import TPContext
from streamquant.quant.math.matmul import PartialSums


@runtime_checkable
class LinearMethod(WeightMethod, Protocol):
    """Creates, post-processes and applies a linear layer's weights."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        tp: TPContext,
        weight_loader: WeightLoader,
    ) -> None: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`x @ W.T (+ bias)`, in `out_dtype` when given (a row-parallel layer's wider partial sums,
        see `quant/math/matmul.py`), else in `x.dtype`."""
        ...


class QuantConfig(Protocol):
    """Chooses the method for each layer. `prefix` is the layer's module name in the model."""

    def get_linear_method(self, prefix: str) -> LinearMethod: ...

    def get_moe_method(self, prefix: str) -> "MoEMethod": ...

    def get_embedding_method(self, prefix: str) -> "EmbeddingMethod": ...


@runtime_checkable
class MoEMethod(WeightMethod, Protocol):
    """Creates, post-processes and applies fused MoE expert weights (w13 [E, 2I, H], w2 [E, H, I])."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        tp: TPContext,
        weight_loader: WeightLoader,
    ) -> None: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        partial_sums: "PartialSums | None" = None,
    ) -> torch.Tensor:
        """The routed experts' sum for each token; with `partial_sums` the experts' outputs are
        reduced across the ranks inside, in its dtype (`quant/math/matmul.py`), so nothing is left to reduce."""
        ...


@runtime_checkable
class EmbeddingMethod(WeightMethod, Protocol):
    """Creates and applies a vocab-parallel embedding / LM head weight ([vocab_per_rank, hidden])."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_embeddings_per_partition: int,
        embedding_dim: int,
        params_dtype: torch.dtype,
        tp: TPContext,
        weight_loader: WeightLoader,
    ) -> None: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    def embedding(self, layer: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor: ...

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


class DirectWeights:
    """The `WeightMethod` answers of a method whose layer's own parameters take the checkpoint as it is."""

    def checkpoint_params(self, layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {}

    def quantized_loaders(self, layer: torch.nn.Module) -> dict[str, WeightLoader]:
        return {}

    def derived_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {}


def check_ignore(ignore) -> tuple[str, ...]:
    """A config's `ignore` as a tuple of valid regexes (matched with `re.search` against layer prefixes)."""
    if isinstance(ignore, str):
        raise TypeError("ignore must be a sequence of regexes, not one string")
    ignore = tuple(ignore)  # read once: a generator would be empty after the checks
    for pattern in ignore:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"ignore pattern {pattern!r} is not a valid regex: {e}") from None
    return ignore
