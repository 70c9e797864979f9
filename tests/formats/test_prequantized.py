"""Loading a pre-quantized checkpoint (`formats/prequantized.py`): every pre-quantized checkpoint or tensor
streamquant cannot serve fails naming what is wrong (each format's own config fields: test_compressed_tensors.py,
test_hf_fp8.py)."""

from __future__ import annotations

import pytest
import torch

from streamquant import load_model
from streamquant.formats import QuantizationConfigError
from streamquant.loading.errors import NonFiniteWeightError, WeightDtypeError, WeightLoadError

from .helpers import variant


def test_quantization_option_must_agree_with_the_checkpoint(fp8_checkpoints):
    with pytest.raises(QuantizationConfigError, match="quantization='fp8' disagrees with the checkpoint, which is "
                                                      "pre-quantized as 'fp8-channel'"):
        load_model(fp8_checkpoints / "ct", quantization="fp8")
    assert load_model(fp8_checkpoints / "ct", quantization="fp8-channel").load_report.quantization == "fp8-channel"
    with pytest.raises(QuantizationConfigError, match="block_size= cannot be given for a pre-quantized"):
        load_model(fp8_checkpoints / "hf", block_size=(64, 64))


def test_a_partly_quantized_layer_is_refused_naming_it(fp8_checkpoints, tmp_path):
    def drop_k_scale(tensors):
        tensors.pop("model.layers.0.self_attn.k_proj.weight_scale_inv", None)
    with pytest.raises(QuantizationConfigError, match=r"layer 'model.layers.0.self_attn.qkv_proj' is partly "
                                                      r"quantized.*without: \['model.layers.0.self_attn.k_proj"):
        load_model(variant(fp8_checkpoints, tmp_path, "hf", edit_tensors=drop_k_scale))


def test_nan_codes_and_bad_scales_are_refused_naming_the_tensor(fp8_checkpoints, tmp_path):
    def nan_code(tensors):
        codes = tensors["model.layers.1.mlp.up_proj.weight"]
        codes.view(torch.uint8)[3, 5] = 0x7F
    with pytest.raises(NonFiniteWeightError, match="'model.layers.1.mlp.up_proj.weight'.*NaN fp8 codes"):
        load_model(variant(fp8_checkpoints, tmp_path, "ct", edit_tensors=nan_code))

    def zero_scale(tensors):
        tensors["model.layers.0.mlp.down_proj.weight_scale"][7] = 0
    with pytest.raises(WeightLoadError, match="'model.layers.0.mlp.down_proj.weight_scale'.*must be positive"):
        load_model(variant(fp8_checkpoints, tmp_path / "z", "ct", edit_tensors=zero_scale))


def test_fp8_codes_without_a_quantization_config_say_so(fp8_checkpoints, tmp_path):
    out = variant(fp8_checkpoints, tmp_path, "ct", edit_config=lambda c: c.clear())
    with pytest.raises(WeightDtypeError, match="float8_e4m3fn.*no quantization_config"):
        load_model(out)
