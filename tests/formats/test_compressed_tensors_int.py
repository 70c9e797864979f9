"""Reading compressed-tensors' integer schemes (`formats/compressed_tensors_int.py`): what each config says
loads with its options (the compressed-tensors library parses the same config), and every config or
tensor streamquant cannot serve fails naming the field or tensor. (Loads against the library's
decompression and transformers: test_int_checkpoints.py.)"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from hf_cases import CASES, make_checkpoint

from streamquant import load_model
from streamquant.formats import QuantizationConfigError, read_quantization_config
from streamquant.loading.errors import WeightDtypeError, WeightLoadError
from streamquant.quant.scaled.config import ActivationScheme, ScaledScheme

from .ct_int_checkpoints import ct_checkpoint, numpy_checkpoint
from .helpers import group, variant


@pytest.fixture(scope="module")
def int_checkpoints(tmp_path_factory):
    """root/int8 (W8A8), root/int4 (asymmetric, groups of 16), root/actorder (numpy writer, g_idx)."""
    root = tmp_path_factory.mktemp("ctint_bad")
    src = make_checkpoint(next(c for c in CASES if c.name == "llama"), root)
    for name, (path, _) in {"int8": ct_checkpoint(src, root / "w", "int8"),
                            "int4": ct_checkpoint(src, root / "w", "int4-asym", group_size=16),
                            "actorder": numpy_checkpoint(src, root / "w", True, 32, True)}.items():
        (root / name).symlink_to(path)
    return root


def config_of(root, which):
    return json.loads((root / which / "config.json").read_text())["quantization_config"]


def test_the_configs_read_as_the_library_parses_them(int_checkpoints):
    from compressed_tensors.quantization import QuantizationConfig

    int8, int4 = config_of(int_checkpoints, "int8"), config_of(int_checkpoints, "int4")
    for config in (int8, int4):
        QuantizationConfig.model_validate(config)  # the library accepts what the tests write
    found = read_quantization_config(int8)
    assert (found.scheme, found.activation_scheme) == (ScaledScheme.INT8, ActivationScheme.DYNAMIC)
    found = read_quantization_config(int4)
    assert (found.scheme, found.group_size, found.symmetric, found.act_order) == (ScaledScheme.INT4, 16, False, False)
    assert found.options["group_size"] == 16 and found.formula.value == "compressed-tensors"  # the writer library's arithmetic on a reload
    found = read_quantization_config(config_of(int_checkpoints, "actorder"))
    assert (found.group_size, found.symmetric, found.act_order) == (32, True, True)
    for order, act_order in (("weight", False), ("static", False), (None, False), ("dynamic", True), (True, True)):
        config = config_of(int_checkpoints, "int4")
        group(config)["weights"]["actorder"] = order
        assert read_quantization_config(config).act_order is act_order


INT4_CASES = [
    (lambda c: group(c)["weights"].update(num_bits=3), r"weights\.num_bits = 3: integer weights of 8 bits"),
    (lambda c: group(c)["weights"].update(num_bits=8), r"weights\.num_bits = 8: 8-bit pack-quantized"),
    (lambda c: group(c)["weights"].update(actorder="random"), r"weights\.actorder = 'random': unknown"),
    (lambda c: group(c)["weights"].update(strategy="channel", group_size=None), r"weights\.strategy = 'channel'"),
    (lambda c: group(c)["weights"].update(group_size=0), r"weights\.group_size = 0"),
    (lambda c: group(c).update(input_activations={"num_bits": 8, "type": "int", "dynamic": True}),
     r"input_activations: int4 loads weight-only"),
    (lambda c: c.update(format="int-quantized"), r"num_bits = 4: 4-bit weights are stored pack-quantized"),
    (lambda c: group(c)["weights"].update(type="float"), r"weights\.type = 'float' does not fit"),
]
INT8_CASES = [
    (lambda c: group(c)["weights"].update(symmetric=False), r"weights\.symmetric = False: int8 weights must be"),
    (lambda c: group(c)["weights"].update(strategy="tensor"), r"weights\.strategy = 'tensor'"),
    (lambda c: group(c)["input_activations"].update(dynamic=False), r"input_activations\.dynamic = False"),
    (lambda c: group(c)["input_activations"].update(symmetric=False), r"input_activations\.symmetric = False"),
    (lambda c: group(c)["input_activations"].update(type="float"), r"input_activations\.type = 'float'"),
    (lambda c: group(c)["input_activations"].update(strategy="tensor"), r"input_activations\.strategy = 'tensor'"),
]


@pytest.mark.parametrize("which,edit,message", [("int4", *c) for c in INT4_CASES] + [("int8", *c) for c in INT8_CASES])
def test_unsupported_int_configs_name_the_field(int_checkpoints, tmp_path, which, edit, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_model(variant(int_checkpoints, tmp_path, which, edit))


def _edit(name, make):
    def edit(tensors):
        tensors[name] = make(tensors[name]).contiguous()
    return edit


LAYER = "model.layers.0.mlp.down_proj"
TENSOR_CASES = [
    ("int4", _edit(f"{LAYER}.weight_shape", lambda t: torch.tensor([64, 95])),
     QuantizationConfigError, r"down_proj\.weight_shape is \[64, 95\], but .*weight_packed holds a \[64, 96\].*"
                              "not a multiple of 8"),
    ("int4", _edit(f"{LAYER}.weight_packed", lambda t: t[:, :-1]), WeightLoadError,
     r"'model\.layers\.0\.mlp\.down_proj\.weight_packed' \(shape \[64, 11\]\) does not fit parameter"),
    ("int4", _edit(f"{LAYER}.weight_packed", lambda t: t.to(torch.int64)), WeightDtypeError,
     r"down_proj\.weight_packed' has dtype int64; the codes of a pre-quantized weight it loads into must be int32"),
    ("int4", _edit(f"{LAYER}.weight_scale", lambda t: t[:, :-1]), WeightLoadError,
     r"scale of shape \[64, 5\] is not the \[64, 6\] grid of a \[64, 96\] weight in groups of 16"),
    ("int4", _edit(f"{LAYER}.weight_zero_point", lambda t: t[:-1]), WeightLoadError,
     r"packed zero point of shape \[7, 6\] is not the \[8, 6\] grid"),
    ("actorder", _edit("model.layers.1.self_attn.k_proj.weight_g_idx", lambda t: t + 1), WeightLoadError,
     r"k_proj\.weight_g_idx.*group indices must lie in \[0, 2\), got \[1, 2\]"),
    ("int8", _edit(f"{LAYER}.weight", lambda t: t.to(torch.int32)), WeightDtypeError,
     r"down_proj\.weight' has dtype int32; the codes of a pre-quantized weight it loads into must be int8"),
]


@pytest.mark.parametrize("which,edit,error,message", TENSOR_CASES)
def test_bad_tensors_are_named(int_checkpoints, tmp_path, which, edit, error, message):
    with pytest.raises(error, match=message):
        load_model(variant(int_checkpoints, tmp_path, which, edit_tensors=edit))


def test_a_weight_shape_without_its_codes_is_named(int_checkpoints, tmp_path):
    def drop(tensors):
        del tensors[f"{LAYER}.weight_packed"]
    with pytest.raises(QuantizationConfigError, match=r"weight_shape without packed codes.*down_proj\.weight_shape"):
        load_model(variant(int_checkpoints, tmp_path, "int4", edit_tensors=drop))


def test_packed_int4_for_a_layer_kept_in_high_precision_is_refused(int_checkpoints, tmp_path):
    out = variant(int_checkpoints, tmp_path, "int4")
    file = next(out.glob("*.safetensors"))
    tensors = safetensors.torch.load_file(file)
    embed = tensors.pop("model.embed_tokens.weight")
    tensors["model.embed_tokens.weight_packed"] = torch.zeros(embed.shape[0], embed.shape[1] // 8, dtype=torch.int32)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(QuantizationConfigError, match="'model.embed_tokens' stays in high precision.*packed int4"):
        load_model(out)


def test_weight_only_int8_reads_from_naive_quantized(int_checkpoints, tmp_path):
    """W8A16 as `naive-quantized` (no activations): the same tensors, weight-only int8."""
    def weight_only(config):
        config["format"] = "naive-quantized"
        group(config).update(input_activations=None, format="naive-quantized")
    model = load_model(variant(int_checkpoints, tmp_path, "int8", weight_only))
    assert model.prequantized.activation_scheme is ActivationScheme.NONE
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    assert torch.equal(model(ids), load_model(int_checkpoints / "int8", activation_scheme="none")(ids))
