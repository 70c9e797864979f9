"""The Hugging Face / DeepSeek "fp8" format (transformers' FineGrainedFP8, vLLM's fp8): read and write.

Write (block scales only: the format has no per-channel layout, and its per-tensor variant is named
differently by transformers and vLLM): `quantization_config = {"quant_method": "fp8",
"activation_scheme": "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [HF module
names kept in high precision]}`; per quantized linear `X`: `X.weight` F8_E4M3 [out, in] and
`X.weight_scale_inv` F32, the ceil-division block grid. Despite its name `weight_scale_inv` is the
dequantization multiplier (`W ~= weight.float() * weight_scale_inv` per tile).

Read: `quant_method: "fp8"` with `weight_block_size` (the block size comes from the config, never from
the grid's shape) and dynamic activations; `weight_block_size` null means per-tensor scales (a [1, 1]
or 0-d `weight_scale_inv`). `fmt` / `scale_fmt` other than e4m3 / float, and static activations
(`activation_scale`), are refused naming the field. `ignored_layers` is read as an alias of
`modules_to_not_convert`; other keys are tolerated.
"""

from __future__ import annotations

import torch

from streamquant.formats.base import (
    FORMULA_KEY,
    QuantizationConfigError,
    QuantizedCheckpoint,
    QuantizedWeight,
    check_fp8_e4m3,
    recorded_formula,
    sibling_name,
)
from streamquant.quant.scaled.config import ActivationScheme, ScaledConfig, ScaledScheme
from streamquant.quant.math.formula import Formula

NAME = "hf-fp8"


class HfFp8Format:
    name = NAME
    scale_suffix = "weight_scale_inv"

    def write_config(self, config: ScaledConfig, ignore: list[str]) -> dict:
        if config.scheme is not ScaledScheme.FP8_BLOCK:
            raise QuantizationConfigError(f"format {NAME!r} stores block scales only; use --quantization fp8-block, "
                                          f"or --format compressed-tensors for {config.scheme.value!r}")
        if config.activation_scheme is not ActivationScheme.DYNAMIC:
            raise QuantizationConfigError(f"format {NAME!r} has no weight-only mode; use --format compressed-tensors "
                                          "for --activation-scheme none")
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(config.block_size),
                "modules_to_not_convert": list(ignore), FORMULA_KEY: config.formula.value}

    def disk_tensors(self, name: str, weight: QuantizedWeight, config: ScaledConfig,
                     weight_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        return [(name, weight.codes), (sibling_name(name, self.scale_suffix), weight.scales)]

    def read_config(self, config: dict) -> QuantizedCheckpoint:
        activation = config.get("activation_scheme", "dynamic")
        if activation != "dynamic":
            raise QuantizationConfigError(f"quantization_config.activation_scheme = {activation!r} (static "
                                          "activation scales) is not supported; dynamic is")
        check_fp8_e4m3(config.get("fmt"), ".fmt")
        if config.get("scale_fmt") not in (None, "float"):
            raise QuantizationConfigError(f"quantization_config.scale_fmt = {config['scale_fmt']!r} is not supported "
                                          "(float32 scales are)")
        block = config.get("weight_block_size")
        ignore = tuple(config.get("modules_to_not_convert") or config.get("ignored_layers") or ())
        formula = recorded_formula(config, Formula.TRANSFORMERS)
        if block is None:
            return QuantizedCheckpoint(NAME, ScaledScheme.FP8, ActivationScheme.DYNAMIC, formula, self.scale_suffix,
                                       ignore=ignore)
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise QuantizationConfigError(f"quantization_config.weight_block_size = {block!r}: expected two positive ints")
        return QuantizedCheckpoint(NAME, ScaledScheme.FP8_BLOCK, ActivationScheme.DYNAMIC, formula, self.scale_suffix,
                                   tuple(block), ignore)


HF_FP8 = HfFp8Format()
