"""Which checkpoint tensors an offline quantization quantizes, decided by the online path itself.

`QuantizePlan` builds streamquant's model for the checkpoint's config on the `meta` device (no
memory, no weights) with the same quant config an online `load_model(quantization=...)` would make,
and asks it, for each checkpoint tensor: which parameter does its name map to, and does that
parameter's layer quantize it (its method stages it: `loading.contract.staged_params`)? So the offline and
online paths keep the same weights in high precision (embeddings, LM head, norms, MoE routers,
`ignore` matches), by construction. A tensor that maps to no parameter (and is not one the model
skips, such as `rotary_emb.inv_freq`) is refused, as a strict load refuses it.

`QuantizedTensor.outputs` gives a quantized tensor's output names, dtypes and shapes (codes, scales
and the rest in the format's layout: `CheckpointFormat.disk_tensors` run on `meta` tensors) without
computing anything, so shards can be planned from headers.
`expand` splits the fused MoE tensors transformers 5 holds in memory (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], what a trainer's `named_parameters()` yields) into the
per-expert projections of the on-disk layout, so each gets its own scales under its own name.
Limitation: a dense checkpoint tensor that fuses several logical weights (a fused `qkv_proj`) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.config import UnsupportedQuantizationError, check_ignore_patterns, make_quant_config
from streamquant.checkpoint.writer import TensorSpec
from streamquant.formats import CheckpointFormat, QuantizedWeight
from streamquant.loading.contract import staged_params
from streamquant.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled.config import ScaledConfig, ScaledScheme
from streamquant.quant.scaled.weights import ScaledWeightSpec
from streamquant.quant.math.granularity import grid_shape, tile_shape


# The schemes the on-disk formats store (compressed-tensors: all five; hf-fp8: fp8-block).
OFFLINE_SCHEMES = (ScaledScheme.FP8, ScaledScheme.FP8_CHANNEL, ScaledScheme.FP8_BLOCK, ScaledScheme.INT8,
                   ScaledScheme.INT4)


@dataclass(frozen=True)
class QuantizedTensor:
    """How one checkpoint tensor is quantized (the layer's spec, the plan's config), and what it becomes on disk."""

    name: str
    spec: ScaledWeightSpec
    config: ScaledConfig

    def outputs(self, shape: tuple[int, ...], dtype: torch.dtype, fmt: CheckpointFormat) -> list[TensorSpec]:
        """The format's tensors for a `shape` weight quantized from `dtype`: names, dtypes, shapes."""
        grid = grid_shape(tile_shape(self.spec.granularity, tuple(shape[-2:])), tuple(shape[-2:]))
        scales = torch.empty(tuple(shape[:-2]) + grid, dtype=torch.float32, device="meta")
        zeros = torch.empty(scales.shape, dtype=torch.int8, device="meta") if self.spec.fmt.zero_point else None
        codes = torch.empty(tuple(shape), dtype=self.spec.fmt.dtype, device="meta")
        return [TensorSpec(name, t.dtype, tuple(t.shape))
                for name, t in fmt.disk_tensors(self.name, QuantizedWeight(codes, scales, zeros), self.config, dtype)]


class QuantizePlan:
    """The per-tensor decisions of an offline quantization (see the module docstring)."""

    def __init__(self, hf_config, quantization: str, fmt: CheckpointFormat, dtype: torch.dtype, **options):
        self.config: ScaledConfig = make_quant_config(quantization, options)
        if not isinstance(self.config, ScaledConfig) or self.config.scheme not in OFFLINE_SCHEMES:
            raise UnsupportedQuantizationError(
                f"quantization={quantization!r} is online only (load_model, reload_weights): the on-disk formats and "
                f"trainer-side quantization write {', '.join(s.value for s in OFFLINE_SCHEMES)}")
        self.fmt = fmt
        self.dtype = dtype
        with torch.device("meta"):
            self.model = get_model_class(hf_config)(hf_config, tp=TPContext(), quant_config=self.config,
                                                    params_dtype=dtype)
        check_ignore_patterns(self.model, self.config)  # a pattern that matches no layer is a typo
        self.modules = dict(self.model.named_modules())
        self.mapping = self.model.weight_mapping

    def _target(self, name: str) -> tuple[torch.nn.Module | None, str, dict]:
        param_name, kwargs = self.mapping.map(name)
        mod_name, _, leaf = param_name.rpartition(".")
        return self.modules.get(mod_name), leaf, kwargs

    def rule(self, name: str) -> QuantizedTensor | None:
        """How `name` is quantized, or None when it is written as it is (cast to the plan's dtype)."""
        if self.mapping.should_skip(name):
            return None
        module, leaf, kwargs = self._target(name)
        if module is None or (leaf not in dict(module.named_parameters(recurse=False))
                              and leaf not in staged_params(module)):
            raise ValueError(f"checkpoint tensor {name!r} maps to {self.mapping.map(name)[0]!r}, which is not a "
                             f"parameter of {type(self.model).__name__}")
        if leaf not in staged_params(module):
            return None
        if kwargs.get("shard_id") in (None, "w13") and len(module.logical_shards[leaf]) > 1:
            raise ValueError(f"checkpoint tensor {name!r} holds several fused weights "
                             f"({', '.join(s.label for s in module.logical_shards[leaf])}); offline quantization "
                             "needs them as separate tensors (each gets its own scales)")
        return QuantizedTensor(name, module.quant_method.spec, self.config)

    def expand(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """`(name, tensor)`, or for a fused MoE tensor its per-expert projections (see the module doc)."""
        if self.mapping.should_skip(name):
            return [(name, tensor)]
        _, _, kwargs = self._target(name)
        if kwargs.get("expert_id") is not None or kwargs.get("shard_id") not in ("w13", "w2") or tensor.dim() != 3:
            return [(name, tensor)]
        stem = name.rpartition("experts.")[0] + "experts."
        if kwargs["shard_id"] == "w2":
            return [(f"{stem}{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
        gate, up = tensor.chunk(2, dim=1)
        return [(f"{stem}{e}.{proj}.weight", part[e]) for e in range(tensor.shape[0])
                for proj, part in (("gate_proj", gate), ("up_proj", up))]

    def high_precision_modules(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """HF module names of 2-D weights written unquantized, input embeddings aside: the format's ignore list."""
        out = []
        for name, shape in shapes.items():
            if len(shape) != 2 or not name.endswith(".weight") or self.rule(name) is not None:
                continue
            module, _, _ = self._target(name)
            if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
                continue
            out.append(name[: -len(".weight")])
        return sorted(out)
