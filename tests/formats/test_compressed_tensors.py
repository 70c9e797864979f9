"""The compressed-tensors format (`formats/compressed_tensors.py`). Reading: every `quantization_config`
streamquant cannot serve fails naming the field. Writing: the tensors of an int4 / int8 weight, planned
from `meta` tensors (names, dtypes, shapes as that library stores them), and a group size that does not
divide a weight's input refused naming it. (The compressed-tensors library and transformers reading what
we write: test_roundtrip.py, test_int_roundtrip.py; llm-compressor's own output: test_llmcompressor.py.)"""

from __future__ import annotations

import pytest
import torch

from streamquant import load_model
from streamquant.formats import QuantizationConfigError, QuantizedWeight
from streamquant.formats.compressed_tensors import COMPRESSED_TENSORS
from streamquant.quant.scaled.config import ScaledConfig

from .helpers import group, variant


CT_CASES = [
    (lambda c: group(c)["input_activations"].update(dynamic=False), r"input_activations\.dynamic = false"),
    (lambda c: group(c)["weights"].update(type="int"), r"weights\.type = 'int'"),
    (lambda c: group(c)["weights"].update(num_bits=4), r"weights\.num_bits = 4"),
    (lambda c: group(c)["weights"].update(strategy="group", group_size=128), r"weights\.strategy = 'group'"),
    (lambda c: group(c)["weights"].update(symmetric=False), r"weights\.symmetric = False"),
    (lambda c: group(c).update(output_activations={"num_bits": 8}), r"output_activations"),
    (lambda c: c.update(format="pack-quantized"), r"format = 'pack-quantized'"),
    (lambda c: c.update(quant_method="bitsandbytes"), r"quant_method = 'bitsandbytes'"),
    (lambda c: group(c)["input_activations"].update(strategy="tensor"), r"input_activations\.strategy = 'tensor'"),
    (lambda c: c["config_groups"].update(group_1={**group(c), "weights": {**group(c)["weights"], "strategy": "tensor"}}),
     r"config_groups disagree"),
]


@pytest.mark.parametrize("edit,message", CT_CASES)
def test_unsupported_compressed_tensors_configs_name_the_field(fp8_checkpoints, tmp_path, edit, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_model(variant(fp8_checkpoints, tmp_path, "ct", edit))


def _planned(config: ScaledConfig, shape, zero_points: bool = False):
    out, inputs = shape
    groups = inputs // config.group_size if config.scheme.value == "int4" else 1
    meta = QuantizedWeight(torch.empty(shape, dtype=torch.int8, device="meta"),
                           torch.empty(out, groups, device="meta"),
                           torch.empty(out, groups, dtype=torch.int8, device="meta") if zero_points else None)
    return {name: (t.dtype, tuple(t.shape)) for name, t in COMPRESSED_TENSORS.disk_tensors("m.weight", meta, config,
                                                                                          torch.bfloat16)}


def test_int_weights_are_planned_in_the_libraries_layout():
    """int4: codes packed 8 per int32 along the input, zero points 8 per int32 along the OUTPUT (20 rows ->
    3 words), the shape beside them; W8A16: 4 codes per int32; W8A8: int8 codes. Scales: float32 under the
    streamquant formula, the model dtype under the library's."""
    asym = _planned(ScaledConfig("int4", group_size=32, symmetric=False), (20, 64), zero_points=True)
    assert asym == {"m.weight_packed": (torch.int32, (20, 8)), "m.weight_scale": (torch.float32, (20, 2)),
                    "m.weight_zero_point": (torch.int32, (3, 2)), "m.weight_shape": (torch.int64, (2,))}
    w8a16 = _planned(ScaledConfig("int8", activation_scheme="none", formula="compressed-tensors"), (20, 64))
    assert w8a16 == {"m.weight_packed": (torch.int32, (20, 16)), "m.weight_scale": (torch.bfloat16, (20, 1)),
                     "m.weight_shape": (torch.int64, (2,))}
    assert _planned(ScaledConfig("int8"), (20, 64)) == {"m.weight": (torch.int8, (20, 64)),
                                                         "m.weight_scale": (torch.float32, (20, 1))}


def test_a_group_size_that_does_not_divide_the_input_is_refused_naming_the_tensor():
    with pytest.raises(ValueError, match=r"tensor 'm.weight': input size 96 is not a multiple of group_size 64"):
        _planned(ScaledConfig("int4", group_size=64), (16, 96))
