"""int4 packing (`quant/math/int4_pack.py`): code 8k + i of a row is the nibble `code + 8` at bits
[4i, 4i + 4) of word k (against the numpy reference's packing), the round trip is exact, and a rank's
input size must fill whole words. 8-bit words and packing along the rows (zero points) are
compressed-tensors' own packer's output, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.quant.math.int4_pack import pack_int4, pack_int32, pack_rows, unpack_int4

from ..fp8_reference import ref_pack_int4


def test_int4_packing_is_the_documented_nibble_layout():
    """Code 8k + i of a row is the nibble `code + 8` at bits [4i, 4i + 4) of word k; round trip exact."""
    codes = torch.tensor([[-7, -1, 0, 1, 2, 3, 4, 7, 5, -5, 6, -6, 0, 0, 0, -7]], dtype=torch.int8)
    words = pack_int4(codes)
    expected = [sum((int(c) + 8) << (4 * i) for i, c in enumerate(codes[0, k * 8:(k + 1) * 8])) for k in range(2)]
    assert words.view(torch.int32).tolist() == [[np.uint32(e).view(np.int32) for e in expected]]
    assert torch.equal(unpack_int4(words), codes)
    np.testing.assert_array_equal(words.numpy(), ref_pack_int4(codes.view(torch.uint8).numpy()))


def test_int4_needs_whole_words_per_rank():
    from streamquant.quant.math.int4_pack import packed_size

    with pytest.raises(ValueError, match="input size 44 is not a multiple of 8"):
        packed_size(44)


def test_rows_pack_as_compressed_tensors_packs_zero_points():
    """`pack_rows` is compressed-tensors' `pack_to_int32(..., packed_dim=0)` (its zero points), bit for bit."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from streamquant.quant.math.int4_pack import unpack_int4_rows

    values = torch.randint(-8, 8, (2, 24, 5), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    words = pack_rows(values)
    assert words.shape == (2, 3, 5) and torch.equal(words, pack_to_int32(values, 4, packed_dim=0))
    assert torch.equal(unpack_int4_rows(words), values)
    assert torch.equal(unpack_from_int32(words[0], 4, torch.Size((24, 5)), packed_dim=0), values[0])
    codes = values.transpose(-1, -2).contiguous()  # [2, 5, 24]: and the codes along the input
    assert torch.equal(pack_int4(codes), pack_to_int32(codes, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [16, 13, 1])  # rows not filling the last word of a row-packing; one row
def test_words_and_row_packing_are_compressed_tensors_packing(bits, rows):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits + rows)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, 64), generator=g).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))
    assert torch.equal(pack_rows(codes, bits), pack_to_int32(codes, bits, packed_dim=0))
    assert pack_rows(codes.to("meta"), bits).shape == pack_to_int32(codes, bits, packed_dim=0).shape  # plans: no data
    part = codes[:, 8:16]  # a strided view; a size-1 dim when rows == 1
    assert torch.equal(pack_int32(part, bits), pack_to_int32(part.contiguous(), bits))


def test_eight_bit_words_need_whole_words():
    with pytest.raises(ValueError, match="int8 packs 4 codes per int32 along the input dimension; input size 6"):
        pack_int32(torch.zeros(2, 6, dtype=torch.int8), 8)
