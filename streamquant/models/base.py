"""What every streamquant causal LM shares: strict table-driven loading, KV caches, positions.

A model subclass builds its modules, sets `self.weight_mapping` (a `WeightMapping`: checkpoint
names -> fused parameters, as data) and the attention geometry, and implements `compute_logits`
over `(input_ids, positions, kv_cache, start_pos)`. Logits always come back in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.layers.attention import KVCache
from streamquant.loading.mapping import MappingRule, WeightMapping
from streamquant.parallel.context import TPContext


@dataclass(frozen=True)
class AttentionGeometry:
    """Per-rank attention sizes, needed to allocate a KV cache (`value_size`: None, the head size)."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    value_size: int | None = None


def gate_up_rules() -> tuple[MappingRule, ...]:
    """gate/up -> gate_up_proj."""
    return (
        MappingRule.make("gate_proj", "gate_up_proj", shard_id=0),
        MappingRule.make("up_proj", "gate_up_proj", shard_id=1),
    )


def stacked_rules(prefix: str = "") -> tuple[MappingRule, ...]:
    """q/k/v -> qkv_proj (under an optional segment prefix) and gate/up -> gate_up_proj."""
    p = f"{prefix}." if prefix else ""
    return (
        MappingRule.make(f"{p}q_proj", f"{p}qkv_proj", shard_id="q"),
        MappingRule.make(f"{p}k_proj", f"{p}qkv_proj", shard_id="k"),
        MappingRule.make(f"{p}v_proj", f"{p}qkv_proj", shard_id="v"),
    ) + gate_up_rules()


class ModelNotReadyError(RuntimeError):
    """The model's weights are not a consistent set (a reload failed part-way); reload to fix."""


class CausalLM(torch.nn.Module):
    """Base of every model: `forward(input_ids) -> float32 logits`, `weight_mapping`, `new_kv_cache`."""

    weight_mapping: WeightMapping
    geometry: AttentionGeometry

    def __init__(self, hf_config, tp: TPContext, params_dtype: torch.dtype):
        super().__init__()
        self.config = hf_config
        self.tp = tp
        self.params_dtype = params_dtype
        self.weights_version = 0  # incremented by every successful `reload_weights`
        self.not_ready_reason: str | None = None  # set by a failed non-atomic update; forward refuses
        self.active_update = None  # the `update.WeightUpdate` in progress, if any (one at a time); forward refuses
        self.offload_plan = None  # set by load_model(offload_before_quant=True); reloads stage the same way

    def compute_logits(self, input_ids, positions, kv_cache, start_pos) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        if self.active_update is not None:
            raise ModelNotReadyError("a weight update is in progress: its weights are mixed until finish()")
        if self.not_ready_reason is not None:
            raise ModelNotReadyError(self.not_ready_reason)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        if positions is None:
            t = input_ids.shape[1]
            positions = torch.arange(start_pos, start_pos + t, device=input_ids.device).expand(input_ids.shape[0], t)
        return self.compute_logits(input_ids, positions, kv_cache, start_pos).float()

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for this rank's heads, on the model's device and dtype."""
        g = self.geometry
        device = next(self.parameters()).device
        return KVCache(g.num_layers, batch_size, max_len, g.num_kv_heads, g.head_size, dtype=self.params_dtype,
                       device=device, value_size=g.value_size)
