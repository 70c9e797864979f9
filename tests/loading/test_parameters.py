"""Parameter classes: every rank's shard, reassembled over tp sizes 1..4, is the checkpoint tensor.

Each load is checked with a NaN sentinel: inside the returned regions the parameter holds exactly
the expected values (computed here with `torch.chunk`, not the library's narrowing), outside them
it is untouched. Packed parameters live in test_parameters_packed.py, shape errors in
test_parameters_shape_errors.py, the per-tile kinds (scales, zero points, group indices) in test_tiled.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.parameters import (
    BaseParameter,
    ColumnParameter,
    ModelWeightParameter,
    PackedParameter,
    RowParameter,
    WeightShapeError,
    shard_id_as_int,
)
from streamquant.parallel.context import TPContext

from .helpers import PER_CLASS, SETTINGS, assert_written, build, nan_tensor, put

COLUMN_CLASSES = [ColumnParameter, ModelWeightParameter, PackedParameter]
ROW_CLASSES = [RowParameter, ModelWeightParameter, PackedParameter]


def _needs_two_dims(cls) -> bool:
    return issubclass(cls, ColumnParameter) and issubclass(cls, RowParameter)


@st.composite
def sharded_layout(draw, cls, max_dim=4):
    """(per-rank shape, sharded dim, the other layout dim or None, tp size)."""
    ndim = draw(st.integers(2 if _needs_two_dims(cls) else 1, 3))
    dims = draw(st.permutations(range(ndim)))
    shape = tuple(draw(st.lists(st.integers(1, max_dim), min_size=ndim, max_size=ndim)))
    return shape, dims[0], (dims[1] if ndim > 1 else None), draw(st.integers(1, 4))


def _scaled(shape, dim, factor):
    full = list(shape)
    full[dim] *= factor
    return full


@pytest.mark.parametrize("cls", COLUMN_CLASSES, ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data())
def test_column_parallel_shards_reassemble(cls, data):
    shape, out_dim, in_dim, n = data.draw(sharded_layout(cls))
    ckpt = torch.randn(_scaled(shape, out_dim, n))
    shards = []
    for rank in range(n):
        p = build(cls, shape, TPContext(rank, n), output_dim=out_dim, input_dim=in_dim, packed_factor=8)
        assert_written(p, p.load_column_parallel_weight(ckpt), ckpt.chunk(n, out_dim)[rank])
        shards.append(p.detach().clone())
    assert torch.equal(torch.cat(shards, out_dim), ckpt)


@pytest.mark.parametrize("cls", ROW_CLASSES, ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data())
def test_row_parallel_shards_reassemble(cls, data):
    shape, in_dim, out_dim, n = data.draw(sharded_layout(cls))
    ckpt = torch.randn(_scaled(shape, in_dim, n))
    shards = []
    for rank in range(n):
        p = build(cls, shape, TPContext(rank, n), output_dim=out_dim, input_dim=in_dim, packed_factor=8)
        assert_written(p, p.load_row_parallel_weight(ckpt), ckpt.chunk(n, in_dim)[rank])
        shards.append(p.detach().clone())
    assert torch.equal(torch.cat(shards, in_dim), ckpt)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_row_parallel_zero_dim_loads_as_shape_one(n):
    scalar = torch.tensor(0.25)
    if n == 1:
        p = build(RowParameter, (1,), TPContext(0, 1), input_dim=0)
        assert_written(p, p.load_row_parallel_weight(scalar), torch.tensor([0.25]))
    for rank in range(1, n):  # one element has no shard for rank >= 1 (rank 0 is left unspecified)
        with pytest.raises(WeightShapeError):
            build(RowParameter, (1,), TPContext(rank, n), input_dim=0).load_row_parallel_weight(scalar)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), max_size=3), n=st.integers(1, 4), data=st.data())
def test_base_parameter_copies_whole_tensor_on_every_rank(shape, n, data):
    ckpt = torch.randn(shape)
    rank = data.draw(st.integers(0, n - 1))
    loads = [
        lambda p: p.load_column_parallel_weight(ckpt),
        lambda p: p.load_row_parallel_weight(ckpt),
        lambda p: p.load_merged_column_weight(ckpt, shard_id=1, shard_offset=0, shard_size=1),
        lambda p: p.load_qkv_weight(ckpt, shard_id="k", shard_offset=0, shard_size=1, num_kv_head_replicas=1),
    ]
    for load in loads:
        p = build(BaseParameter, shape, TPContext(rank, n))
        assert_written(p, load(p), ckpt)


@pytest.mark.parametrize("param_shape,loaded_shape", [((1,), ()), ((), (1,)), ((1, 1), (1,))])
def test_base_parameter_accepts_any_single_element_tensor(param_shape, loaded_shape):
    p = build(BaseParameter, param_shape, TPContext())
    assert_written(p, p.load_column_parallel_weight(torch.full(loaded_shape, 3.0)), torch.full(param_shape, 3.0))


@st.composite
def merged_layout(draw, cls):
    """Per-rank shape whose output dim holds the per-rank sizes of 1..3 logical shards."""
    shape, out_dim, in_dim, n = draw(sharded_layout(cls, max_dim=3))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    shape = list(shape)
    shape[out_dim] = sum(sizes)
    return tuple(shape), out_dim, in_dim, n, sizes, draw(st.permutations(range(len(sizes))))


@pytest.mark.parametrize("cls", COLUMN_CLASSES, ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data())
def test_merged_column_shards_land_in_their_slot(cls, data):
    shape, out_dim, in_dim, n, sizes, order = data.draw(merged_layout(cls))
    ckpts = [torch.randn(_scaled(_with(shape, out_dim, s), out_dim, n)) for s in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    per_rank = []
    for rank in range(n):
        p = build(cls, shape, TPContext(rank, n), output_dim=out_dim, input_dim=in_dim)
        expected, regions = nan_tensor(shape), []
        for i in order:
            regions += p.load_merged_column_weight(ckpts[i], shard_id=i, shard_offset=offsets[i], shard_size=sizes[i])
            put(expected, out_dim, offsets[i], ckpts[i].chunk(n, out_dim)[rank])
            assert_written(p, regions, expected)
        per_rank.append(p.detach().clone())
    for i, ckpt in enumerate(ckpts):
        parts = [t.narrow(out_dim, offsets[i], sizes[i]) for t in per_rank]
        assert torch.equal(torch.cat(parts, out_dim), ckpt)


def _with(shape, dim, size):
    out = list(shape)
    out[dim] = size
    return out


@st.composite
def qkv_layout(draw, cls):
    shape, out_dim, in_dim, n = draw(sharded_layout(cls, max_dim=3))
    q, kv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    replicas = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    return _with(shape, out_dim, q + 2 * kv), out_dim, in_dim, n, q, kv, replicas, draw(st.permutations("qkv"))


@pytest.mark.parametrize("cls", COLUMN_CLASSES, ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data())
def test_qkv_shards_by_rank_and_kv_replica_group(cls, data):
    """q is split over all ranks; k/v over the n // replicas groups of consecutive ranks."""
    shape, out_dim, in_dim, n, q, kv, replicas, order = data.draw(qkv_layout(cls))
    groups = n // replicas
    ckpt = {"q": torch.randn(_with(shape, out_dim, q * n)),
            "k": torch.randn(_with(shape, out_dim, kv * groups)), "v": torch.randn(_with(shape, out_dim, kv * groups))}
    slot = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    per_rank = []
    for rank in range(n):
        p = build(cls, shape, TPContext(rank, n), output_dim=out_dim, input_dim=in_dim)
        expected, regions = nan_tensor(shape), []
        for sid in order:
            offset, size = slot[sid]
            regions += p.load_qkv_weight(ckpt[sid], shard_id=sid, shard_offset=offset, shard_size=size,
                                         num_kv_head_replicas=replicas)
            if sid == "q":
                piece = ckpt[sid].chunk(n, out_dim)[rank]
            else:
                piece = ckpt[sid].chunk(groups, out_dim)[rank // replicas]
            put(expected, out_dim, offset, piece)
            assert_written(p, regions, expected)
        per_rank.append(p.detach().clone())
    for sid, (offset, size) in slot.items():
        holders = per_rank if sid == "q" else per_rank[::replicas]
        assert torch.equal(torch.cat([t.narrow(out_dim, offset, size) for t in holders], out_dim), ckpt[sid])


def test_qkv_integer_shard_id_zero_means_q():
    ckpt = torch.randn(4, 2)  # q: 1 row per rank, 4 ranks
    p = build(ModelWeightParameter, (3, 2), TPContext(3, 4), output_dim=0, input_dim=1)
    p.load_qkv_weight(ckpt, shard_id=0, shard_offset=0, shard_size=1, num_kv_head_replicas=4)
    assert torch.equal(p.detach()[0], ckpt[3])


def test_shard_id_as_int():
    assert [shard_id_as_int(s) for s in ("q", "k", "v", 0, 1, 5)] == [0, 1, 2, 0, 1, 5]
    with pytest.raises(ValueError):
        shard_id_as_int("gate")


def test_parameters_are_frozen_tensors_with_their_metadata():
    tp = TPContext(1, 2)
    p = ModelWeightParameter(data=torch.zeros(2, 3), weight_loader=print, tp=tp, output_dim=0, input_dim=1)
    assert isinstance(p, torch.nn.Parameter) and not p.requires_grad
    assert (p.weight_loader, p.tp, p.output_dim, p.input_dim) == (print, tp, 0, 1)
