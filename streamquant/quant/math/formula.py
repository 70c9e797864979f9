"""Which arithmetic turns a tile's amax into a scale and a weight into fp8 codes: the formula modes.

`Formula.STREAMQUANT` is streamquant's own (see `quantize.py`): float32 `scale = max(amax / fmax,
1 / (fmax * 512))`, codes `clamp(w.float() / scale)`. The other two reproduce, bit for bit, what
another library writes from the same weight, so a checkpoint streamquant writes (or an online load)
can equal theirs:

  COMPRESSED_TENSORS (compressed-tensors 0.20 / llm-compressor 0.14, `calculate_qparams` and
    `_quantize`): the scale is `amax / fmax` computed in the WEIGHT's dtype (bf16 for a bf16
    model: `bf16(fl32(amax / fmax))`), a zero scale replaced by that dtype's eps; codes are
    `w / scale` rounded to the weight's dtype, clamped, cast (a double rounding for bf16 / fp16).
    The scale is stored in the weight's dtype by that library; streamquant keeps it as float32
    (exact: every bf16 / fp16 value is a float32).
    Integer codes (int8, int4; `code_bounds`): the library's codes span the whole two's-complement
    range, [-128, 127] / [-8, 7], and its scale is amax over HALF that range's width: `amax / 127.5`
    / `amax / 7.5` (in the weight's dtype, eps for zero); codes `round(clamp(w / scale))` with the
    division in the weight's dtype (round half to even). So the most negative weight of a tile maps
    to -7.5 -> -8 (-128), the most positive to 7.5 -> clamped 7 (127). (streamquant's integer rule
    is symmetric: `amax / 7` (`/ 127`), codes -7..7 (-127..127).) The asymmetric int4 variant is
    in `int4.py`.
  TRANSFORMERS (transformers 5 `FineGrainedFP8`, `Fp8Quantize`): a float32 multiplier
    `m = reciprocal(amax) * fmax` (torch's `fmax / tensor`), 1 for a zero tile; codes
    `clamp(w.float() * m)`; the stored dequantization scale is `reciprocal(m)` (`weight_scale_inv`).
    The codes use `m` itself, not the reciprocal of the stored scale (the two can differ in the
    last bit), so the kernel takes a separate factor grid.

Every formula gives each tile a positive finite scale (no 0/0). Tests compare each mode with the
library's own function on the same tensors.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch


class Formula(str, Enum):
    STREAMQUANT = "streamquant"
    COMPRESSED_TENSORS = "compressed-tensors"
    TRANSFORMERS = "transformers"


class TileScales(NamedTuple):
    """Per-tile float32 grids: `scales` (dequantization multipliers, what the model stores) and
    `factors` (what the kernel applies: a divisor, or for TRANSFORMERS a multiplier)."""

    scales: torch.Tensor
    factors: torch.Tensor


def formula_of(value: Formula | str) -> Formula:
    """A `Formula` from itself or its name, with a clear error naming the choices."""
    try:
        return Formula(value)
    except ValueError:
        names = ", ".join(repr(f.value) for f in Formula)
        raise ValueError(f"formula must be one of {names}, got {value!r}") from None


def code_bounds(fmax: float, integer: bool, formula: Formula) -> tuple[float, float]:
    """(lowest, highest) code `formula` writes for a code format of largest magnitude `fmax`: +-fmax,
    except compressed-tensors' integer codes, which take the whole two's-complement range
    [-(fmax + 1), fmax] (module doc)."""
    if integer and formula_of(formula) is Formula.COMPRESSED_TENSORS:
        return -(fmax + 1.0), fmax
    return -fmax, fmax


def tile_scales(amax: torch.Tensor, fmax: float, min_scale: float, formula: Formula,
                weight_dtype: torch.dtype, integer: bool = False) -> TileScales:
    """The scale and kernel-factor grids of `formula` for float32 tile amaxes of a `weight_dtype` weight
    (`integer`: integer codes, whose compressed-tensors scale divides by half the code range)."""
    amax, formula = amax.to(torch.float32), formula_of(formula)
    if formula is Formula.STREAMQUANT:
        scales = torch.div(amax, torch.full((), fmax, dtype=torch.float32, device=amax.device)).clamp_min_(min_scale)
        return TileScales(scales, scales)
    if formula is Formula.COMPRESSED_TENSORS:
        dtype = weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32
        lowest, highest = code_bounds(fmax, integer, formula)
        half_range = (highest - lowest) / 2  # fmax for fp8; 7.5 / 127.5 for int4 / int8 (exact in bf16)
        scales = torch.div(amax.to(dtype), torch.full((), half_range, dtype=dtype, device=amax.device))
        scales = torch.where(scales == 0, torch.full((), torch.finfo(dtype).eps, dtype=dtype, device=amax.device),
                             scales).to(torch.float32)
        return TileScales(scales, scales)
    if formula is Formula.TRANSFORMERS:
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        factors = torch.where(amax > 0, safe.reciprocal() * fmax, torch.ones_like(amax))
        return TileScales(factors.reciprocal(), factors)
    raise TypeError(f"unknown formula {formula!r}")
