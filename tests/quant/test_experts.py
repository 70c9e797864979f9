"""The fused-experts computation every MoE method shares (`quant/experts.py`): against an independent
per-token sum of each token's experts' SwiGLU MLPs, and bitwise transformers' own experts in bf16."""

from __future__ import annotations

import pytest
import torch

from layers.test_moe import FAMILIES, HIDDEN, TOP_K, _hf_model
from streamquant.quant.experts import dense_expert_linears, fused_experts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def mlp(request):
    """A transformers Qwen2-MoE / Qwen3-MoE sparse block (tiny config, well-spread routing)."""
    return _hf_model(request.param).model.layers[0].mlp


def test_fused_experts_matches_per_token_sum():
    """Independent reference: for each token, the weighted sum of its experts' SwiGLU MLPs."""
    torch.manual_seed(3)
    n, e, h, i, k = 9, 5, 12, 6, 3
    x, w13, w2 = torch.randn(n, h), torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    expected = torch.zeros(n, h)
    for t in range(n):
        for slot in range(k):
            g, u = w13[ids[t, slot], :i] @ x[t], w13[ids[t, slot], i:] @ x[t]
            expected[t] += weights[t, slot] * (w2[ids[t, slot]] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(fused_experts(x, weights, ids, *dense_expert_linears(w13, w2)), expected, atol=1e-5, rtol=1e-5)


def test_bf16_matches_transformers_experts_exactly(mlp):
    torch.manual_seed(4)
    x = torch.randn(10, HIDDEN, dtype=torch.bfloat16)
    w13, w2 = mlp.experts.gate_up_proj.bfloat16(), mlp.experts.down_proj.bfloat16()
    logits = torch.nn.functional.linear(x, mlp.gate.weight.bfloat16())
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, TOP_K, dim=-1)
    weights = weights.to(torch.bfloat16)
    experts = type(mlp.experts)(mlp.experts.config).bfloat16()
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
        expected = experts(x, ids, weights)
    got = fused_experts(x, weights, ids, *dense_expert_linears(w13, w2))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
