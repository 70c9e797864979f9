"""RMSNorm / LayerNorm against transformers and torch.nn; their parameters are replicated and loaded whole
(`default_weight_loader` itself: tests/loading/test_default_loader.py)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from streamquant.layers.norm import LayerNorm, RMSNorm
from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.parameters import BaseParameter


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 32), (2, 4, 6, 32)])  # hidden states; per-head (q/k norm) layout
def test_rmsnorm_equals_llama_rmsnorm(dtype, shape):
    weight = randn(32, seed=1, dtype=dtype)
    ours = RMSNorm(32, eps=1e-5, params_dtype=dtype)
    ours.weight.weight_loader(ours.weight, weight)
    ref = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    ref.weight.data.copy_(weight)
    x = randn(*shape, seed=2, dtype=dtype) * 3
    out = ours(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref(x))


def test_rmsnorm_against_formula_in_float64():
    x, w = randn(4, 16, dtype=torch.float64), randn(16, seed=3, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-6, params_dtype=torch.float64)
    norm.weight.data.copy_(w)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_equals_torch(bias, dtype):
    ours = LayerNorm(24, eps=1e-5, bias=bias, params_dtype=dtype)
    ref = torch.nn.LayerNorm(24, eps=1e-5, bias=bias, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(randn(24, seed=4))
        if bias:
            ref.bias.copy_(randn(24, seed=5))
    ours.weight.weight_loader(ours.weight, ref.weight.detach())
    if bias:
        ours.bias.weight_loader(ours.bias, ref.bias.detach())
    else:
        assert ours.bias is None
    x = randn(3, 7, 24, seed=6, dtype=dtype)
    assert torch.equal(ours(x), ref(x))


def test_norm_parameters_are_replicated_base_parameters():
    for module in (RMSNorm(8), LayerNorm(8)):
        for name, p in module.named_parameters():
            assert type(p) is BaseParameter, name
            assert p.weight_loader is default_weight_loader
            assert not p.requires_grad
