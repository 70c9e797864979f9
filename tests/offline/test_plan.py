"""`QuantizePlan` (`offline/plan.py`): the on-disk formats store fp8, int8 and int4 codes, so the
online-only scheme (mxfp8) is refused before anything is written; the planned outputs are what the
format writes."""

from __future__ import annotations

import pytest

from streamquant.config import UnsupportedQuantizationError
from streamquant.offline import quantize_checkpoint

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("plan"))


def test_on_disk_formats_refuse_the_online_only_schemes(llama, tmp_path):
    with pytest.raises(UnsupportedQuantizationError, match=r"quantization='mxfp8' is online only"):
        quantize_checkpoint(llama, tmp_path / "out", "mxfp8")
    assert not (tmp_path / "out").exists()
