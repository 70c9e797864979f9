"""What every on-disk quantized format module provides, and the value a read of its config gives.

A format module owns both directions for its format: `write_config` (the `quantization_config` of a
checkpoint streamquant writes), `disk_tensors` (a weight's codes, scales and zero points as the
format names, packs and stores them), and `read_config` (a checkpoint's `quantization_config` ->
`QuantizedCheckpoint`, or a `QuantizationConfigError` naming the field and value it cannot serve).
The quantization math lives in `quant/`; nothing here computes a code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from streamquant.quant.scaled.config import ActivationScheme, ScaledConfig, ScaledScheme
from streamquant.quant.math.formula import Formula

# The key streamquant adds to a `quantization_config` it writes, so a reload of the checkpoint
# quantizes with the formula it was written with (both formats' readers ignore unknown keys).
FORMULA_KEY = "streamquant_formula"


class QuantizationConfigError(ValueError):
    """A checkpoint's `quantization_config` asks for something streamquant cannot load (named)."""


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """What a pre-quantized checkpoint holds, as streamquant's fp8 options.

    `scale_suffix`: the name of a weight's scale tensor beside `X.weight` ("weight_scale" or
    "weight_scale_inv"); `formula`: the arithmetic a reload of this model uses (the writer's, when
    it recorded one, else the format's own library's). int4 only: `group_size`, `symmetric` (False:
    zero points), `act_order` (a group index per input column, `X.weight_g_idx`)."""

    format: str
    scheme: ScaledScheme
    activation_scheme: ActivationScheme
    formula: Formula
    scale_suffix: str
    block_size: tuple[int, int] = (128, 128)
    ignore: tuple[str, ...] = ()
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False

    @property
    def options(self) -> dict:
        """`load_model` fp8 options (besides `ignore`, which the loader derives from the tensors present)."""
        options = {"activation_scheme": self.activation_scheme.value, "formula": self.formula.value}
        if self.scheme is ScaledScheme.FP8_BLOCK:
            options["block_size"] = self.block_size
        if self.scheme is ScaledScheme.INT4:
            options.update(group_size=self.group_size, symmetric=self.symmetric, act_order=self.act_order)
        return options


class QuantizedWeight(NamedTuple):
    """One weight as the quantization math leaves it: codes shaped like the weight (fp8, or int8 also for
    int4), float32 scales (the tile grid), int8 zero points (asymmetric int4) or None."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None = None


class CheckpointFormat(Protocol):
    """One on-disk format (a module-level instance per format module)."""

    name: str
    scale_suffix: str

    def write_config(self, config: ScaledConfig, ignore: list[str]) -> dict: ...

    def disk_tensors(self, name: str, weight: QuantizedWeight, config: ScaledConfig,
                     weight_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        """The checkpoint tensors of the weight `name` (`X.weight`), in the format's names, layout and dtypes;
        run on `meta` tensors it plans the files (names, dtypes, shapes) without computing anything."""
        ...

    def read_config(self, config: dict) -> QuantizedCheckpoint: ...


def sibling_name(name: str, suffix: str) -> str:
    """`X.weight` -> `X.<suffix>`; any other name -> `name_<suffix minus 'weight_'>`."""
    if name.endswith(".weight"):
        return name[: -len("weight")] + suffix
    return f"{name}_{suffix.removeprefix('weight_')}"


def field(config: dict, key: str, where: str, default=None, required: bool = False):
    """`config[key]` with a clear error when a required one is missing."""
    if key not in config or config[key] is None:
        if required:
            raise QuantizationConfigError(f"quantization_config{where} has no {key!r}")
        return default
    return config[key]


def recorded_formula(config: dict, default: Formula) -> Formula:
    value = config.get(FORMULA_KEY)
    if value is None:
        return default
    try:
        return Formula(value)
    except ValueError:
        raise QuantizationConfigError(f"quantization_config.{FORMULA_KEY} = {value!r} is not a formula streamquant "
                                      f"knows ({', '.join(f.value for f in Formula)})") from None


def check_fp8_e4m3(value, where: str) -> None:
    if value not in (None, "e4m3", "float8_e4m3fn", "e4m3fn"):
        raise QuantizationConfigError(f"quantization_config{where} = {value!r}: only e4m3 (float8_e4m3fn) is supported")
