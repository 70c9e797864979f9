"""Fixtures of the quantization tests: run a test on each CPU kernel implementation."""

from __future__ import annotations

import pytest

from streamquant.quant.math.native import build


@pytest.fixture(params=["native", "torch"])
def cpu_kernels(request, monkeypatch):
    """Runs the test once on the native C++ kernels and once on the pure-torch ones (`STREAMQUANT_CPU_KERNELS`);
    the native run is skipped, saying why, where they cannot be built."""
    if request.param == "native":
        module, reason = build._build()
        if module is None:
            pytest.skip(f"native CPU kernels unavailable: {reason}")
    monkeypatch.setenv(build.ENV, request.param)
    return request.param
