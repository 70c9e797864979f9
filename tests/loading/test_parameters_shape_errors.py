"""Shape mismatches: a WeightShapeError (a ValueError) naming the expected and the received shape.

A checkpoint tensor that does not have exactly the size the parameter's shard layout implies must
be refused, whether too small, too large, or wrong in an unsharded dim.
"""

from __future__ import annotations

import pytest
import torch

from streamquant.loading.parameters import ModelWeightParameter, WeightShapeError
from streamquant.parallel.context import TPContext

from .helpers import build, mentions_shape


def _weight(rank=0, n=1):
    return build(ModelWeightParameter, (4, 3), TPContext(rank, n), output_dim=0, input_dim=1)


def _column(p, t):
    return p.load_column_parallel_weight(t)


def _row(p, t):
    return p.load_row_parallel_weight(t)


def _merged_up(p, t):
    return p.load_merged_column_weight(t, shard_id=1, shard_offset=2, shard_size=2)


def _qkv_k(p, t):
    return p.load_qkv_weight(t, shard_id="k", shard_offset=2, shard_size=1, num_kv_head_replicas=2)


# (rank, tp size, load, checkpoint shape, shapes that count as "expected", shapes that count as "received")
MISMATCHES = [
    pytest.param(0, 2, _column, (8, 5), [(4, 3), (8, 3)], [(8, 5), (4, 5)], id="column-wrong-input-dim"),
    pytest.param(1, 2, _row, (5, 6), [(4, 3), (4, 6)], [(5, 6), (5, 3)], id="row-wrong-output-dim"),
    pytest.param(0, 1, _merged_up, (2, 5), [(2, 3)], [(2, 5)], id="merged-wrong-input-dim"),
    pytest.param(1, 2, _column, (6, 3), [(4, 3), (8, 3)], [(6, 3)], id="column-too-few-rows"),
    pytest.param(1, 2, _row, (4, 5), [(4, 3), (4, 6)], [(4, 5)], id="row-too-few-columns"),
]


@pytest.mark.parametrize("rank,n,load,shape,expected,received", MISMATCHES)
def test_shape_mismatch_names_expected_and_received(rank, n, load, shape, expected, received):
    p = _weight(rank, n)
    with pytest.raises(WeightShapeError) as info:
        load(p, torch.randn(shape))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert any(mentions_shape(message, s) for s in expected), message
    assert any(mentions_shape(message, s) for s in received), message


@pytest.mark.parametrize("rank,n,load,shape", [
    (0, 1, _column, (5, 3)),  # tp 1: the parameter expects exactly (4, 3)
    (1, 2, _column, (10, 3)),  # expects (8, 3)
    (0, 2, _row, (4, 7)),  # expects (4, 6)
    (0, 2, _merged_up, (5, 3)),  # the up shard: 2 rows per rank, expects (4, 3)
    (0, 4, _qkv_k, (3, 3)),  # 4 ranks / 2 replicas: 2 groups of 1 row, expects (2, 3)
])
def test_oversized_checkpoint_is_rejected(rank, n, load, shape):
    with pytest.raises(WeightShapeError):
        load(_weight(rank, n), torch.randn(shape))
