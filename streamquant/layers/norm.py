"""Normalization layers: RMSNorm (Llama / Qwen / Mistral families) and LayerNorm (OPT).

Both hold replicated `BaseParameter`s loaded whole by `default_weight_loader`; under tensor
parallelism every rank keeps the full weight and normalizes full hidden vectors.

`RMSNorm.forward` is transformers' `LlamaRMSNorm` op for op (fp32 variance, `rsqrt`, cast back to
the input dtype, then multiply by the weight), so bf16 outputs match transformers exactly. It
normalizes over the last dimension only, which also serves per-head q/k norms (Qwen3) applied to
[..., heads, head_dim] tensors.

Limitations: no fused residual add; no Gemma-style `(1 + weight)` offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.parameters import BaseParameter


def _replicated(data: torch.Tensor) -> BaseParameter:
    return BaseParameter(data=data, weight_loader=default_weight_loader)


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, variance in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = _replicated(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"


class LayerNorm(nn.Module):
    """`F.layer_norm` over the last dimension, with optional bias."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, *, bias: bool = True, params_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = _replicated(torch.ones(hidden_size, dtype=dtype))
        if bias:
            self.bias = _replicated(torch.zeros(hidden_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"
