"""AWQ (GEMM): config reading and the conversion to compressed-tensors' layout, against an independent numpy
reader of AWQ's own layout and the compressed-tensors library's decompression of what the conversion emits.

transformers cannot be a third reference here: it loads AWQ only through gptqmodel (not installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from streamquant.formats import PackedTensorError, QuantizationConfigError, read_quantization_config, to_compressed_tensors
from streamquant.formats.awq import read_config

from .int4_layouts import awq_tensors, ct_decompress, random_layer, read_awq

OUT, IN, GROUP = 32, 48, 16


def config(**over):
    return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm", **over}


def convert(tensors, checkpoint, module="model.layers.1.self_attn.o_proj"):
    out = list(to_compressed_tensors([(f"{module}.{k}", v) for k, v in tensors.items()], checkpoint))
    assert all(name.startswith(module + ".") for name, _ in out)
    return {name.rpartition(".")[2]: t for name, t in out}


@pytest.mark.parametrize("group", [GROUP, None], ids=["group", "channel"])
def test_conversion_is_bitwise(group):
    layer = random_layer(OUT, IN, group, sym=False, act_order=False, seed=11)
    tensors = awq_tensors(layer)
    expected = read_awq(tensors, group)
    assert np.array_equal(expected.view(np.uint16), layer.weight().view(np.uint16))  # the reader reads the writer
    checkpoint = read_config(config(group_size=group or -1))
    got = convert(tensors, checkpoint)
    assert sorted(got) == ["weight_packed", "weight_scale", "weight_shape", "weight_zero_point"]
    assert torch.equal(got["weight_packed"], pack_to_int32(torch.from_numpy(layer.q.astype(np.int8) - 8), 4))
    zp = torch.from_numpy(layer.z.astype(np.int8) - 8)
    assert torch.equal(got["weight_zero_point"], pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(got["weight_scale"], torch.from_numpy(layer.scales))
    assert torch.equal(got["weight_shape"], torch.tensor([OUT, IN]))
    weight = ct_decompress(got, checkpoint.compressed_tensors_config())
    assert torch.equal(weight.view(torch.int16), torch.from_numpy(expected).view(torch.int16))


def test_interleaved_order_of_one_word():
    """Outputs 0..7 with codes 0..7 pack, in AWQ's order, to the nibbles 0,2,4,6,1,3,5,7 (0x75316420)."""
    q = np.tile(np.arange(8, dtype=np.uint8), (8, 1)).T.copy()  # [out 8, in 8]: output o has code o
    layer = random_layer(8, 8, None, sym=False, act_order=False, seed=0)
    layer.q = q
    tensors = awq_tensors(layer)
    assert int(tensors["qweight"][0, 0]) == 0x75316420
    got = convert(tensors, read_config(config(group_size=-1)))
    assert [int(w) for w in got["weight_packed"][:, 0]] == [0x11111111 * o for o in range(8)]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(qweight=t["qweight"][:-8]), "'m.qweight': input size 40 is not a multiple of the group size"),
    (lambda t: t.update(qweight=t["qweight"][:-4]), "'m.qweight': input size 44 is not a multiple of 8"),
    (lambda t: t.update(scales=t["scales"].T), "'m.scales' has shape [32, 3]; expected [3, 32]"),
    (lambda t: t.update(qzeros=t["qzeros"][:, :-1]), "'m.qzeros' has shape [3, 3]; expected [3, 4]"),
    (lambda t: t.update(scales=t["scales"].to(torch.int16)), "'m.scales' has dtype int16"),
    (lambda t: t.update(qweight=t["qweight"][None]), "'m.qweight' has shape [1, 48, 4]"),
])
def test_bad_tensors_are_named(edit, message):
    tensors = awq_tensors(random_layer(OUT, IN, GROUP, sym=False, act_order=False, seed=1))
    edit(tensors)
    with pytest.raises(PackedTensorError) as e:
        convert(tensors, read_config(config()), module="m")
    assert message in str(e.value)


def test_config_fields():
    found = read_quantization_config(config(modules_to_not_convert=["visual"], do_fuse=False, backend="autoawq"))
    assert (found.format, found.checkpoint_format, found.group_size, found.symmetric, found.act_order,
            found.ignore) == ("awq", "gemm", GROUP, False, False, ("visual",))
    # AutoAWQ's own key names, GPTQModel's extra spellings of the version
    assert read_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}).group_size == 64
    assert read_config(config(checkpoint_format="gemm", format="gemm", desc_act=False)).checkpoint_format == "gemm"
    # GPTQModel's symmetric AWQ (zero_point false) still stores qzeros, converted as any others
    assert read_config(config(zero_point=False)) == read_config(config())


@pytest.mark.parametrize("over, message", [
    ({"bits": 8}, "bits = 8: only 4-bit AWQ"),
    ({"bits": None, "w_bit": 3}, "bits = 3"),
    ({"q_group_size": 64}, "group_size = 16 disagrees with quantization_config.q_group_size = 64"),
    ({"version": "gemv"}, "version = 'gemv' is not supported"),
    ({"version": "exllama"}, "version = 'exllama' is not supported"),
    ({"version": "gemv_fast"}, "version = 'gemv_fast'"),
    ({"format": "marlin"}, "format = 'marlin' is not supported"),
    ({"zero_point": "no"}, "zero_point = 'no'"),
    ({"backend": "llm-awq"}, "backend = 'llm-awq'"),
    ({"desc_act": True}, "desc_act = true"),
])
def test_unsupported_config_is_refused_by_field(over, message):
    cfg = config(**over)
    if cfg.get("bits") is None:
        del cfg["bits"]
    with pytest.raises(QuantizationConfigError) as e:
        read_quantization_config(cfg)
    assert message in str(e.value)
