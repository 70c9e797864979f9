"""`QuantizePlan` (`offline/plan.py`): the on-disk formats store fp8 codes only, so the online-only schemes
are refused before anything is written; scale names follow the checkpoint's tensor names."""

from __future__ import annotations

import pytest

from streamquant.config import UnsupportedQuantizationError
from streamquant.offline import quantize_checkpoint
from streamquant.offline.plan import scale_name_of

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("plan"))


@pytest.mark.parametrize("scheme", ["int8", "mxfp8"])
def test_on_disk_formats_refuse_the_online_only_schemes(llama, tmp_path, scheme):
    with pytest.raises(UnsupportedQuantizationError, match=rf"quantization='{scheme}' is online only"):
        quantize_checkpoint(llama, tmp_path / "out", scheme)
    assert not (tmp_path / "out").exists()


def test_scale_names_sit_beside_their_weight():
    assert scale_name_of("model.layers.0.mlp.down_proj.weight", "weight_scale") == "model.layers.0.mlp.down_proj.weight_scale"
    assert scale_name_of("model.layers.0.mlp.down_proj.weight", "weight_scale_inv") == (
        "model.layers.0.mlp.down_proj.weight_scale_inv")
    assert scale_name_of("model.layers.0.mlp.experts.gate_up_proj", "weight_scale") == (
        "model.layers.0.mlp.experts.gate_up_proj_scale")
