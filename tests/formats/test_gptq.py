"""GPTQ: config reading and the conversion to compressed-tensors' layout, against an independent numpy reader
of GPTQ's own layout and the compressed-tensors library's decompression of what the conversion emits.

transformers cannot be a third reference here: it loads GPTQ only through gptqmodel (not installed; on CPU
its GPTQ quantizer refuses to run without it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from streamquant.formats import (
    PackedTensorError,
    QuantizationConfigError,
    checkpoint_quantization_config,
    read_quantization_config,
    to_compressed_tensors,
)
from streamquant.formats.gptq import read_config
from .int4_layouts import ct_decompress, gptq_tensors, random_layer, read_gptq

OUT, IN, GROUP = 24, 64, 16


def config(**over):
    return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
            "checkpoint_format": "gptq", **over}


def convert(tensors, checkpoint, module="model.layers.0.mlp.up_proj"):
    out = list(to_compressed_tensors([(f"{module}.{k}", v) for k, v in tensors.items()], checkpoint))
    assert all(name.startswith(module + ".") for name, _ in out)
    return {name.rpartition(".")[2]: t for name, t in out}


CASES = [(v1, sym, desc_act, group) for v1 in (True, False) for sym in (True, False) for desc_act in (False, True)
         for group in (GROUP, None) if not (desc_act and group is None)]  # a per-channel scale has no group order


@pytest.mark.parametrize("v1, sym, desc_act, group", CASES, ids=lambda v: str(v))
def test_conversion_is_bitwise(v1, sym, desc_act, group):
    layer = random_layer(OUT, IN, group, sym=sym, act_order=desc_act, seed=7)
    tensors = gptq_tensors(layer, v1)
    expected = read_gptq(tensors, v1)
    assert np.array_equal(expected.view(np.uint16), layer.weight().view(np.uint16))  # the reader reads the writer
    checkpoint = read_config(config(group_size=group or -1, sym=sym, desc_act=desc_act,
                                    checkpoint_format="gptq" if v1 else "gptq_v2"))
    got = convert(tensors, checkpoint)
    # same codes, scales and zero points as compressed-tensors packs them (its signed code = our nibble - 8)
    assert torch.equal(got["weight_packed"], pack_to_int32(torch.from_numpy(layer.q.astype(np.int8) - 8), 4))
    assert torch.equal(got["weight_scale"], torch.from_numpy(layer.scales))
    assert torch.equal(got["weight_shape"], torch.tensor([OUT, IN]))
    assert ("weight_zero_point" in got) == (not sym)
    if not sym:
        zp = torch.from_numpy(layer.z.astype(np.int8) - 8)
        assert torch.equal(got["weight_zero_point"], pack_to_int32(zp, 4, packed_dim=0))
    assert ("weight_g_idx" in got) == desc_act
    if desc_act:
        assert got["weight_g_idx"].dtype == torch.int32 and torch.equal(got["weight_g_idx"], tensors["g_idx"])
    weight = ct_decompress(got, checkpoint.compressed_tensors_config())
    assert torch.equal(weight.view(torch.int16), torch.from_numpy(expected).view(torch.int16))


def test_v1_zero_point_zero_borrows_and_reads_back():
    """A zero point of 0 in v1 is the nibble 15 and a borrow from the next one (GPTQModel's save): read exactly."""
    layer = random_layer(OUT, IN, GROUP, sym=False, act_order=False, seed=3)
    layer.z[:8, 0] = [0, 5, 0, 0, 9, 15, 0, 1]
    tensors = gptq_tensors(layer, v1=True)
    assert (int(tensors["qzeros"][0, 0]) & 0xF) == 0xF
    got = convert(tensors, read_config(config(sym=False)))
    assert torch.equal(got["weight_zero_point"], pack_to_int32(torch.from_numpy(layer.z.astype(np.int8) - 8), 4, packed_dim=0))


def test_weight_and_scales_are_zero_copy_views():
    tensors = gptq_tensors(random_layer(OUT, IN, GROUP, sym=True, act_order=False, seed=1), v1=False)
    got = convert(tensors, read_config(config(checkpoint_format="gptq_v2")))
    for ours, theirs in (("weight_packed", "qweight"), ("weight_scale", "scales")):
        assert got[ours].untyped_storage().data_ptr() == tensors[theirs].untyped_storage().data_ptr()


def test_unquantized_tensors_pass_through_in_order():
    tensors = gptq_tensors(random_layer(OUT, IN, GROUP, sym=True, act_order=False, seed=1), v1=True)
    norm, bias = torch.ones(4), torch.zeros(OUT)
    stream = [("model.norm.weight", norm), ("m.qweight", tensors["qweight"]), ("m.bias", bias),
              ("m.qzeros", tensors["qzeros"]), ("m.scales", tensors["scales"]), ("m.g_idx", tensors["g_idx"])]
    out = list(to_compressed_tensors(stream, read_config(config())))
    assert [n for n, _ in out] == ["model.norm.weight", "m.bias", "m.weight_packed", "m.weight_scale", "m.weight_shape"]
    assert out[0][1] is norm and out[1][1] is bias


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(qweight=t["qweight"].flatten()), "'m.qweight' has shape"),
    (lambda t: t.update(qweight=t["qweight"].to(torch.int64)), "'m.qweight' has dtype int64"),
    (lambda t: t.update(scales=t["scales"][:, :-1]), "'m.scales' has shape [4, 23]; expected [4, 24]"),
    (lambda t: t.update(qzeros=t["qzeros"][:-1]), "'m.qzeros' has shape [3, 3]; expected [4, 3]"),
    (lambda t: t.update(g_idx=t["g_idx"][:-1]), "'m.g_idx' has shape [63]; expected [64]"),
    (lambda t: t.update(g_idx=t["g_idx"].flip(0)), "'m.g_idx' reorders columns"),
    (lambda t: t.update(qzeros=t["qzeros"] + 1), "'m.qzeros' holds zero points other than 8"),
])
def test_bad_tensors_are_named(edit, message):
    tensors = gptq_tensors(random_layer(OUT, IN, GROUP, sym=True, act_order=False, seed=1), v1=True)
    edit(tensors)
    with pytest.raises(PackedTensorError) as e:
        convert(tensors, read_config(config()), module="m")
    assert message in str(e.value)


def test_group_indexes_out_of_range_and_indivisible_groups_are_named():
    tensors = gptq_tensors(random_layer(OUT, IN, GROUP, sym=False, act_order=True, seed=1), v1=False)
    tensors["g_idx"][5] = IN // GROUP
    with pytest.raises(PackedTensorError, match=r"'m.g_idx' holds group indexes outside \[0, 4\)"):
        convert(tensors, read_config(config(sym=False, desc_act=True)), module="m")
    with pytest.raises(PackedTensorError, match="'m.qweight': input size 64 is not a multiple of the group size 24"):
        convert(tensors, read_config(config(group_size=24)), module="m")


def test_missing_and_duplicate_parts_are_named():
    tensors = gptq_tensors(random_layer(OUT, IN, GROUP, sym=True, act_order=False, seed=1), v1=True)
    with pytest.raises(PackedTensorError, match="incomplete .*m: g_idx, qzeros"):
        list(to_compressed_tensors([("m.qweight", tensors["qweight"]), ("m.scales", tensors["scales"])],
                                   read_config(config())))
    with pytest.raises(PackedTensorError, match="'m.scales' arrived twice"):
        list(to_compressed_tensors([("m.scales", tensors["scales"])] * 2, read_config(config())))


def test_config_fields():
    found = read_quantization_config(config(desc_act=True, sym=False, modules_to_not_convert=["lm_head"],
                                            damp_percent=0.01, true_sequential=True, meta={"quantizer": ["x"]},
                                            dynamic={"-:.*mlp.*": {}}, pack_dtype="int32", lm_head=False))
    assert (found.format, found.checkpoint_format, found.group_size, found.symmetric, found.act_order,
            found.ignore) == ("gptq", "gptq", GROUP, False, True, ("lm_head",))
    assert read_config(config(desc_act=True, static_groups=True)).act_order is False  # static groups stay contiguous
    assert read_config(config(group_size=-1)).group_size is None
    assert read_config({"quant_method": "gptq", "bits": 4, "format": "gptq_v2"}).checkpoint_format == "gptq_v2"
    assert read_config({"quant_method": "gptq"}).checkpoint_format == "gptq"  # AutoGPTQ before v2: v1


@pytest.mark.parametrize("over, message", [
    ({"bits": 8}, "bits = 8: only 4-bit GPTQ is supported (8-bit GPTQ is not built"),
    ({"bits": 3}, "bits = 3"),
    ({"group_size": 0}, "group_size = 0"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format = 'marlin' is not supported"),
    ({"checkpoint_format": None, "format": "bitblas"}, "format = 'bitblas' is not supported"),
    ({"format": "gptq_v2"}, "disagrees with itself"),
    ({"is_marlin_format": True}, "is_marlin_format = true"),
    ({"lm_head": True}, "lm_head = true"),
    ({"dynamic": {"+:.*down.*": {"bits": 8}}}, "dynamic overrides modules ['+:.*down.*']"),
    ({"rotation": "hadamard"}, "rotation = 'hadamard'"),
    ({"adapter": {"name": "lora", "rank": 8}}, "adapter ="),
    ({"pack_dtype": "int16"}, "pack_dtype = 'int16'"),
    ({"desc_act": "yes"}, "desc_act = 'yes'"),
])
def test_unsupported_config_is_refused_by_field(over, message):
    with pytest.raises(QuantizationConfigError) as e:
        read_quantization_config(config(**over))
    assert message in str(e.value)


def test_quantize_config_json_beside_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert checkpoint_quantization_config(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": True,
                                                               "sym": False, "static_groups": False}))
    found = read_quantization_config(checkpoint_quantization_config(tmp_path))
    assert (found.format, found.group_size, found.act_order, found.symmetric) == ("gptq", 32, True, False)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config(group_size=64)}))
    assert read_quantization_config(checkpoint_quantization_config(tmp_path)).group_size == 64  # config.json first
    (tmp_path / "quantize_config.json").write_text("{")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QuantizationConfigError, match="quantize_config.json is not valid JSON"):
        checkpoint_quantization_config(tmp_path)
