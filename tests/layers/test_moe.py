"""FusedMoE against transformers' Qwen2-MoE / Qwen3-MoE sparse blocks (tiny configs, CPU, float32), and
DeepSeek's grouped routing against transformers' DeepSeek-V3 / V2 routers.

Weights come from a real transformers model in both formats a load can see: per expert, as
`save_pretrained` writes them, and fused (`experts.gate_up_proj` / `experts.down_proj`), as
transformers 5 holds them in memory. Parameters are NaN-filled before loading so any element a
loader failed to write would poison the output.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import (DeepseekV2Config, DeepseekV3Config, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from streamquant.layers.linear import ReplicatedLinear
from streamquant.layers.moe import FusedMoE, GroupedTopK, expert_mapping_rules, grouped_topk, moe_weight_loader
from streamquant.loading.errors import DuplicateWeightError, MissingWeightsError, WeightLoadError
from streamquant.loading.streaming import stream_weights
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.parameters import WeightShapeError
from streamquant.parallel.context import TPContext

HIDDEN, MOE_INTERMEDIATE, EXPERTS, TOP_K = 16, 8, 6, 2
FAMILIES = {"qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}


def _hf_model(family: str):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=32, hidden_size=HIDDEN, intermediate_size=24, moe_intermediate_size=MOE_INTERMEDIATE,
        shared_expert_intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_experts=EXPERTS, num_experts_per_tok=TOP_K, experts_implementation="eager",
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # well-spread routing and O(1) activations
        for p in (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj):
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf(request, tmp_path_factory):
    """(mlp block, per-expert checkpoint items, fused in-memory items), names relative to the layer."""
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    prefix = "model.layers.0."
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        per_expert = [(k[len(prefix):], f.get_tensor(k)) for k in f.keys() if k.startswith(prefix + "mlp.experts.")]
    gate = ("mlp.gate.weight", model.model.layers[0].mlp.gate.weight.detach().clone())
    fused = [(k[len(prefix):], v.clone()) for k, v in model.state_dict().items() if k.startswith(prefix + "mlp.experts.")]
    assert len(per_expert) == 3 * EXPERTS and len(fused) == 2
    return model.model.layers[0].mlp, per_expert + [gate], fused + [gate]


class Block(torch.nn.Module):
    """A router gate + FusedMoE under the names transformers uses (`mlp.gate`, `mlp.experts`)."""

    def __init__(self, renormalize: bool, tp: TPContext = TPContext(), reduce_results: bool = True):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.gate = ReplicatedLinear(HIDDEN, EXPERTS, tp=tp)
        self.mlp.experts = FusedMoE(EXPERTS, TOP_K, HIDDEN, MOE_INTERMEDIATE, renormalize=renormalize, tp=tp,
                                    reduce_results=reduce_results, prefix="mlp.experts")
        for p in self.parameters():
            p.data.fill_(math.nan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.experts(x, self.mlp.gate(x))


def _loaded_block(items, renormalize: bool, tp: TPContext = TPContext()) -> Block:
    block = Block(renormalize, tp, reduce_results=tp.size == 1)
    stream_weights(block, items, WeightMapping(rules=expert_mapping_rules()), device="cpu")
    return block


def _reference(mlp, x: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The routed-experts part of the transformers block (Qwen2-MoE adds a shared expert on top)."""
    mlp.gate.norm_topk_prob = renormalize
    _, weights, ids = mlp.gate(x)
    return mlp.experts(x, ids, weights)


@pytest.mark.parametrize("fmt", ["per_expert", "fused"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_transformers_block(hf, fmt, renormalize):
    mlp, per_expert, fused = hf
    block = _loaded_block(per_expert if fmt == "per_expert" else fused, renormalize)
    torch.manual_seed(1)
    x = torch.randn(11, HIDDEN)
    with torch.no_grad():
        expected = _reference(mlp, x, renormalize)
        got = block(x)
        if not hasattr(mlp, "shared_expert"):  # Qwen3: the whole block is the routed experts
            torch.testing.assert_close(mlp(x[None])[0], expected, atol=0, rtol=0)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(block.mlp.experts.w13_weight, mlp.experts.gate_up_proj)
    assert torch.equal(block.mlp.experts.w2_weight, mlp.experts.down_proj)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["per_expert", "fused"])
def test_tensor_parallel_ranks_sum_to_full(hf, tp_size, fmt):
    mlp, per_expert, fused = hf
    torch.manual_seed(2)
    x = torch.randn(7, HIDDEN)
    ranks = [_loaded_block(per_expert if fmt == "per_expert" else fused, True, TPContext(r, tp_size)) for r in range(tp_size)]
    with torch.no_grad():
        total = sum(block(x) for block in ranks)
        torch.testing.assert_close(total, _reference(mlp, x, True), atol=1e-5, rtol=1e-5)
    i_p = MOE_INTERMEDIATE // tp_size
    w13 = [b.mlp.experts.w13_weight for b in ranks]
    assert all(w.shape == (EXPERTS, 2 * i_p, HIDDEN) for w in w13)
    gate = torch.cat([w[:, :i_p] for w in w13], dim=1)
    up = torch.cat([w[:, i_p:] for w in w13], dim=1)
    assert torch.equal(torch.cat([gate, up], dim=1), mlp.experts.gate_up_proj)
    assert torch.equal(torch.cat([b.mlp.experts.w2_weight for b in ranks], dim=2), mlp.experts.down_proj)


def test_mapping_rules_route_names():
    mapping = WeightMapping(rules=expert_mapping_rules())
    layer = "model.layers.0.mlp."
    assert mapping.map(layer + "experts.3.gate_proj.weight") == (layer + "experts.w13_weight", {"shard_id": "w1", "expert_id": 3})
    assert mapping.map(layer + "experts.12.up_proj.weight") == (layer + "experts.w13_weight", {"shard_id": "w3", "expert_id": 12})
    assert mapping.map(layer + "experts.0.down_proj.weight") == (layer + "experts.w2_weight", {"shard_id": "w2", "expert_id": 0})
    assert mapping.map(layer + "experts.gate_up_proj") == (layer + "experts.w13_weight", {"shard_id": "w13"})
    assert mapping.map(layer + "experts.down_proj") == (layer + "experts.w2_weight", {"shard_id": "w2"})
    for untouched in ("mlp.gate.weight", "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.down_proj.weight"):
        assert mapping.map(layer + untouched.removeprefix("mlp.")) == (layer + untouched.removeprefix("mlp."), {})


def _experts(tp: TPContext = TPContext()) -> FusedMoE:
    return FusedMoE(EXPERTS, TOP_K, HIDDEN, MOE_INTERMEDIATE, renormalize=True, tp=tp, reduce_results=False)


def _load_one(name: str, tensor: torch.Tensor) -> None:
    """Load one tensor into a module holding a FusedMoE as `experts` (the rules' parameter names)."""
    holder = torch.nn.Module()
    holder.experts = _experts()
    stream_weights(holder, [(name, tensor)], WeightMapping(rules=expert_mapping_rules()), strict=False, device="cpu")


def test_wrong_shape_names_expert_shard_and_shapes():
    w13 = _experts(TPContext(1, 2)).w13_weight
    with pytest.raises(WeightShapeError, match=r"expert 2, shard 'w1': expected checkpoint shape \[8, 16\], received \[8, 15\]"):
        w13.weight_loader(w13, torch.zeros(MOE_INTERMEDIATE, HIDDEN - 1), shard_id="w1", expert_id=2)
    with pytest.raises(WeightShapeError, match=r"all experts, shard 'w13': expected .*\[6, 16, 16\], received \[6, 8, 16\]"):
        w13.weight_loader(w13, torch.zeros(EXPERTS, MOE_INTERMEDIATE, HIDDEN), shard_id="w13")
    with pytest.raises(WeightLoadError, match=r"'experts.1.down_proj.weight'.*expert 1, shard 'w2'.*received \[8, 16\]"):
        _load_one("experts.1.down_proj.weight", torch.zeros(MOE_INTERMEDIATE, HIDDEN))


def test_expert_id_out_of_range_and_unknown_shard():
    w2 = _experts().w2_weight
    with pytest.raises(ValueError, match="expert id 6 .* out of range for 6 experts"):
        moe_weight_loader(w2, torch.zeros(HIDDEN, MOE_INTERMEDIATE), shard_id="w2", expert_id=EXPERTS,
                          intermediate_size_per_partition=MOE_INTERMEDIATE, tp=TPContext())
    with pytest.raises(ValueError, match="unknown MoE shard id 'w4'"):
        w2.weight_loader(w2, torch.zeros(HIDDEN, MOE_INTERMEDIATE), shard_id="w4", expert_id=0)
    with pytest.raises(WeightLoadError, match=r"'experts.6.gate_proj.weight'.*expert id 6 .*out of range"):
        _load_one("experts.6.gate_proj.weight", torch.zeros(MOE_INTERMEDIATE, HIDDEN))


def test_loader_returns_exactly_the_regions_written():
    moe = _experts(TPContext(1, 4))
    moe.w13_weight.data.fill_(math.nan)
    gate_rows = torch.arange(MOE_INTERMEDIATE * HIDDEN, dtype=torch.float).reshape(MOE_INTERMEDIATE, HIDDEN)
    regions = moe.w13_weight.weight_loader(moe.w13_weight, gate_rows, shard_id="w3", expert_id=4)
    assert regions == [((4, 5), (2, 4), (0, HIDDEN))]
    assert torch.equal(moe.w13_weight[4, 2:4], gate_rows[2:4])
    assert torch.isnan(moe.w13_weight).sum() == moe.w13_weight.numel() - 2 * HIDDEN
    fused = torch.randn(EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN)
    regions = moe.w13_weight.weight_loader(moe.w13_weight, fused, shard_id="w13")
    assert regions == [((0, EXPERTS), (0, 2), (0, HIDDEN)), ((0, EXPERTS), (2, 4), (0, HIDDEN))]
    assert torch.equal(moe.w13_weight, torch.cat([fused[:, 2:4], fused[:, 10:12]], dim=1))


def test_missing_expert_and_double_format_are_errors(hf):
    _, per_expert, fused = hf
    incomplete = [(n, t) for n, t in per_expert if not n.startswith("mlp.experts.5.up_proj")]
    with pytest.raises(MissingWeightsError, match=r"mlp.experts.w13_weight.*experts\.5\.up_proj\.weight"):
        stream_weights(Block(True), incomplete, WeightMapping(rules=expert_mapping_rules()), device="cpu")
    with pytest.raises(DuplicateWeightError, match="w13_weight"):
        stream_weights(Block(True), per_expert + fused[:1], WeightMapping(rules=expert_mapping_rules()), device="cpu")


def test_forward_keeps_leading_dims_and_validates_top_k():
    with pytest.raises(ValueError, match="top_k 7"):
        FusedMoE(EXPERTS, 7, HIDDEN, MOE_INTERMEDIATE, renormalize=True)
    moe = _experts()
    for p in moe.parameters():
        p.data.normal_()
    x, logits = torch.randn(2, 3, HIDDEN), torch.randn(2, 3, EXPERTS)
    torch.testing.assert_close(moe(x, logits), moe(x.reshape(6, HIDDEN), logits.reshape(6, EXPERTS)).reshape(2, 3, HIDDEN))


ROUTERS = {  # (transformers router, its config's routing options, ours)
    "v3-groups": (DeepseekV3TopkRouter, DeepseekV3Config, dict(n_group=4, topk_group=2, norm_topk_prob=True),
                  GroupedTopK(4, 2, "sigmoid", 2.5)),
    "v3-one-group": (DeepseekV3TopkRouter, DeepseekV3Config, dict(n_group=1, topk_group=1, norm_topk_prob=False),
                     GroupedTopK(1, 1, "sigmoid", 2.5)),
    "v2-group-limited": (DeepseekV2TopkRouter, DeepseekV2Config,
                         dict(n_group=4, topk_group=2, topk_method="group_limited_greedy"), GroupedTopK(4, 2, "softmax", 2.5)),
    "v2-greedy": (DeepseekV2TopkRouter, DeepseekV2Config, dict(topk_method="greedy"), GroupedTopK(1, 1, "softmax", 2.5)),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_grouped_topk_is_deepseeks_router(name):
    """Weights (float32) and expert ids bitwise transformers' (its V2 router never renormalizes)."""
    router_cls, config_cls, options, routing = ROUTERS[name]
    config = config_cls(hidden_size=HIDDEN, num_attention_heads=2, n_routed_experts=16, num_experts_per_tok=4,
                        routed_scaling_factor=2.5,
                        **options)
    router = router_cls(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=g))
    x = torch.randn(64, HIDDEN, generator=g, dtype=torch.bfloat16)
    _, want_weights, want_ids = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    renormalize = bool(options.get("norm_topk_prob", False))
    weights, ids = grouped_topk(torch.nn.functional.linear(x.float(), router.weight), 4, renormalize, routing, bias)
    assert weights.dtype == torch.float32 and torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    if routing.num_expert_group > 1:  # the limit matters: every token's experts sit in at most topk_group groups
        assert all(len(set((row // 4).tolist())) <= 2 for row in ids)
        assert not torch.equal(ids, grouped_topk(torch.nn.functional.linear(x.float(), router.weight), 4, renormalize,
                                                 GroupedTopK(1, 1, routing.scoring_func, 2.5), bias)[1])


def test_grouped_routing_options_are_checked():
    with pytest.raises(ValueError, match="topk_group 3 must be in"):
        GroupedTopK(2, 3)
    with pytest.raises(ValueError, match="scoring_func"):
        GroupedTopK(scoring_func="tanh")
    with pytest.raises(ValueError, match="6 experts do not split into n_group = 4"):
        FusedMoE(EXPERTS, TOP_K, HIDDEN, MOE_INTERMEDIATE, renormalize=True, grouped=GroupedTopK(4, 2))
