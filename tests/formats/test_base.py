"""What every format module shares (`formats/base.py`): a `quantization_config` field read with a clear
error when a required one is missing, the recorded formula, the fp8 element type check, and the names
of a weight's sibling tensors."""

from __future__ import annotations

import pytest

from streamquant.formats.base import (FORMULA_KEY, QuantizationConfigError, check_fp8_e4m3, field, recorded_formula,
                                     sibling_name)
from streamquant.quant.math.formula import Formula


def test_field_is_the_value_or_the_default_or_a_named_error():
    config = {"fmt": "e4m3", "weight_block_size": None}
    assert field(config, "fmt", "") == "e4m3"
    assert field(config, "scale_fmt", "", default="float32") == "float32"
    assert field(config, "weight_block_size", "", default=[128, 128]) == [128, 128]  # null counts as absent
    with pytest.raises(QuantizationConfigError, match=r"quantization_config\.config_groups\.group_0 has no 'weights'"):
        field(config, "weights", ".config_groups.group_0", required=True)
    assert issubclass(QuantizationConfigError, ValueError)


def test_the_recorded_formula():
    assert recorded_formula({}, Formula.TRANSFORMERS) is Formula.TRANSFORMERS
    assert recorded_formula({FORMULA_KEY: None}, Formula.STREAMQUANT) is Formula.STREAMQUANT
    for formula in Formula:
        assert recorded_formula({FORMULA_KEY: formula.value}, Formula.STREAMQUANT) is formula
    with pytest.raises(QuantizationConfigError, match=rf"{FORMULA_KEY} = 'vllm' is not a formula streamquant knows"):
        recorded_formula({FORMULA_KEY: "vllm"}, Formula.STREAMQUANT)


@pytest.mark.parametrize("value", [None, "e4m3", "float8_e4m3fn", "e4m3fn"])
def test_e4m3_in_any_spelling_is_accepted(value):
    assert check_fp8_e4m3(value, ".fmt") is None  # accepted: no error (refusals: the next test)


@pytest.mark.parametrize("value", ["e5m2", "float8_e4m3fnuz", 8])
def test_other_element_types_are_refused(value):
    with pytest.raises(QuantizationConfigError, match=rf"quantization_config\.fmt = {value!r}: only e4m3"):
        check_fp8_e4m3(value, ".fmt")


def test_sibling_tensors_sit_beside_their_weight():
    assert sibling_name("model.layers.0.mlp.down_proj.weight", "weight_scale") == "model.layers.0.mlp.down_proj.weight_scale"
    assert sibling_name("model.layers.0.mlp.down_proj.weight", "weight_scale_inv") == (
        "model.layers.0.mlp.down_proj.weight_scale_inv")
    assert sibling_name("model.layers.0.mlp.down_proj.weight", "weight_packed") == (
        "model.layers.0.mlp.down_proj.weight_packed")
    assert sibling_name("model.layers.0.mlp.experts.gate_up_proj", "weight_scale") == (
        "model.layers.0.mlp.experts.gate_up_proj_scale")
