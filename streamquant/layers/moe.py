"""Fused MoE experts layer (Qwen2-MoE / Qwen3-MoE): routing, expert weights, their loader and names.

`FusedMoE` holds all experts of one MoE block as two parameters created by its quant method:
`w13_weight` [E, 2 * I/tp, H] (gate rows, then up rows) and `w2_weight` [E, H, I/tp]. Every rank
holds every expert and a 1/tp slice of the intermediate dimension; `forward` returns the partial
sum all-reduced (or not, with `reduce_results=False`). The router gate is not part of this layer:
the model computes `router_logits` (a `ReplicatedLinear`) and passes them in.

`moe_weight_loader` accepts both formats a checkpoint can come in:
  * per expert, as saved on disk: `experts.{e}.gate_proj.weight` [I, H] (shard "w1"),
    `experts.{e}.up_proj.weight` [I, H] ("w3"), `experts.{e}.down_proj.weight` [H, I] ("w2");
  * all experts fused, as transformers 5 holds them in memory (what an RL trainer's
    `named_parameters()` yields): `experts.gate_up_proj` [E, 2I, H] ("w13") and
    `experts.down_proj` [E, H, I] ("w2"), with `expert_id=None`.
Every combination of shard id and expert id (None = all experts) is accepted; shapes are checked
exactly against the full checkpoint tensor, not only against the slice a rank takes. The same loader
takes pre-quantized codes: int8 / fp8 as they are, int4 packed eight per int32 along the input (w2's
input is split in packed units). Their scales, zero points and group indices have their own loader
(`loading/tiled.py`), reached by the rules below for `weight_scale`, `weight_zero_point`, `weight_g_idx`.

Routing mirrors transformers 5.23's `Qwen2MoeTopKRouter` exactly: softmax in float32, top-k,
optional renormalization, weights cast back to the router logits' dtype.

Limitation: `expert_mapping_rules` must come before any dense `gate_proj -> gate_up_proj` rule in a
model's mapping (first match wins, and the dense rule also matches `experts.3.gate_proj.weight`).
"""

from __future__ import annotations

import functools

import torch

from streamquant.loading.mapping import MappingRule
from streamquant.loading.parameters import WeightShapeError, write_region
from streamquant.loading.region import Region
from streamquant.parallel.context import TPContext, all_reduce, divide
from streamquant.quant.base import MoEMethod, QuantConfig
from streamquant.quant.math.granularity import LogicalShard, Window
from streamquant.quant.math.matmul import PartialSums
from streamquant.quant.unquantized import UnquantizedFusedMoEMethod

# Which half of w13's rows a gate / up shard fills.
_W13_HALF = {"w1": 0, "w3": 1}
SHARD_IDS = ("w1", "w3", "w13", "w2")


def _expert_rows(param: torch.Tensor, expert_id: int | None, shard_id: str) -> tuple[int, int]:
    num_experts = param.shape[0]
    if expert_id is None:
        return 0, num_experts
    if not 0 <= expert_id < num_experts:
        raise ValueError(f"expert id {expert_id} (shard {shard_id!r}) is out of range for {num_experts} experts")
    return expert_id, expert_id + 1


def _expected_shape(shard_id: str, param: torch.Tensor, full_intermediate: int, tp: TPContext) -> tuple[int, int]:
    """Shape of one expert's checkpoint tensor for `shard_id` (unsharded), in the parameter's units
    (w2's input in packed units when its codes are packed along the input)."""
    if shard_id in _W13_HALF:
        return full_intermediate, param.shape[2]
    if shard_id == "w13":
        return 2 * full_intermediate, param.shape[2]
    return param.shape[1], param.shape[2] * tp.size


def moe_weight_loader(
    param: torch.Tensor,
    loaded: torch.Tensor,
    *,
    shard_id: str,
    expert_id: int | None = None,
    intermediate_size_per_partition: int,
    tp: TPContext,
) -> list[Region]:
    """Write this rank's slice of one expert's (or, with `expert_id=None`, every expert's) shard."""
    if shard_id not in SHARD_IDS:
        raise ValueError(f"unknown MoE shard id {shard_id!r}; expected one of {', '.join(SHARD_IDS)}")
    lo, hi = _expert_rows(param, expert_id, shard_id)
    i_p = intermediate_size_per_partition
    expected = _expected_shape(shard_id, param, i_p * tp.size, tp)
    if expert_id is None:
        expected = (hi - lo, *expected)
    if tuple(loaded.shape) != expected:
        who = "all experts" if expert_id is None else f"expert {expert_id}"
        raise WeightShapeError(
            f"{who}, shard {shard_id!r}: expected checkpoint shape {list(expected)}, received {list(loaded.shape)}"
        )
    src = loaded if expert_id is None else loaded.unsqueeze(0)
    experts = (lo, hi)
    if shard_id == "w2":  # this rank's input columns: i_p, or i_p / 8 packed int4 words
        cols = param.shape[2]
        return write_region(param, (experts, (0, param.shape[1]), (0, cols)), src.narrow(2, tp.rank * cols, cols))
    halves = src.chunk(2, dim=1) if shard_id == "w13" else (src,)
    first = 0 if shard_id == "w13" else _W13_HALF[shard_id]
    regions = []
    for half, part in enumerate(halves, start=first):
        region = (experts, (half * i_p, (half + 1) * i_p), (0, param.shape[2]))
        regions += write_region(param, region, part.narrow(1, tp.rank * i_p, i_p))
    return regions


def moe_logical_shards(hidden_size: int, intermediate_size: int, tp: TPContext) -> dict[str, tuple[LogicalShard, ...]]:
    """Each expert's logical weights and this rank's windows of them: gate and up (rows of w13), down (w2)."""
    i_p = intermediate_size // tp.size
    column = Window(tp.rank * i_p, 0, intermediate_size, hidden_size, rows=i_p)
    return {
        "w13_weight": (LogicalShard("gate", column), LogicalShard("up", column)),
        "w2_weight": (LogicalShard("down", Window(0, tp.rank * i_p, hidden_size, intermediate_size, cols=i_p)),),
    }


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing as transformers' Qwen MoE routers: (weights [N, K] in the logits' dtype, ids [N, K])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def expert_mapping_rules() -> tuple[MappingRule, ...]:
    """Checkpoint names -> `experts.w13_weight` / `experts.w2_weight`, per-expert and fused formats."""
    scales = tuple(  # pre-quantized checkpoints: each expert projection's scales, zero points, group indices
        MappingRule.make(f"experts.{{expert}}.{proj}.{suffix}", f"experts.{param}_{suffix}", shard_id=shard)
        for proj, param, shard in (("gate_proj", "w13", "w1"), ("up_proj", "w13", "w3"), ("down_proj", "w2", "w2"))
        for suffix in ("weight_scale", "weight_zero_point", "weight_g_idx"))
    return scales + (
        MappingRule.make("experts.{expert}.gate_proj.weight", "experts.w13_weight", shard_id="w1"),
        MappingRule.make("experts.{expert}.up_proj.weight", "experts.w13_weight", shard_id="w3"),
        MappingRule.make("experts.{expert}.down_proj.weight", "experts.w2_weight", shard_id="w2"),
        MappingRule.make("experts.gate_up_proj", "experts.w13_weight", shard_id="w13"),
        MappingRule.make("experts.down_proj", "experts.w2_weight", shard_id="w2"),
    )


class FusedMoE(torch.nn.Module):
    """All routed experts of one MoE block; `forward(hidden, router_logits)`."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        renormalize: bool,
        tp: TPContext = TPContext(),
        quant_config: QuantConfig | None = None,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
        reduce_results: bool = True,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{prefix}: top_k {top_k} must be in [1, {num_experts}] (the number of experts)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_per_partition = divide(intermediate_size, tp.size, f"{prefix} moe intermediate size")
        self.renormalize = renormalize
        self.tp = tp
        self.prefix = prefix
        self.reduce_results = reduce_results
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.uses_quant_config = quant_config is not None
        self.quant_method: MoEMethod = (
            quant_config.get_moe_method(prefix) if quant_config is not None else UnquantizedFusedMoEMethod()
        )
        loader = functools.partial(
            moe_weight_loader, intermediate_size_per_partition=self.intermediate_size_per_partition, tp=tp
        )
        self.logical_shards = moe_logical_shards(hidden_size, intermediate_size, tp)
        self.quant_method.create_weights(
            self, num_experts, hidden_size, self.intermediate_size_per_partition, self.params_dtype, tp, loader
        )

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        hidden = hidden.reshape(-1, self.hidden_size)
        topk_weights, topk_ids = select_experts(router_logits.reshape(-1, self.num_experts), self.top_k, self.renormalize)
        wide = self.tp.partial_sum_dtype(hidden.dtype) if self.reduce_results else None
        if wide is not None:  # the experts' outputs reduced in `tp.reduce_dtype` inside (quant/math/matmul.py)
            sums = PartialSums(wide, lambda t: all_reduce(t, self.tp))
            return self.quant_method.apply(self, hidden, topk_weights, topk_ids, sums).reshape(shape)
        out = self.quant_method.apply(self, hidden, topk_weights, topk_ids)
        if self.reduce_results:
            out = all_reduce(out, self.tp)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, tp={self.tp.rank}/{self.tp.size}, prefix={self.prefix!r}"
        )
