"""Qwen2-MoE and Qwen3-MoE: the Llama decoder with sparse MoE blocks.

Qwen2-MoE adds a shared expert whose output is scaled by `sigmoid(shared_expert_gate(x))`.
Routing is softmax top-k, renormalized when `norm_topk_prob`. The router (`mlp.gate`) and the
shared-expert gate stay in the model dtype whatever the quantization. Partial expert and shared
expert outputs are summed before a single all-reduce (with `tp.reduce_dtype`, each is reduced on
its own, see `quant/math/matmul.py`).
"""

from __future__ import annotations

import torch

from streamquant.layers.linear import ReplicatedLinear
from streamquant.layers.moe import FusedMoE, expert_mapping_rules
from streamquant.models.base import stacked_rules
from streamquant.models.llama import Build, DecoderSpec, LlamaForCausalLM, LlamaMLP
from streamquant.parallel.context import all_reduce


class SparseMoeBlock(torch.nn.Module):
    """Router + fused experts (+ optional gated shared expert)."""

    def __init__(self, config, *, build: Build, prefix: str, shared_expert_size: int = 0):
        super().__init__()
        self.tp = build.tp
        # float32 partial sums (tp.reduce_dtype): experts and shared expert each reduce their own, so
        # their sum is taken in the model dtype as at TP=1 (two collectives instead of one)
        self.parts_reduce = build.tp.partial_sum_dtype(build.params_dtype) is not None
        self.gate = ReplicatedLinear(
            config.hidden_size, config.num_experts, bias=False, quant_config=None, prefix=f"{prefix}.gate",
            params_dtype=build.params_dtype)
        self.experts = FusedMoE(
            config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob), tp=build.tp, quant_config=build.quant_config,
            params_dtype=build.params_dtype, prefix=f"{prefix}.experts", reduce_results=self.parts_reduce)
        self.has_shared = shared_expert_size > 0
        if self.has_shared:
            self.shared_expert = LlamaMLP(
                config.hidden_size, shared_expert_size, bias=False, build=build, prefix=f"{prefix}.shared_expert",
                reduce_results=self.parts_reduce)
            self.shared_expert_gate = ReplicatedLinear(
                config.hidden_size, 1, bias=False, quant_config=None, prefix=f"{prefix}.shared_expert_gate",
                params_dtype=build.params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self.experts(flat, self.gate(flat))
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (out if self.parts_reduce else all_reduce(out, self.tp)).view(shape)


def is_sparse_layer(config, layer_idx: int) -> bool:
    """HF's rule: not in `mlp_only_layers`, and every `decoder_sparse_step`-th layer."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE: qkv bias, shared expert with sigmoid gate."""

    shared_expert = True

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        return DecoderSpec(qkv_bias=bool(getattr(config, "qkv_bias", True)))

    def mapping_rules(self):
        return expert_mapping_rules() + stacked_rules()

    def make_mlp(self, layer_idx: int, prefix: str, build: Build) -> torch.nn.Module:
        c = self.config
        if not is_sparse_layer(c, layer_idx):
            return LlamaMLP(c.hidden_size, c.intermediate_size, bias=False, build=build, prefix=prefix)
        shared = getattr(c, "shared_expert_intermediate_size", 0) if self.shared_expert else 0
        return SparseMoeBlock(c, build=build, prefix=prefix, shared_expert_size=shared)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: q/k norm, no shared expert."""

    shared_expert = False

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)
