"""Fused MoE experts: the weight layout every MoE method shares and the reference expert computation.

Owns the layout every MoE method shares (the unquantized method is in `unquantized.py`, the scaled
one in `scaled/moe.py`): per layer, `w13_weight` [E, 2 * I_per_rank, H] (the gate rows of each
expert, then its up rows) and `w2_weight` [E, H, I_per_rank] (down projection). Under
tensor parallelism every rank holds all experts and a slice of the intermediate dimension, so each
rank's output is a partial sum that the layer all-reduces.

`fused_experts` is the plain-torch reference: it mirrors the eager experts forward of transformers
5.23 (`Qwen2MoeExperts` / `Qwen3MoeExperts`) op for op -- same expert order, same token order, the
routing weight applied before the cast, accumulation with `index_add_` in the hidden dtype -- so
bf16 results agree with transformers bit for bit on the same device.

Limitations: a Python loop over the experts that received tokens (no grouped GEMM kernel); SiLU
gating only (both Qwen MoE families); no expert parallelism.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamquant.loading.parameters import ModelWeightParameter, WeightLoader
from streamquant.parallel.context import TPContext
from streamquant.quant.math.matmul import PartialSums, linear


# (rows of x, expert index) -> those rows times the expert's weight transposed, like F.linear.
ExpertLinear = Callable[[torch.Tensor, int], torch.Tensor]


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    gate_up: ExpertLinear,
    down: ExpertLinear,
    partial_sums: PartialSums | None = None,
) -> torch.Tensor:
    """Sum over each token's top-k experts of `weight * down(silu(gate(x)) * up(x))`.

    Shapes: x [N, H], topk_weights / topk_ids [N, K] -> [N, H] in `x.dtype`. `gate_up(rows, e)`
    returns [rows, 2I] (gate columns first), `down(rows, e)` returns [rows, H]: the quant method
    decides how an expert's weights are multiplied. `topk_weights` may be in any float dtype; the
    product is cast to `x.dtype` before accumulation, as transformers does.

    With `partial_sums` (TP > 1, `tp.reduce_dtype`; see `quant/math/matmul.py`) `down` returns
    `partial_sums.dtype`; every expert's down output is reduced across the ranks in one collective and
    rounded to `x.dtype` before the routing weights are applied, so the accumulation is TP=1's.
    """
    out = torch.zeros_like(x)
    with torch.no_grad():
        # [E, K, N]: for each expert, which (slot, token) pairs chose it.
        expert_mask = F.one_hot(topk_ids, num_classes=num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    routed = []
    for expert in expert_hit.flatten().tolist():
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        gate, up = gate_up(x[token_idx], expert).chunk(2, dim=-1)
        h = down(F.silu(gate) * up, expert)
        if partial_sums is None:  # combine at once: no per-expert outputs kept
            _combine_(out, top_k_pos, token_idx, h, topk_weights)
        else:
            routed.append((top_k_pos, token_idx, h))
    if partial_sums is not None:
        parts = [h for *_, h in routed]
        flat = torch.cat(parts) if parts else x.new_zeros(0, x.shape[-1], dtype=partial_sums.dtype)
        summed = partial_sums.reduce(flat).to(x.dtype).split([len(h) for h in parts])
        for (top_k_pos, token_idx, _), h in zip(routed, summed):
            _combine_(out, top_k_pos, token_idx, h, topk_weights)
    return out


def _combine_(out: torch.Tensor, top_k_pos: torch.Tensor, token_idx: torch.Tensor, h: torch.Tensor,
              topk_weights: torch.Tensor) -> None:
    """out[token] += routing weight * h, in `out.dtype` (transformers' order of roundings)."""
    h = h * topk_weights[token_idx, top_k_pos, None]
    out.index_add_(0, token_idx, h.to(out.dtype))


def dense_expert_linears(w13: torch.Tensor, w2: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> tuple[int, ExpertLinear, ExpertLinear]:
    """(number of experts, gate_up, down) for plain weight tensors w13 [E, 2I, H] and w2 [E, H, I];
    `down` returns `out_dtype` when given."""
    return w13.shape[0], lambda rows, e: F.linear(rows, w13[e]), lambda rows, e: linear(rows, w2[e], None, out_dtype)


def expert_weights(num_experts: int, hidden_size: int, intermediate_size_per_partition: int, params_dtype: torch.dtype,
                   tp: TPContext, weight_loader: WeightLoader) -> dict[str, ModelWeightParameter]:
    """{"w13_weight": [E, 2I/tp, H], "w2_weight": [E, H, I/tp]} in checkpoint layout, for the MoE loader."""
    shapes = {
        "w13_weight": (num_experts, 2 * intermediate_size_per_partition, hidden_size),
        "w2_weight": (num_experts, hidden_size, intermediate_size_per_partition),
    }
    return {
        name: ModelWeightParameter(data=torch.empty(shape, dtype=params_dtype), output_dim=1, input_dim=2,
                                   weight_loader=weight_loader, tp=tp)
        for name, shape in shapes.items()
    }
