"""Eight 4-bit codes per int32 along the last (input) dimension: the storage of the int4 scheme.

A symmetric int4 code q in [-7, 7] is stored as the nibble `q + 8` (offset binary, 1..15; 0 is never
written), element 8k + i of a row in bits [4i, 4i + 4) of int32 k: compressed-tensors'
`pack-quantized` layout for signed 4-bit weights (GPTQ's order). Pure torch, no state.
"""

from __future__ import annotations

import torch

PACK_FACTOR = 8  # 4-bit codes per int32
OFFSET = 8  # signed code -> stored nibble


def packed_size(n: int, what: str = "input size") -> int:
    """Int32 words for `n` codes; `n` must be a multiple of PACK_FACTOR (a clear error otherwise)."""
    if n % PACK_FACTOR:
        raise ValueError(f"int4 packs {PACK_FACTOR} codes per int32 along the input dimension; {what} {n} is not a "
                         f"multiple of {PACK_FACTOR}")
    return n // PACK_FACTOR


def pack_int4(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., n] -> int32 [..., n / 8] (into `out` when given)."""
    words = (codes.to(torch.int32) + OFFSET).unflatten(-1, (packed_size(codes.shape[-1]), PACK_FACTOR))
    result = words[..., 0].clone() if out is None else out.copy_(words[..., 0])
    for i in range(1, PACK_FACTOR):
        result |= words[..., i] << (4 * i)
    return result


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n / 8] -> the stored nibbles (`code + 8`, 0..15) as int32 [..., n]."""
    shifts = torch.arange(0, 4 * PACK_FACTOR, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n / 8] -> int8 codes [..., n] (the inverse of `pack_int4`)."""
    return (unpack_nibbles(packed) - OFFSET).to(torch.int8)
