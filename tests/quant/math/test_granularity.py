"""Tiles, windows and the tensor-parallel invariant: per-rank quantization == global quantization.

Ranks are simulated in one process: each rank quantizes its window of a global weight, the
all-reduce is `torch.maximum` over the ranks' amax grids, and the ranks' fp8 codes, concatenated,
must be bitwise the numpy + ml_dtypes quantization of the whole global weight.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ
from streamquant.quant.math.quantize import (
    dequantize,
    dequantize_window,
    local_scales,
    quantize,
    quantize_window_,
    scale_from_amax,
    window_amax,
)
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor, Window, grid_shape, segments, tile_shape

from ..fp8_reference import bits, ref_dequantize, ref_quantize, to_f32

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRANULARITIES = [PerTensor(), PerRow(), PerBlock((128, 128)), PerBlock((16, 32)), PerBlock((5, 3))]


def test_tile_and_grid_shapes():
    assert tile_shape(PerTensor(), (300, 200)) == (300, 200)
    assert tile_shape(PerRow(), (300, 200)) == (1, 200)
    assert tile_shape(PerBlock(), (300, 200)) == (128, 128)
    assert tile_shape(PerBlock((64, 32)), (300, 200)) == (64, 32)
    assert grid_shape((128, 128), (300, 200)) == (3, 2)
    assert grid_shape((1, 200), (300, 200)) == (300, 1)
    assert grid_shape((300, 200), (300, 200)) == (1, 1)
    with pytest.raises(ValueError):
        PerBlock((0, 128))


def test_window_defaults_and_validation():
    w = Window(0, 0, 300, 200)
    assert w.shape == (300, 200) and w.global_shape == (300, 200)
    assert Window(100, 0, 300, 200).shape == (200, 200)
    assert Window(100, 0, 300, 200, rows=100).shape == (100, 200)
    with pytest.raises(ValueError):
        Window(250, 0, 300, 200, rows=100)
    with pytest.raises(ValueError):
        Window(-1, 0, 300, 200)


@given(start=st.integers(0, 400), size=st.integers(0, 400), tile=st.integers(1, 150))
@SETTINGS
def test_segments_partition_a_range_into_tile_uniform_runs(start, size, tile):
    covered = []
    for seg in segments(start, size, tile):
        assert seg.stop - seg.start == seg.n * seg.length and seg.n >= 1
        for i in range(seg.start, seg.stop):
            # every local index i lies in global tile tile0 + (offset // length), and only whole
            # tiles are ever grouped (n > 1 implies length == tile)
            assert (start + i) // tile == seg.tile0 + (i - seg.start) // seg.length
        assert seg.n == 1 or seg.length == tile
        covered.extend(range(seg.start, seg.stop))
    assert covered == list(range(size))


@st.composite
def tp_cases(draw):
    """A global weight, a granularity and its split into tp windows along rows or cols."""
    rows, cols = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    granularity = draw(st.sampled_from(GRANULARITIES))
    tp, dim = draw(st.integers(1, 4)), draw(st.sampled_from([0, 1]))
    length = (rows, cols)[dim]
    if draw(st.booleans()):  # the usual even split: the split dimension becomes a multiple of tp
        shard = draw(st.integers(1, max(1, 300 // tp)))
        length = shard * tp
        cuts = [shard * k for k in range(tp + 1)]
    else:  # uneven cuts, shards of any size (empty ones included)
        cuts = [0] + sorted(draw(st.lists(st.integers(0, length), min_size=tp - 1, max_size=tp - 1))) + [length]
    shape = (length, cols) if dim == 0 else (rows, length)
    zero_rows = draw(st.lists(st.integers(0, shape[0] - 1), max_size=3))
    zero_box = draw(st.tuples(st.integers(0, shape[0]), st.integers(0, shape[1]), st.integers(0, 140), st.integers(0, 140)))
    return shape, granularity, dim, cuts, zero_rows, zero_box, draw(st.integers(0, 2**31 - 1))


def make_weight(shape, zero_rows, zero_box, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen) * 3)
    w[zero_rows] = 0
    r, c, h, k = zero_box
    w[r : r + h, c : c + k] = 0
    return w.to(torch.bfloat16)


def rank_windows(shape, dim, cuts):
    rows, cols = shape
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if dim == 0:
            yield Window(lo, 0, rows, cols, rows=hi - lo), (slice(lo, hi), slice(None))
        else:
            yield Window(0, lo, rows, cols, cols=hi - lo), (slice(None), slice(lo, hi))


def quantize_as_ranks(w, granularity, windows, fmt=E4M3FN):
    """Each rank: window_amax -> (all-reduce MAX) -> scales -> local_scales -> quantize_window_."""
    tile = tile_shape(granularity, tuple(w.shape[-2:]))
    amaxes = [window_amax(w[..., rs, cs], window, tile) for window, (rs, cs) in windows]
    scales = scale_from_amax(functools.reduce(torch.maximum, amaxes), fmt)  # the simulated all-reduce
    out = []
    for window, (rs, cs) in windows:
        local = local_scales(scales, window, tile)
        q = torch.full(w[..., rs, cs].shape, float("nan")).to(fmt.dtype)  # NaN sentinel: all must be written
        quantize_window_(q, w[..., rs, cs].clone(), local, window, tile)
        out.append((q, local))
    return tile, scales, out


@given(tp_cases())
@SETTINGS
def test_tp_windows_quantize_bitwise_like_the_global_weight(case):
    shape, granularity, dim, cuts, zero_rows, zero_box, seed = case
    w = make_weight(shape, zero_rows, zero_box, seed)
    windows = list(rank_windows(shape, dim, cuts))
    tile, scales, ranks = quantize_as_ranks(w, granularity, windows)

    codes, ref_s = ref_quantize(to_f32(w), tile, torch.float8_e4m3fn)
    np.testing.assert_array_equal(bits(scales), ref_s.view(np.uint32))
    glued = torch.cat([q for q, _ in ranks], dim=dim)
    np.testing.assert_array_equal(bits(glued), codes)

    q_global, s_global = quantize(w, granularity)
    assert torch.equal(glued.view(torch.uint8), q_global.view(torch.uint8)) and torch.equal(scales, s_global)
    deq = torch.cat([dequantize_window(q, local, win, tile, torch.bfloat16)
                     for (q, local), (win, _) in zip(ranks, windows)], dim=dim)
    np.testing.assert_array_equal(bits(deq), ref_dequantize(codes, ref_s, tile, torch.float8_e4m3fn, torch.bfloat16))
    assert torch.equal(deq, dequantize(q_global, s_global, granularity))


@given(rows=st.integers(1, 200), cols=st.integers(1, 200), pr=st.integers(1, 3), pc=st.integers(1, 3),
       granularity=st.sampled_from(GRANULARITIES), seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(SETTINGS, max_examples=30)
def test_two_dimensional_partitions_and_fnuz(rows, cols, pr, pc, granularity, seed, data):
    """Windows on a pr x pc grid of ranks (both offsets non-zero), in e4m3fnuz, with expert batch dims."""
    rcuts = [0] + sorted(data.draw(st.lists(st.integers(0, rows), min_size=pr - 1, max_size=pr - 1))) + [rows]
    ccuts = [0] + sorted(data.draw(st.lists(st.integers(0, cols), min_size=pc - 1, max_size=pc - 1))) + [cols]
    w = torch.stack([make_weight((rows, cols), [], (0, 0, 0, 0), seed + e) for e in range(2)])
    windows = [(Window(r0, c0, rows, cols, rows=r1 - r0, cols=c1 - c0), (slice(r0, r1), slice(c0, c1)))
               for r0, r1 in zip(rcuts[:-1], rcuts[1:]) for c0, c1 in zip(ccuts[:-1], ccuts[1:])]
    tile, scales, ranks = quantize_as_ranks(w, granularity, windows, E4M3FNUZ)
    glued = torch.empty(w.shape, dtype=torch.uint8)
    for (q, _), (_, (rs, cs)) in zip(ranks, windows):
        glued[..., rs, cs] = q.view(torch.uint8)
    for e in range(2):
        codes, ref_s = ref_quantize(to_f32(w[e]), tile, torch.float8_e4m3fnuz)
        np.testing.assert_array_equal(glued[e].numpy(), codes)
        np.testing.assert_array_equal(bits(scales[e]), ref_s.view(np.uint32))


def test_window_amax_is_zero_on_tiles_a_rank_does_not_hold():
    w = torch.randn(100, 300) + 10  # no zero elements
    window = Window(200, 0, 600, 300, rows=100)  # rows [200, 300) of 600, tiles of 128 rows: tiles 1 and 2
    amax = window_amax(w, window, (128, 128))
    assert amax.shape == (5, 3)
    assert torch.all(amax[[0, 3, 4]] == 0) and torch.all(amax[1:3] > 0)
    assert amax[1, 0] == w[:56, :128].abs().max() and amax[2, 2] == w[56:, 256:].abs().max()
    assert local_scales(scale_from_amax(amax), window, (128, 128)).shape == (2, 3)


def test_local_scales_is_the_touched_sub_grid():
    grid = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    window = Window(130, 100, 600, 300, rows=200, cols=60)  # rows 130..329 -> tiles 1..2; cols 100..159 -> 0..1
    assert torch.equal(local_scales(grid, window, (128, 128)), grid[1:3, 0:2])
    with pytest.raises(ValueError, match="global grid"):
        local_scales(grid[:4], window, (128, 128))


def test_a_forgotten_rows_argument_fails_loudly():
    w = torch.randn(64, 32)
    with pytest.raises(ValueError, match="window"):
        window_amax(w, Window(0, 0, 128, 32), (128, 128))  # rank 0 of 2 without rows=64
