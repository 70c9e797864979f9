"""The compressed-tensors format (what llm-compressor writes and vLLM loads): read and write.

Write: `quantization_config = {"quant_method": "compressed-tensors", "format": F, "quantization_status":
"compressed", "config_groups": {"group_0": {"targets": ["Linear"], "weights": ..., "input_activations":
..., "format": F}}, "ignore": [HF module names kept in high precision]}`, per scheme:
  - fp8 (F = "float-quantized", "naive-quantized" for weight-only): 8-bit float, symmetric, static
    weights; strategy "tensor", "channel" or "block" (+ "block_structure"). Activations: dynamic per
    "token" for tensor / channel weights, dynamic "group" of the block's columns for block weights.
    Per linear `X`: `X.weight` F8_E4M3 and `X.weight_scale` shaped [1], [out, 1] or the block grid.
  - int8 (W8A8, F = "int-quantized"): 8-bit int, symmetric, strategy "channel"; activations 8-bit int,
    symmetric, dynamic per "token". `X.weight` I8 [out, in], `X.weight_scale` [out, 1]. Weight-only
    int8 (W8A16) is what that library writes for it, F = "pack-quantized": `X.weight_packed` I32
    [out, in / 4] (four codes + 128 per word), `X.weight_scale` [out, 1], `X.weight_shape`.
  - int4 (W4A16, F = "pack-quantized"): 4-bit int, strategy "group" with `group_size`, `symmetric`
    (asymmetric adds `"zp_dtype": "torch.int8"`), `actorder` null, no activations. `X.weight_packed`
    I32 [out, in / 8] (`int4_pack`: code + 8 per nibble, along the input), `X.weight_scale` [out,
    in / group_size], asymmetric `X.weight_zero_point` I32 [ceil(out / 8), in / group_size] (packed
    along the OUTPUT dim, zero point + 8), `X.weight_shape` I64 [2] = [out, in]. The library's group
    strategy needs whole groups: an input size the group size does not divide is refused, naming
    the tensor.
Scales are dequantization multipliers, stored in the weight's dtype with the compressed-tensors
formula (that library's own layout; exact, as the formula made them in that dtype), in float32
otherwise (a bf16 copy of a float32 scale would no longer be the scale the codes were made with).
Where each formula differs from that library's: `quant/math/formula.py` and `quant/math/int4.py`.

Read: `float-quantized` and `naive-quantized` fp8 with those strategies and dynamic (or no) input
activations; `int-quantized` / `naive-quantized` int8 and `pack-quantized` int4
(`compressed_tensors_int.py` says which); older versions' extra fields are tolerated. Refused, naming
the field: static activations (`input_scale`), output activations, asymmetric fp8, group or
tensor-group fp8 strategies, several config groups that disagree, other formats.
"""

from __future__ import annotations

import torch

from streamquant.formats.compressed_tensors_int import read_int_group
from streamquant.formats.base import (
    FORMULA_KEY,
    QuantizationConfigError,
    QuantizedCheckpoint,
    QuantizedWeight,
    field,
    recorded_formula,
    sibling_name,
)
from streamquant.quant.scaled.config import ActivationScheme, ScaledConfig, ScaledScheme
from streamquant.quant.math.formula import Formula
from streamquant.quant.math.int4_pack import pack_int32, pack_rows

NAME = "compressed-tensors"
STRATEGIES = {ScaledScheme.FP8: "tensor", ScaledScheme.FP8_CHANNEL: "channel", ScaledScheme.FP8_BLOCK: "block"}
READ_FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized")
FORMAT_TYPES = {"float-quantized": ("float",), "naive-quantized": ("float", "int"), "int-quantized": ("int",),
                "pack-quantized": ("int",)}  # weights.type each format holds


class CompressedTensorsFormat:
    name = NAME
    scale_suffix = "weight_scale"

    def write_config(self, config: ScaledConfig, ignore: list[str]) -> dict:
        weights, activations, fmt = _config_group(config)
        return {"quant_method": NAME, "format": fmt, "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": activations, "output_activations": None,
                                              "format": fmt}},
                "ignore": list(ignore), "kv_cache_scheme": None, FORMULA_KEY: config.formula.value}

    def disk_tensors(self, name: str, weight: QuantizedWeight, config: ScaledConfig,
                     weight_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        scales = weight.scales
        if config.scheme is ScaledScheme.FP8:
            scales = scales.reshape(*scales.shape[:-2], 1)
        if config.formula is Formula.COMPRESSED_TENSORS and weight_dtype in (torch.bfloat16, torch.float16):
            scales = scales.to(weight_dtype)  # exact: the formula made them in that dtype
        scale = (sibling_name(name, "weight_scale"), scales)
        bits = _packed_bits(config)
        if bits is None:
            return [(name, weight.codes), scale]
        shape = tuple(weight.codes.shape)
        if config.scheme is ScaledScheme.INT4 and shape[-1] % config.group_size:
            raise ValueError(f"tensor {name!r}: input size {shape[-1]} is not a multiple of group_size "
                             f"{config.group_size} (compressed-tensors' group strategy needs whole groups)")
        out = [(sibling_name(name, "weight_packed"), pack_int32(weight.codes, bits)), scale]
        if weight.zero_points is not None:
            out.append((sibling_name(name, "weight_zero_point"), pack_rows(weight.zero_points, bits)))
        return out + [(sibling_name(name, "weight_shape"), torch.tensor(shape[-2:], dtype=torch.int64))]

    def read_config(self, config: dict) -> QuantizedCheckpoint:
        fmt = field(config, "format", "", default="float-quantized")
        if fmt not in READ_FORMATS:
            raise QuantizationConfigError(f"quantization_config.format = {fmt!r} is not supported "
                                          f"(supported: {', '.join(READ_FORMATS)})")
        status = config.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise QuantizationConfigError(f"quantization_config.quantization_status = {status!r}: only compressed "
                                          "checkpoints hold quantized codes")
        groups = field(config, "config_groups", "", required=True)
        if not isinstance(groups, dict) or not groups:
            raise QuantizationConfigError("quantization_config.config_groups is empty")
        parsed = {self._group(name, group, fmt) for name, group in groups.items()}
        if len(parsed) != 1:
            raise QuantizationConfigError(f"quantization_config.config_groups disagree ({len(parsed)} different "
                                          "schemes); streamquant loads one scheme per model")
        scheme, activation, block, int4 = parsed.pop()
        ignore = field(config, "ignore", "", default=[])
        formula = recorded_formula(config, Formula.COMPRESSED_TENSORS)  # a reload re-quantizes as the writer did
        return QuantizedCheckpoint(NAME, scheme, activation, formula, self.scale_suffix, block, tuple(ignore),
                                   *(int4 or ()))

    def _group(self, name: str, group: dict, fmt: str) -> tuple:
        """(scheme, activations, block, int4's (group_size, symmetric, act_order) or None) of one config group."""
        where = f".config_groups.{name}"
        weights = field(group, "weights", where, required=True)
        kind = weights.get("type", "float" if fmt in ("float-quantized", "naive-quantized") else "int")
        if kind not in FORMAT_TYPES[fmt]:
            raise QuantizationConfigError(f"quantization_config{where}.weights.type = {kind!r} does not fit "
                                          f"quantization_config.format = {fmt!r} (which holds "
                                          f"{' or '.join(FORMAT_TYPES[fmt])} weights)")
        if weights.get("dynamic", False):
            raise QuantizationConfigError(f"quantization_config{where}.weights.dynamic = true is not supported")
        if group.get("output_activations"):
            raise QuantizationConfigError(f"quantization_config{where}.output_activations is not supported")
        if kind == "int":
            return read_int_group(weights, group.get("input_activations"), fmt, where)
        for key, want in (("num_bits", 8), ("symmetric", True)):
            if weights.get(key, want) != want:
                raise QuantizationConfigError(f"quantization_config{where}.weights.{key} = {weights.get(key)!r}: "
                                              f"only {want!r} (fp8 e4m3, symmetric) is supported")
        strategy = weights.get("strategy", "tensor")
        by_strategy = {v: k for k, v in STRATEGIES.items()}
        if strategy not in by_strategy:
            raise QuantizationConfigError(f"quantization_config{where}.weights.strategy = {strategy!r} is not "
                                          f"supported (supported: {', '.join(by_strategy)})")
        scheme = by_strategy[strategy]
        block = tuple(weights.get("block_structure") or (128, 128))
        return scheme, self._activation(group.get("input_activations"), scheme, block, where), block, None

    def _activation(self, args: dict | None, scheme: ScaledScheme, block: tuple, where: str) -> ActivationScheme:
        if not args:
            return ActivationScheme.NONE
        where = f"{where}.input_activations"
        if not args.get("dynamic", False):
            raise QuantizationConfigError(f"quantization_config{where}.dynamic = false (static activation scales, "
                                          "input_scale tensors) is not supported; dynamic activations are")
        strategy = args.get("strategy", "token")
        want = "group" if scheme is ScaledScheme.FP8_BLOCK else "token"
        if strategy != want or (want == "group" and args.get("group_size") not in (None, block[1])):
            raise QuantizationConfigError(f"quantization_config{where}.strategy = {strategy!r} (group_size "
                                          f"{args.get('group_size')!r}) with {STRATEGIES[scheme]!r} weights is not "
                                          f"supported; streamquant quantizes activations per {want}"
                                          + (f" of {block[1]}" if want == "group" else ""))
        return ActivationScheme.DYNAMIC


def _packed_bits(config: ScaledConfig) -> int | None:
    """Bits per code of the `pack-quantized` layouts (int4; weight-only int8), None for unpacked codes."""
    if config.scheme is ScaledScheme.INT4:
        return 4
    if config.scheme is ScaledScheme.INT8 and config.activation_scheme is ActivationScheme.NONE:
        return 8
    return None


def _config_group(config: ScaledConfig) -> tuple[dict, dict | None, str]:
    """(weights, input_activations, format) of the one config group streamquant writes (module doc)."""
    scheme, dynamic = config.scheme, config.activation_scheme is ActivationScheme.DYNAMIC
    if scheme in (ScaledScheme.INT8, ScaledScheme.INT4):
        int4 = scheme is ScaledScheme.INT4
        weights = {"num_bits": 4 if int4 else 8, "type": "int", "symmetric": config.symmetric, "dynamic": False,
                   "strategy": "group" if int4 else "channel", "group_size": config.group_size if int4 else None,
                   "actorder": None, "observer": "memoryless_minmax"}
        if not config.symmetric:
            weights["zp_dtype"] = "torch.int8"
        activations = ({"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                        "group_size": None} if dynamic else None)
        return weights, activations, "pack-quantized" if _packed_bits(config) else "int-quantized"
    block = scheme is ScaledScheme.FP8_BLOCK
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": STRATEGIES[scheme],
               "group_size": None}
    if block:
        weights["block_structure"] = list(config.block_size)
    activations = ({"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                    "strategy": "group" if block else "token", "group_size": config.block_size[1] if block else None}
                   if dynamic else None)
    return weights, activations, "float-quantized" if dynamic else "naive-quantized"


COMPRESSED_TENSORS = CompressedTensorsFormat()
