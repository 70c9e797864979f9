"""The native CPU kernels (`quant/math/native`) write bitwise what the pure-torch kernels write.

Exhaustive over every bf16 and every fp16 bit pattern (NaN and infinities included), random float32
values over 60 decades, every code format and formula, every granularity, tensor-parallel windows that
start and end inside tiles, batch dims, strided rows and short tails. Building them, and the fallback
of a machine that cannot: native/test_build.py.
"""

from __future__ import annotations

import pytest
import torch

from streamquant.quant.math import native
from streamquant.quant.math import quantize as fp8_math
from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ, INT4, INT8, MXFP8
from streamquant.quant.math.formula import Formula
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor, Window
from streamquant.quant.math.native import build

CODE_FORMATS = [E4M3FN, E4M3FNUZ, INT8, INT4, MXFP8]
GRANULARITIES = [PerTensor(), PerRow(), PerBlock((128, 128)), PerBlock((7, 33)), PerBlock((1, 32))]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@pytest.fixture(autouse=True)
def native_available():
    module, reason = build._build()
    if module is None:
        pytest.skip(f"native CPU kernels unavailable: {reason}")


def on(kernels: str, monkeypatch, fn):
    monkeypatch.setenv(build.ENV, kernels)
    return fn()


def both(monkeypatch, fn):
    """fn() on the pure-torch kernels, then on the native ones."""
    return on("torch", monkeypatch, fn), on("native", monkeypatch, fn)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str = ""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ia, ib = a.view(INT_VIEW[a.element_size()]), b.view(INT_VIEW[b.element_size()])
    diff = (ia != ib).nonzero()
    assert len(diff) == 0, f"{what}: {len(diff)} differ, first at {diff[0].tolist()}: {ia[tuple(diff[0])]} vs {ib[tuple(diff[0])]}"


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float dtype, as a 256 x 256 weight."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


def formulas(fmt):
    return list(Formula) if not (fmt.integer or fmt.mx) else [Formula.STREAMQUANT]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16_bit_value_gives_the_torch_amax_codes_and_scales(dtype, monkeypatch):
    w = every_value(dtype)
    for tile in [(256, 256), (1, 256), (16, 32), (7, 33)]:
        a, b = both(monkeypatch, lambda: fp8_math.window_amax(w, Window(0, 0, 256, 256), tile))
        # NaN tiles are NaN in both (torch's own NaN payload depends on the tensor's size; no one reads it)
        assert torch.equal(a.isnan(), b.isnan()) and bool(a.isnan().any()), tile
        assert_bitwise(a.nan_to_num(0.0), b.nan_to_num(0.0), f"amax {tile}")
    finite = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    for fmt in CODE_FORMATS:
        for granularity in GRANULARITIES:
            for formula in formulas(fmt):
                (qa, sa), (qb, sb) = both(monkeypatch, lambda: fp8_math.quantize(finite, granularity, fmt, formula=formula))
                assert_bitwise(qa, qb, f"codes {fmt} {granularity} {formula}")
                assert_bitwise(sa, sb, f"scales {fmt} {granularity} {formula}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("code", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.int8], ids=str)
def test_every_16_bit_value_with_given_scales_nan_and_inf_included(dtype, code, monkeypatch):
    """Scales that do not cover the weight: saturation, overflow to inf, NaN inputs, subnormal quotients."""
    w, window, tile = every_value(dtype), Window(0, 0, 256, 256), (256, 256)
    fmt = INT8 if code == torch.int8 else E4M3FN if code == torch.float8_e4m3fn else E4M3FNUZ
    for formula in formulas(fmt):
        for scale in (1.0, 0.37, 1e-3, 5e-8, 3e4, 2.0 ** -126):
            s = torch.full((1, 1), scale)
            a, b = both(monkeypatch, lambda: fp8_math.quantize_window_(torch.empty(256, 256, dtype=code), w, s,
                                                                        window, tile, formula=formula))
            assert_bitwise(a, b, f"{formula} scale {scale}")


@pytest.mark.parametrize("fmt", CODE_FORMATS, ids=lambda f: f"{f.dtype}-{f.bits}-mx{f.mx}")
def test_random_float32_over_sixty_decades(fmt, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 130, 300, generator=gen) * torch.exp(torch.randn(2, 130, 1, generator=gen) * 30)
    w[0, 3, :] = -0.0
    w[1, 4, ::3] = 0.0
    for granularity in GRANULARITIES:
        for formula in formulas(fmt):
            (qa, sa), (qb, sb) = both(monkeypatch, lambda: fp8_math.quantize(w, granularity, fmt, formula=formula))
            assert_bitwise(qa, qb, f"{granularity} {formula}")
            assert_bitwise(sa, sb)


@pytest.mark.parametrize("code", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.int8], ids=str)
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_code_dequantizes_to_the_torch_bits(code, out, monkeypatch):
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(code).reshape(16, 16)
    for scale in (1.0, 3e-5, 2.0 ** -140, 1e30):  # subnormal and infinite results too
        s = torch.full((1, 1), scale)
        a, b = both(monkeypatch, lambda: fp8_math.dequantize_window(q, s, Window(0, 0, 16, 16), (16, 16), out))
        assert_bitwise(a, b, f"scale {scale}")


def hard_weight(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[:-1] + (1,), generator=gen) * 4)
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("tile", [(128, 128), (1, 300), (500, 300), (16, 24)])
def test_straddling_windows_and_batch_dims(tile, monkeypatch):
    """A rank's window starts and ends inside tiles; a leading batch dim of experts (2 and 3 of them)."""
    w = hard_weight((2, 3, 100, 90))
    window = Window(1000, 70, 1800, 600, rows=100, cols=90) if tile[0] < 500 else Window(0, 70, 100, 600, cols=90)
    tile = (tile[0], 600) if tile[1] == 300 else tile

    def run():
        amax = fp8_math.window_amax(w, window, tile)
        scales = fp8_math.local_scales(fp8_math.scale_from_amax(amax), window, tile)
        codes = fp8_math.quantize_window_(torch.empty(w.shape, dtype=torch.float8_e4m3fn), w, scales, window, tile,
                                          scales_cover_amax=True)
        return amax, codes, fp8_math.dequantize_window(codes, scales, window, tile, torch.bfloat16)

    for a, b in zip(*both(monkeypatch, run)):
        assert_bitwise(a, b)


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 33, 40])
def test_strided_rows_and_short_tails(cols, monkeypatch):
    """Rows of a wider tensor (row stride > cols) and row lengths around the 16-lane width."""
    base = hard_weight((37, 64))
    w = base[:, 5 : 5 + cols]
    codes_base = torch.zeros(37, 64, dtype=torch.int8)

    def run():
        out = codes_base.clone()
        q, s = fp8_math.quantize(w, PerRow(), INT8, out=out[:, 5 : 5 + cols])
        return out, s, fp8_math.dequantize(q, s, PerRow(), torch.float32)

    for a, b in zip(*both(monkeypatch, run)):
        assert_bitwise(a, b)


def test_the_native_path_is_the_one_taken(monkeypatch):
    """Guard against a silent fallback: every kernel of a quantize / dequantize goes through the module."""
    module, calls = build.cpu_kernels(), []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(module, name)

    monkeypatch.setattr(native, "cpu_kernels", lambda: Spy())
    q, s = fp8_math.quantize(hard_weight((64, 48)), PerBlock((32, 32)))
    fp8_math.dequantize(q, s, PerBlock((32, 32)))
    assert calls == ["amax", "quantize", "dequantize"]


def test_float64_and_accelerator_inputs_take_the_torch_kernels(monkeypatch):
    monkeypatch.setattr(native, "cpu_kernels", lambda: pytest.fail("float64 has no native kernel"))
    w = hard_weight((8, 8)).double()
    assert native.amax_(torch.zeros(1, 1), w, Window(0, 0, 8, 8), (8, 8)) is False
    assert fp8_math.window_amax(w, Window(0, 0, 8, 8), (8, 8)).item() == w.abs().max().item()


@pytest.mark.parametrize("fmt", CODE_FORMATS, ids=lambda f: f"{f.dtype}-{f.bits}-mx{f.mx}")
def test_one_read_kernel_equals_the_three_steps(fmt, monkeypatch):
    """`quantize_local_tiles_` (amax, scale, codes per tile in one read) writes what `window_amax`,
    `formula_scales` and `quantize_window_` write, for whole weights and for shards cut on tile edges."""
    monkeypatch.setenv(build.ENV, "native")
    w = hard_weight((2, 384, 300)).float().mul_(torch.linspace(0, 3, 300)).to(torch.bfloat16)
    w[0, 5] = 0.0  # a zero row: the scale floor
    cases = [(PerRow(), Window(0, 0, 384, 300)), (PerBlock((128, 128)), Window(0, 0, 384, 300)),
             (PerBlock((128, 128)), Window(256, 0, 1024, 300, rows=384)),  # a TP shard on block edges
             (PerBlock((7, 33)), Window(0, 0, 384, 300)), (PerBlock((1, 32)), Window(0, 64, 384, 364, cols=300))]
    for granularity, window in cases:
        tile = fp8_math.tile_shape(granularity, window.global_shape)
        rows, cols = window.local_grid(tile)
        shape = (2, rows.stop - rows.start, cols.stop - cols.start)
        codes, scales = torch.empty(w.shape, dtype=fmt.dtype), torch.full(shape, float("nan"))
        amax = fp8_math.quantize_local_tiles_(codes, w, scales, window, tile, fmt)
        assert amax is not None, (granularity, window)
        ref_amax = fp8_math.window_amax(w, window, tile)
        ref_scales = fp8_math.local_scales(fp8_math.scale_from_amax(ref_amax, fmt), window, tile)
        ref_codes = fp8_math.quantize_window_(torch.empty(w.shape, dtype=fmt.dtype), w, ref_scales, window, tile,
                                              scales_cover_amax=fmt.scales_cover_amax, fmt=fmt)
        assert_bitwise(amax, ref_amax, f"amax {granularity} {window}")
        assert_bitwise(scales, ref_scales.contiguous(), f"scales {granularity} {window}")
        assert_bitwise(codes, ref_codes, f"codes {granularity} {window}")


def test_the_one_read_kernel_declines_what_it_cannot_do(monkeypatch):
    """Tiles straddling the window's edge (another rank holds part of them) and per-tensor scales (one
    tile row: no parallelism) go to the two passes; nothing is written."""
    monkeypatch.setenv(build.ENV, "native")
    w = hard_weight((200, 256))
    for granularity, window in [(PerBlock((128, 128)), Window(100, 0, 400, 256, rows=200)), (PerTensor(), Window(0, 0, 200, 256))]:
        tile = fp8_math.tile_shape(granularity, window.global_shape)
        rows, cols = window.local_grid(tile)
        codes = torch.zeros(w.shape, dtype=torch.int8)
        scales = torch.zeros(rows.stop - rows.start, cols.stop - cols.start)
        assert fp8_math.quantize_local_tiles_(codes, w, scales, window, tile, INT8) is None
        assert not codes.any() and not scales.any()
    monkeypatch.setenv(build.ENV, "torch")
    assert fp8_math.quantize_local_tiles_(codes, w, torch.zeros(200, 1), Window(0, 0, 200, 256), (1, 256), INT8) is None
