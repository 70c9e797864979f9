"""The scaled-code schemes (codes times scales: fp8, int8, int4, mxfp8) and their options: which layers
get quantized methods, and with what settings.

Schemes (the public names): "fp8" per-tensor weight scales, "fp8-channel" one scale per output
channel, "fp8-block" 128x128 weight blocks (ceil-division grid for other shapes); "int8" symmetric
int8 codes with one scale per output channel (W8A8 with `torch._int_mm`); "mxfp8" OCP MXFP8:
e4m3 codes in 1x32 blocks along the input dimension with power-of-two (E8M0) scales
(`code_format.py` states both formulas). Activations are quantized dynamically at matmul time, in the
weights' code format: per token for fp8, fp8-channel and int8, per 1x128 group for blocks, per 1x32
block for mxfp8; `activation_scheme="none"` keeps them in the model dtype (weight-only: W8A16).
"int4" is W4A16 (weight-only always): symmetric int4 codes (-7..7) with one scale per 1 x `group_size`
group along the input (default 128), or with `symmetric=False` codes -8..7 with a scale and an int8
zero point per group (`int4.py`); stored eight per int32 (`int4_pack.py`), dequantized at matmul.
`act_order=True` (what a GPTQ-style pre-quantized checkpoint with `g_idx` sets) gives each int4 layer a
group index per input column (`scaled/weights.py`).
All six share one machinery (`scaled.weights`, `math.quantize`): streaming, tensor parallelism on the
global tile grid, reload in place, MoE experts, the error log.

Linear layers and MoE experts are quantized; embeddings, the LM head, norms and the MoE router gate
(built without a quant config) stay in the model dtype. `ignore` regexes (`re.search` over the
module name, e.g. "model.layers.0.self_attn.qkv_proj" -- streamquant's fused names) keep matching
layers unquantized. `formula` picks the arithmetic (`formula.py`): streamquant's own (default), or
compressed-tensors' or transformers' bit for bit (fp8 schemes: all three; int8 and int4: streamquant
or compressed-tensors, whose integer codes span -128..127 / -8..7; mxfp8: streamquant only).

The config is a frozen value except for `error_log`, a per-load record the load that made the
config owns (`config.make_quant_config` makes one config per `load_model` call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import torch

from streamquant.quant.base import EmbeddingMethod, LinearMethod, MoEMethod, check_ignore
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.formula import Formula, formula_of
from streamquant.quant.scaled.linear import ScaledLinearMethod, default_activation
from streamquant.quant.math.code_format import INT4, INT4_ASYMMETRIC, INT8, MXFP8, CodeFormat
from streamquant.quant.scaled.moe import ScaledMoEMethod
from streamquant.quant.scaled.weights import ScaledWeightSpec
from streamquant.quant.math.granularity import Granularity, PerBlock, PerRow, PerTensor
from streamquant.quant.unquantized import UnquantizedFusedMoEMethod
from streamquant.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedLinearMethod


class ScaledScheme(str, Enum):
    FP8 = "fp8"
    FP8_CHANNEL = "fp8-channel"
    FP8_BLOCK = "fp8-block"
    INT8 = "int8"
    MXFP8 = "mxfp8"
    INT4 = "int4"


class ActivationScheme(str, Enum):
    DYNAMIC = "dynamic"
    NONE = "none"


# Read-only: accepted fp8 format names.
FP8_DTYPES = MappingProxyType({"e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
                               "e4m3fnuz": torch.float8_e4m3fnuz, "float8_e4m3fnuz": torch.float8_e4m3fnuz})


MX_BLOCK = (1, 32)  # OCP MX: 32 consecutive elements along the input (reduction) dimension


def _choice(enum: type[Enum], value, what: str):
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"{what} must be one of {names}, got {value!r}") from None


def _fp8_dtype(value: torch.dtype | str | None, scheme: ScaledScheme) -> torch.dtype | None:
    """The fp8 code dtype of a scheme: int8 takes none, mxfp8 only e4m3fn, the fp8 schemes either."""
    if scheme in (ScaledScheme.INT8, ScaledScheme.MXFP8, ScaledScheme.INT4):
        fixed = {ScaledScheme.MXFP8: torch.float8_e4m3fn}.get(scheme)
        given = FP8_DTYPES.get(value.lower(), value) if isinstance(value, str) else value
        if given is not None and given != fixed:
            raise ValueError(f"fp8_dtype={value!r} does not apply to quantization={scheme.value!r}"
                             + (" (its codes are integers)" if fixed is None else " (OCP MXFP8 elements are e4m3fn)"))
        return fixed
    if value is None:
        return torch.float8_e4m3fn
    if isinstance(value, torch.dtype) and value in FP8_DTYPES.values():
        return value
    if isinstance(value, str) and value.lower() in FP8_DTYPES:
        return FP8_DTYPES[value.lower()]
    raise ValueError(f"fp8_dtype must be one of {', '.join(FP8_DTYPES)} (or the torch dtype), got {value!r}")


@dataclass(frozen=True)
class ScaledConfig:
    """A validated quantization config of one scaled-code scheme; `get_*_method(prefix)` picks each layer's method.

    `error_log`, when given, receives the quantization error of every weight (costs two passes).
    """

    scheme: ScaledScheme
    fp8_dtype: torch.dtype | None = None  # default e4m3fn; None for int8
    activation_scheme: ActivationScheme | None = None  # default: dynamic; int4: none (its only choice)
    ignore: tuple[str, ...] = ()
    block_size: tuple[int, int] = (128, 128)
    group_size: int = 128  # int4 only
    symmetric: bool = True  # int4 only: False adds a zero point per group (`int4.py`)
    act_order: bool = False  # int4 only: a group index per input column (pre-quantized GPTQ-style checkpoints)
    compile: bool = False
    formula: Formula = Formula.STREAMQUANT
    tp_invariant_activations: bool = False
    error_log: QuantErrorLog | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", _choice(ScaledScheme, self.scheme, "scheme"))
        object.__setattr__(self, "fp8_dtype", _fp8_dtype(self.fp8_dtype, self.scheme))
        int4 = self.scheme is ScaledScheme.INT4
        default = ActivationScheme.NONE if int4 else ActivationScheme.DYNAMIC
        activation = _choice(ActivationScheme, self.activation_scheme or default, "activation_scheme")
        if int4 and activation is not ActivationScheme.NONE:
            raise ValueError("quantization='int4' is weight-only (W4A16): activation_scheme must be 'none'")
        object.__setattr__(self, "activation_scheme", activation)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if not self.symmetric and not int4:
            raise ValueError(f"symmetric=False (zero points) applies to quantization='int4' only, not {self.scheme.value!r}")
        if self.act_order and not int4:
            raise ValueError(f"act_order=True (group indices) applies to quantization='int4' only, not {self.scheme.value!r}")
        object.__setattr__(self, "ignore", check_ignore(self.ignore))
        object.__setattr__(self, "block_size", PerBlock(tuple(self.block_size)).block_size)
        object.__setattr__(self, "formula", formula_of(self.formula))
        if self.formula is not Formula.STREAMQUANT and self.scheme is ScaledScheme.MXFP8:
            raise ValueError(f"formula={self.formula.value!r} reproduces another library's arithmetic; "
                             f"quantization={self.scheme.value!r} has the streamquant formula only")
        if self.formula is Formula.TRANSFORMERS and self.scheme in (ScaledScheme.INT8, ScaledScheme.INT4):
            raise ValueError(f"formula='transformers' reproduces transformers' fp8 arithmetic; quantization="
                             f"{self.scheme.value!r} takes formula 'streamquant' or 'compressed-tensors'")

    @property
    def granularity(self) -> Granularity:
        return {ScaledScheme.FP8: PerTensor(), ScaledScheme.FP8_CHANNEL: PerRow(), ScaledScheme.INT8: PerRow(),
                ScaledScheme.FP8_BLOCK: PerBlock(self.block_size), ScaledScheme.MXFP8: PerBlock(MX_BLOCK),
                ScaledScheme.INT4: PerBlock((1, self.group_size))}[self.scheme]

    @property
    def code_format(self) -> CodeFormat:
        int4 = INT4 if self.symmetric else INT4_ASYMMETRIC
        return {ScaledScheme.INT8: INT8, ScaledScheme.MXFP8: MXFP8, ScaledScheme.INT4: int4}.get(self.scheme) or CodeFormat(self.fp8_dtype)

    @property
    def weight_spec(self) -> ScaledWeightSpec:
        return ScaledWeightSpec(self.granularity, self.code_format, self.compile, self.formula, self.act_order)

    @property
    def activation(self) -> Granularity | None:
        return None if self.activation_scheme is ActivationScheme.NONE else default_activation(self.granularity)

    def is_ignored(self, prefix: str) -> bool:
        return any(re.search(pattern, prefix) for pattern in self.ignore)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if self.is_ignored(prefix):
            return UnquantizedLinearMethod()
        return ScaledLinearMethod(self.weight_spec, self.activation, self.error_log, self.tp_invariant_activations)

    def get_moe_method(self, prefix: str) -> MoEMethod:
        if self.is_ignored(prefix):
            return UnquantizedFusedMoEMethod()
        return ScaledMoEMethod(self.weight_spec, self.activation, self.error_log, self.tp_invariant_activations)

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()
