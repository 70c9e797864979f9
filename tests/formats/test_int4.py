"""formats/int4.py: the Int4Checkpoint description, the nibble packing against compressed-tensors' own, and the
module stream's holding (only until a layer's partners arrive, references only, in order)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

from streamquant.formats.int4 import (
    Int4Checkpoint,
    PackedTensorError,
    converted_shapes,
    module_stream,
    pack_nibbles,
    repack_along_rows,
    trivial_g_idx,
    unpack_nibbles,
)


def test_nibble_packing_is_compressed_tensors_packing():
    codes = torch.randint(-8, 8, (16, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles((codes + 8).to(torch.uint8))
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack_nibbles(packed).to(torch.int8) - 8, unpack_from_int32(packed, 4, codes.shape))


@pytest.mark.parametrize("order", [tuple(range(8)), (0, 4, 1, 5, 2, 6, 3, 7), (7, 6, 5, 4, 3, 2, 1, 0)])
def test_repack_along_rows_is_compressed_tensors_packing_of_the_transpose(order):
    """Codes [R, C*8] packed along columns in `order` -> packed along rows = compressed-tensors' packing of codes.T."""
    codes = torch.randint(-8, 8, (24, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    nibbles = (codes + 8).to(torch.uint8).unflatten(-1, (5, 8))
    words = pack_nibbles(nibbles[..., [order.index(p) for p in range(8)]].flatten(-2))  # nibble p holds order^-1[p]
    assert torch.equal(unpack_nibbles(words, order).to(torch.int8) - 8, codes)
    assert torch.equal(repack_along_rows(words, order).t(), pack_to_int32(codes.t().contiguous(), 4))


def test_unpack_in_an_order():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_nibbles(word, (0, 4, 1, 5, 2, 6, 3, 7)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    assert unpack_nibbles(torch.tensor([[-1]], dtype=torch.int32)).tolist() == [[15] * 8]  # the sign bit is a nibble bit


def test_checkpoint_values_are_validated():
    with pytest.raises(ValueError, match="4-bit codes, not 8-bit"):
        Int4Checkpoint("gptq", "gptq", 128, True, bits=8)
    with pytest.raises(ValueError, match="group_size must be positive"):
        Int4Checkpoint("gptq", "gptq", 0, True)
    with pytest.raises(ValueError, match="act_order needs groups"):
        Int4Checkpoint("gptq", "gptq", None, True, act_order=True)
    assert trivial_g_idx(6, 4).tolist() == [0, 0, 0, 0, 1, 1] and trivial_g_idx(3, None).tolist() == [0, 0, 0]


@pytest.mark.parametrize("group, sym", [(128, True), (32, False), (None, False)])
def test_compressed_tensors_config_is_read_by_the_library(group, sym):
    config = Int4Checkpoint("awq", "gemm", group, sym, ignore=("lm_head",)).compressed_tensors_config()
    parsed = QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.type, weights.symmetric, weights.group_size, weights.strategy) == (
        4, "int", sym, group, "channel" if group is None else "group")
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]


def test_act_order_config_says_group_which_the_library_no_longer_reads():
    config = Int4Checkpoint("gptq", "gptq", 128, False, act_order=True).compressed_tensors_config()
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "group"  # vLLM's g_idx spelling
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        QuantizationConfig.model_validate(copy.deepcopy(config))


def test_stream_holds_parts_only_until_the_layer_is_complete():
    """Parts are held as references; the layer converts on its last part; nothing of it is kept after."""
    pulled, converted, refs = [], [], {}

    def source():
        for name in ("x.a", "other", "x.b", "after"):
            pulled.append(name)
            tensor = torch.full((2,), len(pulled))
            refs[name] = weakref.ref(tensor)
            yield name, tensor
            del tensor

    def convert(module, parts):
        assert parts["a"] is refs["x.a"]() and parts["b"] is refs["x.b"]()  # references, not copies
        converted.append(module)
        yield f"{module}.sum", parts["a"] + parts["b"]

    stream = module_stream(source(), frozenset({"a", "b"}), convert, "test")
    assert next(stream)[0] == "other" and pulled == ["x.a", "other"]  # x.a held, not yet converted
    name, total = next(stream)
    assert (name, total.tolist(), pulled) == ("x.sum", [4, 4], ["x.a", "other", "x.b"])
    assert next(stream)[0] == "after" and converted == ["x"]
    assert refs["x.a"]() is None and refs["x.b"]() is None  # released while the stream goes on


def test_stream_names_incomplete_layers_and_duplicates():
    parts = frozenset({"qweight", "scales"})
    with pytest.raises(PackedTensorError, match=r"incomplete .*a.b: scales; c: qweight"):
        list(module_stream([("a.b.qweight", torch.ones(1)), ("c.scales", torch.ones(1))], parts, None, "gptq"))
    with pytest.raises(PackedTensorError, match="gptq checkpoint tensor 'a.qweight' arrived twice"):
        list(module_stream([("a.qweight", torch.ones(1))] * 2, parts, None, "gptq"))


def test_converted_shapes_name_a_bad_header():
    checkpoint = Int4Checkpoint("gptq", "gptq", 16, False, act_order=True)
    shapes = {"m.qweight": (4, 24), "m.qzeros": (2, 3), "m.scales": (2, 24), "m.g_idx": (32,), "m.bias": (24,)}
    got = converted_shapes(shapes, frozenset({"qweight", "qzeros", "scales", "g_idx"}),
                           lambda s: (s[1], s[0] * 8), checkpoint)
    assert got == {"m.weight_packed": (24, 4), "m.weight_scale": (24, 2), "m.weight_shape": (2,),
                   "m.weight_zero_point": (3, 2), "m.weight_g_idx": (32,), "m.bias": (24,)}
    with pytest.raises(PackedTensorError, match=r"'m.qweight' has shape \[96\]; expected two dims"):
        converted_shapes({"m.qweight": (96,)}, frozenset({"qweight"}), None, checkpoint)
    with pytest.raises(PackedTensorError, match="'m.qweight': input size 24 is not a multiple of the group size 16"):
        converted_shapes({"m.qweight": (3, 8)}, frozenset({"qweight"}), lambda s: (s[1], s[0] * 8), checkpoint)
