"""The linear layers' weight loaders, rank by rank, against a manual reading of the checkpoint.

Each layer is built as "rank r of n" in this process, its parameters filled with NaN, then loaded
through `param.weight_loader` exactly as `load_weights` would call it. What each rank should hold
is computed here from head indices and `torch.chunk`, independently of the library's offsets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from streamquant.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from streamquant.parallel.context import TPContext

from loading.helpers import SETTINGS, assert_written, expected_qkv, heads_of_rank

TP_SIZES = [1, 2, 3, 4]


def nan_filled(layer):
    for p in layer.parameters():
        p.data.fill_(float("nan"))
    return layer


def load(param, tensor, **kwargs):
    return param.weight_loader(param, tensor, **kwargs)


@pytest.mark.parametrize("n", TP_SIZES)
def test_column_parallel_linear(n):
    w, b, x = torch.randn(4 * n, 3), torch.randn(4 * n), torch.randn(2, 3)
    for r in range(n):
        layer = nan_filled(ColumnParallelLinear(3, 4 * n, bias=True, tp=TPContext(r, n)))
        assert_written(layer.weight, load(layer.weight, w), w.chunk(n)[r])
        assert_written(layer.bias, load(layer.bias, b), b.chunk(n)[r])
        torch.testing.assert_close(layer(x), F.linear(x, w, b).chunk(n, -1)[r])


@pytest.mark.parametrize("n", TP_SIZES)
def test_replicated_linear_is_whole_on_every_rank(n):
    w, b = torch.randn(5, 3), torch.randn(5)
    for r in range(n):
        layer = nan_filled(ReplicatedLinear(3, 5, bias=True, tp=TPContext(r, n)))
        assert_written(layer.weight, load(layer.weight, w), w)
        assert_written(layer.bias, load(layer.bias, b), b)


def _row_layers(n, w, b):
    layers = []
    for r in range(n):
        layer = nan_filled(RowParallelLinear(w.shape[1], w.shape[0], bias=b is not None, reduce_results=False,
                                             tp=TPContext(r, n)))
        assert_written(layer.weight, load(layer.weight, w), w.chunk(n, 1)[r])
        if b is not None:
            assert_written(layer.bias, load(layer.bias, b), b)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("n", TP_SIZES)
def test_row_parallel_linear_partial_outputs_sum_to_the_full_output(n):
    w, x = torch.randn(5, 2 * n), torch.randn(3, 2 * n)
    layers = _row_layers(n, w, None)
    partial = sum(layer(xr) for layer, xr in zip(layers, x.chunk(n, -1)))
    torch.testing.assert_close(partial, F.linear(x, w))


@pytest.mark.parametrize("n", TP_SIZES)
def test_row_parallel_bias_counted_once_without_reduce(n):
    """The caller reduces later, so only one rank may add the bias (vLLM: rank 0)."""
    w, b, x = torch.randn(5, 2 * n), torch.randn(5), torch.randn(3, 2 * n)
    layers = _row_layers(n, w, b)
    partial = sum(layer(xr) for layer, xr in zip(layers, x.chunk(n, -1)))
    torch.testing.assert_close(partial, F.linear(x, w, b))


@st.composite
def merged_case(draw):
    n = draw(st.integers(1, 4))
    sizes = [n * m for m in draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))]
    return n, sizes, draw(st.integers(1, 4)), draw(st.booleans())


@SETTINGS
@given(case=merged_case(), data=st.data())
def test_merged_column_loader_by_shard_and_fused(case, data):
    n, sizes, hidden, bias = case
    ckpt = {"weight": [torch.randn(s, hidden) for s in sizes], "bias": [torch.randn(s) for s in sizes]}
    order = data.draw(st.permutations(range(len(sizes))))
    for r in range(n):
        for fused in (False, True):
            layer = nan_filled(MergedColumnParallelLinear(hidden, sizes, bias=bias, tp=TPContext(r, n)))
            for name, param in layer.named_parameters():
                parts = ckpt[name]
                if fused:
                    regions = load(param, torch.cat(parts), shard_id=None)
                else:
                    regions = [reg for i in order for reg in load(param, parts[i], shard_id=i)]
                assert_written(param, regions, torch.cat([t.chunk(n)[r] for t in parts]))


@st.composite
def qkv_case(draw):
    n = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([k for k in range(1, 9) if k % n == 0 or n % k == 0]))
    heads = kv_heads * (n // min(n, kv_heads)) * draw(st.integers(1, 2))  # divisible by n and by kv_heads
    return n, heads, kv_heads, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.booleans())


@SETTINGS
@given(case=qkv_case(), data=st.data())
def test_qkv_loader_matches_manual_head_split(case, data):
    n, heads, kv_heads, head_size, hidden, bias = case
    ckpt = {"weight": [torch.randn(h * head_size, hidden) for h in (heads, kv_heads, kv_heads)],
            "bias": [torch.randn(h * head_size) for h in (heads, kv_heads, kv_heads)]}
    order = data.draw(st.permutations(range(3)))
    for r in range(n):
        for fused in (False, True):
            layer = nan_filled(QKVParallelLinear(hidden, head_size, heads, kv_heads, bias=bias, tp=TPContext(r, n)))
            for name, param in layer.named_parameters():
                parts = ckpt[name]
                if fused:
                    regions = load(param, torch.cat(parts), shard_id=None)
                else:
                    regions = [reg for i in order for reg in load(param, parts[i], shard_id="qkv"[i])]
                assert_written(param, regions, expected_qkv(*parts, heads, kv_heads, head_size, n, r))


@pytest.mark.parametrize("heads,kv_heads,n", [(8, 2, 4), (4, 1, 2), (8, 4, 4), (6, 3, 3), (8, 4, 2), (4, 4, 1)],
                         ids=["kv<tp", "mqa", "kv==tp", "kv==tp3", "kv>tp", "mha-tp1"])
def test_qkv_rank_outputs_are_its_heads_of_the_full_projection(heads, kv_heads, n):
    head_size, hidden = 2, 5
    q, k, v = (torch.randn(h * head_size, hidden) for h in (heads, kv_heads, kv_heads))
    x = torch.randn(3, hidden)
    per_head = [F.linear(x, t).reshape(3, -1, head_size) for t in (q, k, v)]
    for r in range(n):
        layer = nan_filled(QKVParallelLinear(hidden, head_size, heads, kv_heads, tp=TPContext(r, n)))
        assert layer.num_kv_head_replicas == max(1, n // kv_heads)
        for sid, t in zip("qkv", (q, k, v)):
            load(layer.weight, t, shard_id=sid)
        out_q, out_k, out_v = layer(x).split([layer.num_heads * head_size] + [layer.num_kv_heads * head_size] * 2, -1)
        for out, full, total in zip((out_q, out_k, out_v), per_head, (heads, kv_heads, kv_heads)):
            torch.testing.assert_close(out, full[:, heads_of_rank(total, n, r)].reshape(3, -1))


def test_loader_argument_errors():
    merged = MergedColumnParallelLinear(3, [4, 4], tp=TPContext(0, 2))
    with pytest.raises(ValueError, match="out of range"):
        load(merged.weight, torch.randn(4, 3), shard_id=2)
    with pytest.raises(ValueError, match="7"):
        load(merged.weight, torch.randn(7, 3), shard_id=None)
    qkv = QKVParallelLinear(3, 2, 4, 2, tp=TPContext(1, 2))
    with pytest.raises(ValueError, match="'x'"):
        load(qkv.weight, torch.randn(4, 3), shard_id="x")
    with pytest.raises(ValueError, match="expected 16"):
        load(qkv.weight, torch.randn(15, 3), shard_id=None)
