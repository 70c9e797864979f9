"""Eight 4-bit codes per int32 along the last (input) dimension: the storage of the int4 scheme.

A symmetric int4 code q in [-7, 7] is stored as the nibble `q + 8` (offset binary, 1..15; 0 is never
written by the streamquant formula, and means -8 where the compressed-tensors formula or a zero
point writes it), element 8k + i of a row in bits [4i, 4i + 4) of int32 k: compressed-tensors'
`pack-quantized` layout for signed 4-bit weights (GPTQ's order). `pack_int32` is the same layout for
8-bit codes (four per int32, stored `q + 128`: compressed-tensors' weight-only int8), and
`pack_rows` packs along the second-to-last (output) dimension, as that format stores asymmetric zero
points: rows padded to whole words with the stored value 0. Pure torch, no state.
"""

from __future__ import annotations

import sys

import torch

PACK_FACTOR = 8  # 4-bit codes per int32
OFFSET = 8  # signed code -> stored nibble


def packed_size(n: int, what: str = "input size", bits: int = 4) -> int:
    """Int32 words for `n` codes of `bits`; `n` must fill whole words (a clear error otherwise)."""
    per_word = 32 // bits
    if n % per_word:
        raise ValueError(f"int{bits} packs {per_word} codes per int32 along the input dimension; {what} {n} is not a "
                         f"multiple of {per_word}")
    return n // per_word


def pack_int32(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in [-2^(bits-1), 2^(bits-1)), [..., n] -> int32 [..., n * bits / 32] (into `out` when given);
    `bits` 4 or 8. Little-endian hosts build the words' bytes (two nibbles, or one code, per byte) and view
    them as int32 (one pass over the codes); big-endian ones shift and or the words arithmetically."""
    if bits not in (4, 8):
        raise ValueError(f"codes of 4 or 8 bits pack into int32 words, not {bits}")
    per_word = 32 // bits
    words = packed_size(codes.shape[-1], bits=bits)
    if sys.byteorder == "little" and codes.dtype == torch.int8:
        # flat: a size-1 dim's stride may be anything, which a view as wider elements refuses
        stored = codes.contiguous().view(torch.uint8).reshape(-1) ^ (1 << (bits - 1))  # code + offset, low bits
        if bits == 4:  # byte pairs as int16 (element 2k in the low byte): low nibbles of both into one byte
            pairs = stored.view(torch.int16)
            stored = ((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).to(torch.uint8)
        result = stored.view(torch.int32).view(*codes.shape[:-1], words)
        return result if out is None else out.copy_(result)
    values = (codes.to(torch.int32) + (1 << (bits - 1))).unflatten(-1, (words, per_word))
    result = values[..., 0].clone() if out is None else out.copy_(values[..., 0])
    for i in range(1, per_word):
        result |= values[..., i] << (bits * i)
    return result


def pack_int4(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., n] -> int32 [..., n / 8] (into `out` when given)."""
    return pack_int32(codes, 4, out)


def pack_rows(codes: torch.Tensor, bits: int = 4, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes [..., rows, n] -> int32 [..., ceil(rows * bits / 32), n], packed along the rows (row
    8k + i of 4-bit codes in bits [4i, 4i + 4) of word row k: compressed-tensors' zero points); the last
    word's missing rows hold the stored value 0 (the code -2^(bits-1)). Into `out` when given."""
    per_word = 32 // bits
    pad = -codes.shape[-2] % per_word
    padded = torch.nn.functional.pad(codes.transpose(-1, -2), (0, pad), value=-(1 << (bits - 1)))
    packed = pack_int32(padded, bits).transpose(-1, -2)
    return packed.contiguous() if out is None else out.copy_(packed)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n / 8] -> int8 codes [..., n] (the inverse of `pack_int4`)."""
    shifts = torch.arange(0, 4 * PACK_FACTOR, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - OFFSET).to(torch.int8).flatten(-2)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., m / 8, n] -> int8 [..., m, n] (the inverse of `pack_rows` for 4-bit codes)."""
    return unpack_int4(packed.transpose(-1, -2)).transpose(-1, -2)
