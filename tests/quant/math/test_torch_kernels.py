"""The inductor-compiled CPU path writes bitwise the same scales and codes as the eager path.

Compiling costs seconds, so this file runs a handful of cases that cover what could differ in
generated C++: division rounding, fp8 rounding of subnormals and ties, signed zeros, saturation,
both fp8 formats, misaligned (straddling) windows and batch dimensions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import streamquant.quant.math.torch_kernels as fp8_kernels
import streamquant.quant.math.quantize as fp8_math
from streamquant.quant.math.code_format import E4M3FN, E4M3FNUZ, INT8, MXFP8
from streamquant.quant.math.quantize import local_scales, quantize, quantize_window_, scale_from_amax, window_amax
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor, Window, tile_shape, window_pieces
from streamquant.quant.math.native import build

from ..fp8_reference import bits, ref_quantize, to_f32


@pytest.fixture(autouse=True)
def compile_every_window(monkeypatch):
    """These weights are small: without this, the size threshold would send them to the eager kernel.
    The compiled path is the fallback of the pure-torch kernels: the native ones are switched off."""
    monkeypatch.setattr(fp8_kernels, "COMPILED_MIN_ELEMENTS", 0)
    monkeypatch.setenv(build.ENV, "torch")


@pytest.fixture
def compiled_kernel(monkeypatch):
    """A spy on the compiled path, proving it ran: `torch.compile` (as `quantize_window_` calls it) records what
    it was asked to compile (`compiled`) and counts the calls of the result (`calls`, one per piece), and the
    inductor backend (the default one, wrapped) counts the runs of its generated code (`graph_runs`). Where a
    piece ran any other way (the native or eager kernels, dynamo's silent fallback to eager after its
    recompile limit) `graph_runs` falls short of `calls`, or `calls` of the pieces; `fullgraph=True` makes a
    graph break an error. The dynamo cache is reset around each test: each test compiles its own cases
    (a shared cache makes later tests hit the limit of 8 compilations of `quantize_piece` and run eager)."""
    spy = SimpleNamespace(compiled=[], calls=0, graph_runs=0)
    real_compile = torch.compile

    def counting_inductor(graph, example_inputs):
        generated = compile_fx(graph, example_inputs)

        def run(*args):
            spy.graph_runs += 1
            return generated(*args)

        run._boxed_call = getattr(generated, "_boxed_call", False)  # the calling convention dynamo reads
        return run

    def spy_compile(fn, **kwargs):
        spy.compiled.append(fn)
        compiled = real_compile(fn, backend=counting_inductor, fullgraph=True, **kwargs)

        def call(*args):
            spy.calls += 1
            return compiled(*args)

        return call

    torch.compiler.reset()
    monkeypatch.setattr(fp8_math.torch, "compile", spy_compile)
    yield spy
    torch.compiler.reset()  # no entries of this test's backend left behind for later tests


def assert_compiled_ran(spy, pieces: int) -> None:
    assert pieces > 0 and spy.compiled and all(fn is fp8_kernels.quantize_piece for fn in spy.compiled)
    assert spy.calls == pieces, (spy.calls, pieces)  # every piece through the compiled callable
    assert spy.graph_runs == spy.calls, (spy.graph_runs, spy.calls)  # and every call ran inductor's code


def hard_weight(shape, seed=0):
    """Magnitudes over ~12 decades, exact zeros of both signs, fp8 ties and an outlier per matrix."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[:-1] + (1,), generator=gen) * 4)
    w[..., 3, :] = -0.0
    w[..., 4, ::2] = 0.0
    w[..., 5, :8] = torch.tensor([448.0, 416.0, -432.0, 0.5625, -1.0 / 1024, 3.0 / 1024, 1e-30, -1e-30])
    w[..., 0, 0] = 1e5
    return w.to(torch.bfloat16)


@pytest.mark.parametrize(
    "granularity, fmt",
    [(PerTensor(), E4M3FN), (PerRow(), E4M3FNUZ), (PerBlock((128, 128)), E4M3FN), (PerRow(), INT8),
     (PerBlock((1, 32)), MXFP8)],
    ids=["tensor-e4m3fn", "row-e4m3fnuz", "block-e4m3fn", "row-int8", "mx-block-mxfp8"],
)
def test_compiled_quantize_is_bitwise_eager(granularity, fmt, compiled_kernel):
    w = hard_weight((2, 300, 260))
    q_eager, s_eager = quantize(w, granularity, fmt)
    assert compiled_kernel.compiled == []  # the reference is eager
    q_comp, s_comp = quantize(w, granularity, fmt, compiled=True)
    assert_compiled_ran(compiled_kernel, len(window_pieces(Window(0, 0, 300, 260), tile_shape(granularity, (300, 260)))))
    assert torch.equal(s_comp, s_eager)
    assert torch.equal(q_comp.view(torch.uint8), q_eager.view(torch.uint8))
    tile = {PerTensor: (300, 260), PerRow: (1, 260)}.get(type(granularity), getattr(granularity, "block_size", None))
    codes, _ = ref_quantize(to_f32(w[1]), tile, fmt.dtype, mx=fmt.mx)
    np.testing.assert_array_equal(bits(q_comp[1]), codes)


def test_compiled_straddling_window_is_bitwise_eager(compiled_kernel):
    w = hard_weight((500, 300))
    window = Window(1000, 70, 1800, 600, rows=500, cols=300)  # starts and ends inside 128-blocks
    amax = window_amax(w, window, (128, 128))
    scales = local_scales(scale_from_amax(amax), window, (128, 128))
    eager = quantize_window_(torch.empty(w.shape, dtype=torch.float8_e4m3fn), w, scales, window, (128, 128))
    assert compiled_kernel.compiled == []
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    assert quantize_window_(out, w, scales, window, (128, 128), compiled=True) is out
    assert_compiled_ran(compiled_kernel, len(window_pieces(window, (128, 128))))
    assert torch.equal(out.view(torch.uint8), eager.view(torch.uint8))


def test_windows_below_the_threshold_take_the_eager_kernel(monkeypatch):
    """compiled=True never pays compiled code's per-call cost on a small window (it would be slower)."""
    monkeypatch.setattr(fp8_kernels, "COMPILED_MIN_ELEMENTS", 300 * 260 + 1)
    calls = []
    monkeypatch.setattr(fp8_math.torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    w = hard_weight((300, 260))
    q, _ = quantize(w, PerTensor(), compiled=True)
    assert calls == []
    monkeypatch.setattr(fp8_kernels, "COMPILED_MIN_ELEMENTS", 300 * 260)
    assert torch.equal(quantize(w, PerTensor(), compiled=True)[0].view(torch.uint8), q.view(torch.uint8))
    assert calls == [fp8_kernels.quantize_piece]
