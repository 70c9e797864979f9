"""Reading the compressed-tensors format (`formats/compressed_tensors.py`): every `quantization_config`
streamquant cannot serve fails naming the field. (Writing it, and the compressed-tensors library and
transformers reading what we write: test_roundtrip.py; llm-compressor's own output: test_llmcompressor.py.)"""

from __future__ import annotations

import pytest

from streamquant import load_model
from streamquant.formats import QuantizationConfigError

from .helpers import group, variant


CT_CASES = [
    (lambda c: group(c)["input_activations"].update(dynamic=False), r"input_activations\.dynamic = false"),
    (lambda c: group(c)["weights"].update(type="int"), r"weights\.type = 'int'"),
    (lambda c: group(c)["weights"].update(num_bits=4), r"weights\.num_bits = 4"),
    (lambda c: group(c)["weights"].update(strategy="group", group_size=128), r"weights\.strategy = 'group'"),
    (lambda c: group(c)["weights"].update(symmetric=False), r"weights\.symmetric = False"),
    (lambda c: group(c).update(output_activations={"num_bits": 8}), r"output_activations"),
    (lambda c: c.update(format="pack-quantized"), r"format = 'pack-quantized'"),
    (lambda c: c.update(quant_method="gptq"), r"quant_method = 'gptq'"),
    (lambda c: group(c)["input_activations"].update(strategy="tensor"), r"input_activations\.strategy = 'tensor'"),
    (lambda c: c["config_groups"].update(group_1={**group(c), "weights": {**group(c)["weights"], "strategy": "tensor"}}),
     r"config_groups disagree"),
]


@pytest.mark.parametrize("edit,message", CT_CASES)
def test_unsupported_compressed_tensors_configs_name_the_field(fp8_checkpoints, tmp_path, edit, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_model(variant(fp8_checkpoints, tmp_path, "ct", edit))
