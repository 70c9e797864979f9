"""The compressed-tensors format (what llm-compressor writes and vLLM loads): read and write.

Write: `quantization_config = {"quant_method": "compressed-tensors", "format": "float-quantized"
(or "naive-quantized" for weight-only), "quantization_status": "compressed", "config_groups":
{"group_0": {"targets": ["Linear"], "weights": ..., "input_activations": ...}}, "ignore": [HF module
names kept in high precision]}`. Weight args: 8-bit float, symmetric, static; strategy "tensor",
"channel" or "block" (+ "block_structure"). Activations: dynamic per "token" for tensor / channel
weights, dynamic "group" of the block's columns for block weights, or none (weight-only).
Per quantized linear `X`: `X.weight` F8_E4M3 and `X.weight_scale`, a dequantization multiplier shaped
[1] (tensor), [out, 1] (channel) or the ceil-division block grid; stored in the weight's dtype with
the compressed-tensors formula (that library's own layout), in float32 otherwise (a bf16 copy of a
float32 scale would no longer be the scale the codes were made with).

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
    field,
    recorded_formula,
)
from streamquant.quant.scaled.config import ActivationScheme, ScaledScheme
from streamquant.quant.math.formula import Formula

NAME = "compressed-tensors"
STRATEGIES = {ScaledScheme.FP8: "tensor", ScaledScheme.FP8_CHANNEL: "channel", ScaledScheme.FP8_BLOCK: "block"}
READ_FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized")
FORMAT_TYPES = {"float-quantized": ("float",), "naive-quantized": ("float", "int"), "int-quantized": ("int",),
                "pack-quantized": ("int",)}  # weights.type each format holds


class CompressedTensorsFormat:
    name = NAME
    scale_suffix = "weight_scale"

    def write_config(self, scheme: ScaledScheme, activation_scheme: ActivationScheme, block_size: tuple[int, int],
                     ignore: list[str], formula: Formula) -> dict:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": STRATEGIES[scheme], "group_size": None}
        if scheme is ScaledScheme.FP8_BLOCK:
            weights["block_structure"] = list(block_size)
        activations = None
        if activation_scheme is ActivationScheme.DYNAMIC:
            activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                           "strategy": "group" if scheme is ScaledScheme.FP8_BLOCK else "token",
                           "group_size": block_size[1] if scheme is ScaledScheme.FP8_BLOCK else None}
        fmt = "float-quantized" if activations is not None else "naive-quantized"
        return {"quant_method": NAME, "format": fmt, "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": activations, "output_activations": None,
                                              "format": fmt}},
                "ignore": list(ignore), "kv_cache_scheme": None, FORMULA_KEY: formula.value}

    def scale_to_disk(self, scales: torch.Tensor, scheme: ScaledScheme, weight_dtype: torch.dtype,
                      formula: Formula) -> torch.Tensor:
        if scheme is ScaledScheme.FP8:
            scales = scales.reshape(*scales.shape[:-2], 1)
        if formula is Formula.COMPRESSED_TENSORS and weight_dtype in (torch.bfloat16, torch.float16):
            return scales.to(weight_dtype)  # exact: the formula made them in that dtype
        return scales

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
        integer = scheme in (ScaledScheme.INT8, ScaledScheme.INT4)  # streamquant's formula only (a reload's)
        formula = recorded_formula(config, Formula.STREAMQUANT if integer else Formula.COMPRESSED_TENSORS)
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


COMPRESSED_TENSORS = CompressedTensorsFormat()
