"""Reading quantized weights back (`quant/scaled/readback.py`): the quantization-error energies of a shard,
summed in float32 chunks, equal a float64 reference, for shards whose windows start mid-tile and chunks
that cut tiles."""

from __future__ import annotations

import pytest
import torch

import streamquant.quant.scaled.readback as readback
import streamquant.quant.scaled.weights as fp8_weights
from streamquant.quant.math.granularity import LogicalShard, PerBlock, PerRow, PerTensor, Window
from streamquant.quant.math.quantize import dequantize_window, local_scales, quantize_window_, scale_from_amax, window_amax


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
@pytest.mark.parametrize("granularity", [PerTensor(), PerRow(), PerBlock((128, 128))], ids=repr)
def test_shard_energy_equals_float64_reference(granularity, chunk, monkeypatch):
    monkeypatch.setattr(readback, "ERROR_CHUNK_ELEMENTS", chunk)
    w = torch.randn(2, 700, 300, generator=torch.Generator().manual_seed(0)).bfloat16()
    shards = (LogicalShard("a", Window(0, 0, 300, 300)), LogicalShard("b", Window(100, 0, 600, 300, rows=400)))
    layouts = fp8_weights.shard_layouts(shards, granularity)
    grid_cols = layouts[0].window.local_grid(layouts[0].tile)[1]
    codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(2, layouts[-1].scale_rows.stop, grid_cols.stop - grid_cols.start)
    for lay in layouts:
        part = w[..., lay.rows, :]
        scales[..., lay.scale_rows, :] = local_scales(scale_from_amax(window_amax(part, lay.window, lay.tile)),
                                                      lay.window, lay.tile)
        quantize_window_(codes[..., lay.rows, :], part, scales[..., lay.scale_rows, :], lay.window, lay.tile)
    for lay in layouts:
        deq = dequantize_window(codes[..., lay.rows, :], scales[..., lay.scale_rows, :], lay.window, lay.tile,
                                torch.float64)
        exact = w[..., lay.rows, :].double()
        expected = torch.stack([exact.square().sum(), (exact - deq).square().sum()])
        torch.testing.assert_close(readback._shard_energy(w, codes, scales, lay), expected, rtol=1e-6, atol=0)
