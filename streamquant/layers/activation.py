"""Gated activations of the MLP blocks.

`SiluAndMul` takes the output of a merged gate/up projection ([..., 2I]: gate rows first, then up
rows, the order `MergedColumnParallelLinear` writes them) and returns `silu(gate) * up` ([..., I]).
It computes in the input dtype with the same two ops as transformers' `act_fn(gate) * up`, so bf16
results match transformers bit for bit. Under tensor parallelism each rank holds matching slices
of gate and up, so the op is purely local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """`x[..., 2I] -> silu(x[..., :I]) * x[..., I:]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 != 0:
            raise ValueError(f"SiluAndMul needs an even last dimension, got shape {tuple(x.shape)}")
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
