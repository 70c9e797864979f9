"""Fixtures of the format tests: small fp8 checkpoints in both on-disk formats."""

from __future__ import annotations

import pytest

from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint
from streamquant.offline import quantize_checkpoint


@pytest.fixture(scope="session")  # read only: the tests edit copies (helpers.variant)
def fp8_checkpoints(tmp_path_factory):
    """root/ct (compressed-tensors, fp8-channel) and root/hf (hf-fp8, fp8-block) of one TINY_SPEC checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    write_synthetic_checkpoint(root / "src", TINY_SPEC)
    quantize_checkpoint(root / "src", root / "ct", "fp8-channel")
    quantize_checkpoint(root / "src", root / "hf", "fp8-block", format="hf-fp8")
    return root
