"""The unquantized methods (`quant/unquantized.py`): the parameters each creates (checkpoint layout, model
dtype, the layer's loader and TP context) and what each computes, against plain torch: the linear layer
`F.linear` (wider partial sums when asked), the embedding `F.embedding` and the LM head `F.linear`, the
MoE experts the per-token sum of each token's experts' SwiGLU MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamquant.loading.parameters import ColumnParameter, ModelWeightParameter
from streamquant.parallel.context import TPContext
from streamquant.quant.math.matmul import PartialSums
from streamquant.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedFusedMoEMethod, UnquantizedLinearMethod


def loader(param, loaded, **kwargs):
    return []


def filled(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


def test_linear_weight_and_forward():
    method, layer, tp = UnquantizedLinearMethod(), torch.nn.Module(), TPContext(1, 2)
    method.create_weights(layer, input_size_per_partition=6, output_partition_sizes=[3, 5], input_size=12, output_size=16,
                          params_dtype=torch.bfloat16, tp=tp, weight_loader=loader)
    w = layer.weight
    assert type(w) is ModelWeightParameter and w.shape == (8, 6) and w.dtype == torch.bfloat16
    assert (w.output_dim, w.input_dim, w.tp, w.weight_loader) == (0, 1, tp, loader)
    method.process_weights_after_loading(filled(layer, 0))
    gen = torch.Generator().manual_seed(1)
    x, bias = torch.randn(4, 6, generator=gen).bfloat16(), torch.randn(8, generator=gen).bfloat16()
    assert torch.equal(method.apply(layer, x, bias), F.linear(x, w, bias))
    wide = method.apply(layer, x, bias, out_dtype=torch.float32)  # a row-parallel partial sum, rounded once later
    assert wide.dtype == torch.float32 and torch.equal(wide, F.linear(x.float(), w.float(), bias.float()))


def test_embedding_and_lm_head():
    method, layer = UnquantizedEmbeddingMethod(), torch.nn.Module()
    method.create_weights(layer, 10, 4, torch.float32, TPContext(), loader)
    assert type(layer.weight) is ColumnParameter and layer.weight.shape == (10, 4) and layer.weight.output_dim == 0
    filled(layer, 2)
    ids = torch.tensor([[0, 9, 3, 3]])
    assert torch.equal(method.embedding(layer, ids), layer.weight[ids])
    x = torch.randn(2, 4)
    assert torch.equal(method.apply(layer, x), x @ layer.weight.T)


def test_moe_experts_are_the_per_token_sum():
    method, layer = UnquantizedFusedMoEMethod(), torch.nn.Module()
    e, h, i, n, k = 4, 6, 5, 7, 2
    method.create_weights(layer, e, h, i, torch.float64, TPContext(), loader)
    assert layer.w13_weight.shape == (e, 2 * i, h) and layer.w2_weight.shape == (e, h, i)
    assert (layer.w13_weight.output_dim, layer.w13_weight.input_dim) == (1, 2) and layer.w2_weight.dtype == torch.float64
    filled(layer, 3)
    gen = torch.Generator().manual_seed(4)
    x, weights = torch.randn(n, h, generator=gen, dtype=torch.float64), torch.rand(n, k, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    expected = torch.zeros(n, h, dtype=torch.float64)
    for t in range(n):
        for slot in range(k):
            w13, w2 = layer.w13_weight[ids[t, slot]], layer.w2_weight[ids[t, slot]]
            expected[t] += weights[t, slot] * (w2 @ (F.silu(w13[:i] @ x[t]) * (w13[i:] @ x[t])))
    torch.testing.assert_close(method.apply(layer, x, weights, ids), expected, rtol=1e-12, atol=1e-12)
    reduced = []
    partial = PartialSums(torch.float64, lambda t: reduced.append(t.shape) or t)  # one rank: the sum is itself
    torch.testing.assert_close(method.apply(layer, x, weights, ids, partial), expected, rtol=1e-12, atol=1e-12)
    assert reduced  # the experts' partial outputs went through the reduction
