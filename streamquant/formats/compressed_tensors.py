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

Read: `float-quantized` and `naive-quantized` with those strategies and dynamic (or no) input
activations; older versions' extra fields are tolerated. Refused, naming the field: static
activations (`input_scale`), output activations, int / 4-bit / asymmetric weights, group or
tensor-group strategies, several config groups that disagree, other formats.
"""

from __future__ import annotations

import torch

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
READ_FORMATS = ("float-quantized", "naive-quantized")


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
                                          "checkpoints hold fp8 codes")
        groups = field(config, "config_groups", "", required=True)
        if not isinstance(groups, dict) or not groups:
            raise QuantizationConfigError("quantization_config.config_groups is empty")
        parsed = {self._group(name, group) for name, group in groups.items()}
        if len(parsed) != 1:
            raise QuantizationConfigError(f"quantization_config.config_groups disagree ({len(parsed)} different "
                                          "schemes); streamquant loads one scheme per model")
        scheme, activation, block = parsed.pop()
        ignore = field(config, "ignore", "", default=[])
        return QuantizedCheckpoint(NAME, scheme, activation, recorded_formula(config, Formula.COMPRESSED_TENSORS),
                                   self.scale_suffix, block, tuple(ignore))

    def _group(self, name: str, group: dict) -> tuple[ScaledScheme, ActivationScheme, tuple[int, int]]:
        where = f".config_groups.{name}"
        weights = field(group, "weights", where, required=True)
        for key, want in (("num_bits", 8), ("type", "float"), ("symmetric", True)):
            if weights.get(key, want) != want:
                raise QuantizationConfigError(f"quantization_config{where}.weights.{key} = {weights.get(key)!r}: "
                                              f"only {want!r} (fp8 e4m3, symmetric) is supported")
        if weights.get("dynamic", False):
            raise QuantizationConfigError(f"quantization_config{where}.weights.dynamic = true is not supported")
        strategy = weights.get("strategy", "tensor")
        by_strategy = {v: k for k, v in STRATEGIES.items()}
        if strategy not in by_strategy:
            raise QuantizationConfigError(f"quantization_config{where}.weights.strategy = {strategy!r} is not "
                                          f"supported (supported: {', '.join(by_strategy)})")
        scheme = by_strategy[strategy]
        block = tuple(weights.get("block_structure") or (128, 128))
        if group.get("output_activations"):
            raise QuantizationConfigError(f"quantization_config{where}.output_activations is not supported")
        return scheme, self._activation(group.get("input_activations"), scheme, block, where), block

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
