"""Every `quantization_config` or pre-quantized tensor streamquant cannot serve fails naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from streamquant import load_model
from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint
from streamquant.formats import QuantizationConfigError
from streamquant.loading.errors import NonFiniteWeightError, WeightDtypeError, WeightLoadError
from streamquant.offline import quantize_checkpoint


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_synthetic_checkpoint(root / "src", TINY_SPEC)
    quantize_checkpoint(root / "src", root / "ct", "fp8-channel")
    quantize_checkpoint(root / "src", root / "hf", "fp8-block", format="hf-fp8")
    return root


def variant(fp8_checkpoints, tmp_path, which, edit_config=None, edit_tensors=None):
    out = tmp_path / which
    shutil.copytree(fp8_checkpoints / which, out)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        for file in out.glob("*.safetensors"):
            tensors = safetensors.torch.load_file(file)
            edit_tensors(tensors)
            safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return out


def group(config):
    return config["config_groups"]["group_0"]


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
