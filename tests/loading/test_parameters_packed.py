"""Packed parameters (several values per stored element, e.g. eight int4 in one int32).

Shard offsets and sizes arrive in logical (unpacked) units. When the packing lies along the output
dim they become packed units -- floor(x / packed_factor), times the marlin tile size when given --
and otherwise pass through. The expected arithmetic is re-implemented here with exact `Fraction`s.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamquant.layers.linear import merged_column_loader, qkv_loader
from streamquant.loading.parameters import PackedParameter, adjust_shard_indexes_for_packing
from streamquant.parallel.context import TPContext

from .helpers import SETTINGS, assert_written, build, nan_tensor, put

FACTORS = [1, 2, 4, 8, Fraction(1, 2), Fraction(3, 2), Fraction(8, 3)]
TILES = st.one_of(st.none(), st.integers(1, 4))


def packed_units(logical: int, factor, tile) -> int:
    return math.floor(Fraction(logical) / Fraction(factor)) * (1 if tile is None else tile)


@SETTINGS
@given(size=st.integers(0, 64), offset=st.integers(0, 256), factor=st.sampled_from(FACTORS), tile=TILES)
def test_adjust_shard_indexes_for_packing(size, offset, factor, tile):
    expected = (packed_units(size, factor, tile), packed_units(offset, factor, tile))
    assert adjust_shard_indexes_for_packing(size, offset, factor, tile) == expected
    p = PackedParameter(data=torch.empty(2, 2), weight_loader=print, output_dim=0, input_dim=1,
                        packed_factor=factor, packed_dim=0, marlin_tile_size=tile)
    assert p.adjust_shard_indexes_for_packing(size, offset) == expected


@st.composite
def packed_merged(draw):
    """Logical per-rank shard sizes that pack exactly: multiples of the factor's numerator."""
    factor = draw(st.sampled_from(FACTORS))
    tile = draw(TILES)
    units = draw(st.lists(st.integers(1, 2), min_size=1, max_size=3))
    sizes = [Fraction(factor).numerator * u for u in units]
    return factor, tile, sizes, draw(st.integers(0, 1)), draw(st.integers(1, 3)), draw(st.integers(1, 4))


@SETTINGS
@given(case=packed_merged(), data=st.data())
def test_merged_load_packed_along_output_dim(case, data):
    factor, tile, sizes, out_dim, other, n = case
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    packed = [packed_units(s, factor, tile) for s in sizes]
    packed_offsets = [packed_units(o, factor, tile) for o in offsets]
    shape = [other, other]
    shape[out_dim] = sum(packed)
    ckpts = [torch.randn(_with(shape, out_dim, n * s)) for s in packed]
    order = data.draw(st.permutations(range(len(sizes))))
    for rank in range(n):
        p = build(PackedParameter, shape, TPContext(rank, n), output_dim=out_dim, input_dim=1 - out_dim,
                  packed_factor=factor, packed_dim=out_dim, marlin_tile_size=tile)
        expected, regions = nan_tensor(shape), []
        for i in order:
            regions += p.load_merged_column_weight(ckpts[i], shard_id=i, shard_offset=offsets[i], shard_size=sizes[i])
            put(expected, out_dim, packed_offsets[i], ckpts[i].narrow(out_dim, rank * packed[i], packed[i]))
            assert_written(p, regions, expected)


@SETTINGS
@given(case=packed_merged(), replicas_pow=st.integers(0, 2), data=st.data())
def test_qkv_load_packed_along_output_dim(case, replicas_pow, data):
    factor, tile, sizes, out_dim, other, n = case
    replicas = math.gcd(n, 2**replicas_pow)
    q, kv = sizes[0], sizes[-1]
    logical = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    packed = {sid: (packed_units(o, factor, tile), packed_units(s, factor, tile)) for sid, (o, s) in logical.items()}
    shape = [other, other]
    shape[out_dim] = packed["v"][0] + packed["v"][1]
    sources = {"q": n, "k": n // replicas, "v": n // replicas}
    ckpts = {sid: torch.randn(_with(shape, out_dim, sources[sid] * packed[sid][1])) for sid in "qkv"}
    for rank in range(n):
        p = build(PackedParameter, shape, TPContext(rank, n), output_dim=out_dim, input_dim=1 - out_dim,
                  packed_factor=factor, packed_dim=out_dim, marlin_tile_size=tile)
        expected, regions = nan_tensor(shape), []
        for sid in data.draw(st.permutations("qkv")):
            (offset, size), (p_offset, p_size) = logical[sid], packed[sid]
            regions += p.load_qkv_weight(ckpts[sid], shard_id=sid, shard_offset=offset, shard_size=size,
                                         num_kv_head_replicas=replicas)
            source = rank if sid == "q" else rank // replicas
            put(expected, out_dim, p_offset, ckpts[sid].narrow(out_dim, source * p_size, p_size))
            assert_written(p, regions, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_packing_off_the_output_dim_leaves_shard_indexes_alone(n):
    sizes, offsets = [3, 1], [0, 3]
    ckpts = [torch.randn(2, 3 * n, 5), torch.randn(2, 1 * n, 5)]
    for rank in range(n):
        p = build(PackedParameter, (2, 4, 5), TPContext(rank, n), output_dim=1, input_dim=2, packed_factor=8,
                  packed_dim=2)
        expected, regions = nan_tensor((2, 4, 5)), []
        for i in (1, 0):
            regions += p.load_merged_column_weight(ckpts[i], shard_id=i, shard_offset=offsets[i], shard_size=sizes[i])
            put(expected, 1, offsets[i], ckpts[i].chunk(n, 1)[rank])
        assert_written(p, regions, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_row_load_packed_along_input_dim(n):
    ckpt = torch.randn(3, 2 * n)  # already packed on disk: 2 packed columns per rank
    for rank in range(n):
        p = build(PackedParameter, (3, 2), TPContext(rank, n), output_dim=0, input_dim=1, packed_factor=8, packed_dim=1)
        assert_written(p, p.load_row_parallel_weight(ckpt), ckpt.chunk(n, 1)[rank])


def test_packed_factor_must_be_positive():
    for factor in (0, -2, Fraction(-1, 2)):
        with pytest.raises(ValueError):
            build(PackedParameter, (2, 2), TPContext(), output_dim=0, input_dim=1, packed_factor=factor)




@pytest.mark.parametrize("n", [1, 2])
def test_fused_merged_checkpoint_into_packed_parameter(n):
    gate, up = torch.randn(4 * n, 3), torch.randn(2 * n, 3)  # packed rows on disk; factor 2 -> 8n and 4n logical
    p = build(PackedParameter, (6, 3), TPContext(n - 1, n), output_dim=0, input_dim=1, packed_factor=2)
    regions = merged_column_loader(p, torch.cat([gate, up]), None, output_sizes=(8 * n, 4 * n), tp=p.tp)
    assert_written(p, regions, torch.cat([gate.chunk(n)[n - 1], up.chunk(n)[n - 1]]))


def test_fused_qkv_checkpoint_into_packed_parameter():
    q, k, v = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)  # packed rows; factor 2, head size 2
    p = build(PackedParameter, (4, 3), TPContext(1, 2), output_dim=0, input_dim=1, packed_factor=2)
    regions = qkv_loader(p, torch.cat([q, k, v]), None, num_heads=2, num_kv_heads=1, head_size=2,
                         num_kv_head_replicas=1)
    assert_written(p, regions, torch.cat([q[2:], k[1:], v[1:]]))


def _with(shape, dim, size):
    out = list(shape)
    out[dim] = size
    return out
