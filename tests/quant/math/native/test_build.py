"""Building and choosing the native CPU kernels (`quant/math/native/build.py`): a machine that cannot build
them gets the pure-torch kernels and one line saying so (and an error when native ones were demanded),
the kernel choice is validated, and a cached build is keyed by its source and the CPU."""

from __future__ import annotations

import pytest

from streamquant.quant.math import quantize as fp8_math
from streamquant.quant.math.granularity import PerRow
from streamquant.quant.math.native import build

from ..test_native import assert_bitwise, hard_weight


@pytest.fixture
def fresh_build(monkeypatch):
    """`build._build` forgets its one result for the test (and afterwards)."""
    build._build.cache_clear()
    yield
    build._build.cache_clear()


def test_a_failed_build_falls_back_to_torch_and_says_so_once(fresh_build, monkeypatch, capsys):
    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(build, "_load", broken)
    monkeypatch.setenv(build.ENV, "auto")
    w = hard_weight((40, 30))
    q1, s1 = fp8_math.quantize(w, PerRow())
    q2, _ = fp8_math.quantize(w, PerRow())
    err = capsys.readouterr().err
    assert err.count("streamquant: native CPU kernels unavailable (no compiler here); using the pure-torch") == 1
    monkeypatch.setenv(build.ENV, "torch")
    assert_bitwise(q1, fp8_math.quantize(w, PerRow())[0])
    monkeypatch.setenv(build.ENV, "native")
    with pytest.raises(build.NativeKernelsUnavailable, match="no compiler here"):
        fp8_math.quantize(w, PerRow())


def test_kernel_choice_is_validated(monkeypatch):
    monkeypatch.setenv(build.ENV, "fast")
    with pytest.raises(ValueError, match="STREAMQUANT_CPU_KERNELS must be one of auto, native, torch, got 'fast'"):
        build.cpu_kernels()


def test_the_build_is_keyed_by_source_and_cpu(monkeypatch):
    """A cache carried to another CPU (or an edited source) is never loaded: its directory name differs."""
    tag = build.build_tag()
    monkeypatch.setattr(build, "_cpu_signature", lambda: "flags : avx2 (another machine)")
    assert build.build_tag() != tag
