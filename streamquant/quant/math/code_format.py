"""The code formats the scaled schemes store (fp8 e4m3, int8, int4, MXFP8), and the scale rule of each.

A `CodeFormat` is a storage dtype and its constants:
  - float8_e4m3fn (max 448) / float8_e4m3fnuz (max 240): the fp8 schemes; codes are the float
    cast (round to nearest even) of the clamped `w / scale`.
  - int8 (max 127, symmetric: -128 is never written): codes are `round(clamp(w / scale, +-127))`,
    round half to even (torch.round), then the exact cast to int8.
  - int4 (`bits=4`: max 7, symmetric, -8 never written): the int8 rule with max 7; the codes are
    computed as int8 and stored packed, eight per int32 (`int4_pack.py`). `zero_point=True`: the
    asymmetric int4 formula of `int4.py` (codes -8..7 with a zero point per group).
The compressed-tensors formula (`formula.code_bounds`) writes integer codes over the whole
two's-complement range (int8 -128..127, int4 -8..7, still symmetric: no zero point).
Scales are float32 dequantization multipliers. Their rule:
  - `mx=False`: `scale = max(amax / max, min_scale)` with `min_scale = 1 / (max * 512)`
    (`formula.tile_scales`, the streamquant formula).
  - `mx=True` (OCP Microscaling v1.0, section 6.3, the E8M0 shared scale of MXFP8): the power of two
    `scale = 2 ** clamp(floor(log2(amax)) - emax, -127, 127)` with `emax = 8`, the exponent of
    e4m3's largest power of two (256). `w / scale` can reach 511.9: values past 448 saturate (the
    clamp is never skipped). A zero block gets 2^-127 (the E8M0 code 0). A power-of-two scale is
    exact in float32 and converts to `torch.float8_e8m0fnu` without rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
CODE_DTYPES = FP8_DTYPES + (torch.int8,)
MX_EMAX = 8  # floor(log2(448)): e4m3's largest power of two is 2^8
E8M0_EXP_RANGE = (-127, 127)


@dataclass(frozen=True)
class CodeFormat:
    """A code dtype (e4m3fn, e4m3fnuz or int8) and its constants; `mx`: power-of-two (E8M0) scales;
    `bits=4`: int4 codes computed in int8 and stored packed."""

    dtype: torch.dtype
    mx: bool = False
    bits: int = 8
    zero_point: bool = False  # asymmetric int4 (`int4.py`)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or (self.bits == 4 and self.dtype != torch.int8):
            raise ValueError(f"bits={self.bits}: 8-bit codes, or 4-bit integer codes computed as int8")
        if self.zero_point and self.bits != 4:
            raise ValueError("zero points are implemented for int4 only")
        if self.dtype not in CODE_DTYPES:
            raise ValueError(f"{self.dtype} is not a code dtype; expected one of {', '.join(map(str, CODE_DTYPES))}")
        if self.mx and self.dtype != torch.float8_e4m3fn:
            raise ValueError(f"MX (E8M0) scales are defined for float8_e4m3fn elements only, not {self.dtype}")

    @property
    def integer(self) -> bool:
        """Codes are integers: quantization rounds before the cast (which would truncate)."""
        return not self.dtype.is_floating_point

    @property
    def max(self) -> float:
        """Largest code magnitude: 448 (e4m3fn), 240 (e4m3fnuz), 127 (int8), 7 (int4)."""
        if self.integer:
            return float(2 ** (self.bits - 1) - 1)
        return float(torch.finfo(self.dtype).max)

    @property
    def packed(self) -> bool:
        """Codes are stored packed (int4: eight per int32 along the input, `int4_pack.py`)."""
        return self.bits < 8

    @property
    def min_scale(self) -> float:
        """The scale floor `1 / (max * 512)` (not used by MX scales); used as a float32."""
        return 1.0 / (self.max * 512.0)

    @property
    def scales_cover_amax(self) -> bool:
        """Whether `scale >= amax / max` always holds, so quantizing needs no clamp (see
        `torch_kernels.quantize_piece_unclamped`); false for MX, whose floor-rounded scale saturates."""
        return not self.mx


E4M3FN = CodeFormat(torch.float8_e4m3fn)
E4M3FNUZ = CodeFormat(torch.float8_e4m3fnuz)
INT8 = CodeFormat(torch.int8)
INT4 = CodeFormat(torch.int8, bits=4)
INT4_ASYMMETRIC = CodeFormat(torch.int8, bits=4, zero_point=True)
MXFP8 = CodeFormat(torch.float8_e4m3fn, mx=True)


def mx_scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 `2 ** clamp(floor(log2(amax)) - 8, -127, 127)` per element of `amax` (float32, finite, >= 0).

    On the float32 bits, no float log: a normal amax has floor(log2(amax)) = its biased exponent - 127;
    a subnormal one (exponent field 0) or zero lands on the -127 floor, as every exponent below -118
    does. The power of two is built as bits: (e + 127) << 23 for e >= -126, 0x00400000 (the subnormal
    2^-127) for e = -127. (frexp / ldexp gave the same values at several times the cost.)
    """
    biased = amax.to(torch.float32).contiguous().view(torch.int32) >> 23  # sign bit is 0: amax >= 0
    shared = torch.where(biased > 0, biased - 127 - MX_EMAX, E8M0_EXP_RANGE[0]).clamp_(*E8M0_EXP_RANGE)
    bits = torch.where(shared > E8M0_EXP_RANGE[0], (shared + 127) << 23, 0x00400000)
    return bits.to(torch.int32).view(torch.float32)
