"""DeepSeek-V3 (and R1, Kimi K2: the same architecture name) and DeepSeek-V2: latent attention and
routed + shared experts on the Llama decoder.

Each layer is the Llama pre-norm block with `MultiHeadLatentAttention` (`layers/mla.py`) and, from
layer `first_k_dense_replace` on, `DeepseekMoE`: the router (`mlp.gate`), the routed experts
(`FusedMoE` with DeepSeek's `GroupedTopK` routing, `layers/moe.py`) and `n_shared_experts` shared
experts as one dense MLP of `moe_intermediate_size * n_shared_experts`, added to the routed sum.
The layers before are dense MLPs of `intermediate_size`.

V3 routes by sigmoid scores with `e_score_correction_bias`, group-limited top-k (`n_group`,
`topk_group`), `norm_topk_prob` and `routed_scaling_factor`. V2 routes by softmax scores, greedy
(`topk_method: greedy`) or group-limited (`group_limited_greedy`), times `routed_scaling_factor`,
renormalized when `norm_topk_prob` (as DeepSeek's own code; transformers' V2 port never
renormalizes, and the published V2 configs say false). V3 keeps `rope_interleave` from the config;
V2 always rotates interleaved pairs (transformers' complex rotation, computed here in real numbers).

What stays in high precision whatever the quantization: the router -- `gate.weight` and
`e_score_correction_bias` are float32 parameters (transformers keeps them so) and the router logits
are computed in float32 --, norms, embeddings and the LM head. Every other linear is quantized,
the latent projections and kv_b_proj included. Under tensor parallelism the shared experts are a
column / row-parallel MLP; their partial sum and the routed experts' are reduced together (or each
on its own with `tp.reduce_dtype`, as the Qwen MoE block does).

The multi-token-prediction layers a checkpoint may carry after the last layer
(`model.layers.{num_hidden_layers + i}`, `num_nextn_predict_layers` of them) are skipped, as
transformers skips them.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import yarn_apply_mscale

from streamquant.layers.linear import ReplicatedLinear
from streamquant.layers.mla import MLADims, MultiHeadLatentAttention
from streamquant.layers.moe import FusedMoE, GroupedTopK, expert_mapping_rules
from streamquant.layers.rotary import get_rope
from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.parameters import BaseParameter
from streamquant.models.base import AttentionGeometry, gate_up_rules
from streamquant.models.llama import Build, DecoderSpec, LlamaForCausalLM, LlamaMLP
from streamquant.parallel.context import all_reduce


class TopkRouter(ReplicatedLinear):
    """The router gate in float32 (`x.float() @ weight.T`), with V3's `e_score_correction_bias` [E]."""

    def __init__(self, hidden_size: int, num_experts: int, *, correction_bias: bool, prefix: str):
        super().__init__(hidden_size, num_experts, bias=False, quant_config=None, prefix=prefix,
                         params_dtype=torch.float32)
        if correction_bias:
            data = torch.empty(num_experts, dtype=torch.float32)
            self.e_score_correction_bias = BaseParameter(data=data, weight_loader=default_weight_loader)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class DeepseekMoE(torch.nn.Module):
    """Router, routed experts and shared experts of one MoE layer."""

    def __init__(self, config, routing: GroupedTopK, *, correction_bias: bool, mlp_bias: bool, build: Build,
                 prefix: str):
        super().__init__()
        self.tp = build.tp
        self.parts_reduce = build.tp.partial_sum_dtype(build.params_dtype) is not None  # see qwen_moe.py
        self.gate = TopkRouter(config.hidden_size, config.n_routed_experts, correction_bias=correction_bias,
                               prefix=f"{prefix}.gate")
        self.experts = FusedMoE(
            config.n_routed_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob), tp=build.tp, quant_config=build.quant_config,
            params_dtype=build.params_dtype, prefix=f"{prefix}.experts", reduce_results=self.parts_reduce,
            grouped=routing)
        shared = config.moe_intermediate_size * (getattr(config, "n_shared_experts", None) or 0)
        self.shared_experts = LlamaMLP(
            config.hidden_size, shared, bias=mlp_bias, build=build, prefix=f"{prefix}.shared_experts",
            reduce_results=self.parts_reduce) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self.experts(flat, self.gate(flat), self.gate.e_score_correction_bias)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return (out if self.parts_reduce else all_reduce(out, self.tp)).view(shape)


def mla_dims(config) -> MLADims:
    return MLADims(config.hidden_size, config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank,
                   config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.rms_norm_eps,
                   bool(getattr(config, "attention_bias", False)))


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    """DeepSeek-V3 / R1 / Kimi K2 (module doc)."""

    correction_bias = True  # the router has e_score_correction_bias

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        return DecoderSpec(mlp_bias=bool(getattr(config, "mlp_bias", False)))

    @staticmethod
    def routing(config) -> GroupedTopK:
        return GroupedTopK(config.n_group or 1, config.topk_group or 1, "sigmoid", float(config.routed_scaling_factor))

    @staticmethod
    def rope_interleaved(config) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    def mapping_rules(self):
        return expert_mapping_rules() + gate_up_rules()

    def skipped_names(self) -> tuple[str, ...]:
        layers = self.config.num_hidden_layers
        mtp = getattr(self.config, "num_nextn_predict_layers", 0) or 0
        return super().skipped_names() + tuple(f"model.layers.{layers + i}" for i in range(mtp))

    def attention_geometry(self) -> AttentionGeometry:
        c = self.config  # the cache: one shared latent "head" and its rope key (layers/mla.py)
        return AttentionGeometry(c.num_hidden_layers, 1, c.kv_lora_rank, value_size=c.qk_rope_head_dim)

    def make_attention(self, layer_idx: int, prefix: str, build: Build) -> torch.nn.Module:
        c = self.config
        dims = mla_dims(c)
        rotary = get_rope(dims.qk_rope_head_dim, c, dtype=build.params_dtype, interleaved=self.rope_interleaved(c))
        scale = yarn_apply_mscale(c.rope_parameters, dims.qk_head_dim**-0.5)
        return MultiHeadLatentAttention(dims, rotary, scale, **build.kw(prefix))

    def make_mlp(self, layer_idx: int, prefix: str, build: Build) -> torch.nn.Module:
        c = self.config
        bias = self.decoder_spec(c).mlp_bias
        if layer_idx < (c.first_k_dense_replace or 0) or not c.n_routed_experts:
            return LlamaMLP(c.hidden_size, c.intermediate_size, bias=bias, build=build, prefix=prefix)
        return DeepseekMoE(c, self.routing(c), correction_bias=self.correction_bias, mlp_bias=bias, build=build,
                           prefix=prefix)


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    """DeepSeek-V2 / V2-Lite: softmax routing without correction bias, interleaved rope (module doc)."""

    correction_bias = False

    @staticmethod
    def routing(config) -> GroupedTopK:
        method = getattr(config, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        groups = (config.n_group or 1, config.topk_group or 1) if method == "group_limited_greedy" else (1, 1)
        return GroupedTopK(*groups, "softmax", float(config.routed_scaling_factor))

    @staticmethod
    def rope_interleaved(config) -> bool:
        return True
