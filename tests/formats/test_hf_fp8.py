"""Reading the Hugging Face / DeepSeek fp8 format (`formats/hf_fp8.py`): every `quantization_config`
streamquant cannot serve fails naming the field. (Writing it, and transformers reading what we write:
test_roundtrip.py.)"""

from __future__ import annotations

import pytest

from streamquant import load_model
from streamquant.formats import QuantizationConfigError

from .helpers import variant


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(activation_scheme="static"), r"activation_scheme = 'static'"),
    (lambda c: c.update(scale_fmt="ue8m0"), r"scale_fmt = 'ue8m0'"),
    (lambda c: c.update(fmt="e5m2"), r"fmt = 'e5m2'"),
    (lambda c: c.update(weight_block_size=[128]), r"weight_block_size = \[128\]"),
    (lambda c: c.update(streamquant_formula="vllm"), r"streamquant_formula = 'vllm'"),
])
def test_unsupported_hf_fp8_configs_name_the_field(fp8_checkpoints, tmp_path, edit, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_model(variant(fp8_checkpoints, tmp_path, "hf", edit))
