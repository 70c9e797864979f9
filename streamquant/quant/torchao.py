"""torchao configs as online schemes: any `AOBaseConfig` that applies to `nn.Linear`, while streaming.

`load_model(path, quantization=<torchao config>)`, or a preset name (`TORCHAO_PRESETS`, also the
CLI's `--quantization torchao:...`). Each linear layer keeps its checkpoint-format weight in
`layer.checkpoint_params["weight"]` (the loaders' target, as the fp8 methods do); the moment the
layer's last element arrives, `torchao.quantization.quantize_` runs on a throwaway `nn.Linear` over
that weight and the layer's `weight` becomes torchao's tensor subclass (`Int8Tensor`,
`IntxUnpackedToInt8Tensor`, `Float8Tensor`, ...); the high-precision copy is released. `apply` is
`F.linear`, dispatched by torchao.

What the config sees:
  - Fused layers: one fused weight per rank (q, k, v stacked; gate and up stacked). Configs whose
    scales are per output row or per group along the input dimension (every preset) give each row
    what the separate projections would get; a per-tensor config would share one scale across q, k, v.
  - Tensor parallelism: the config is applied to each rank's shard. Column-parallel shards (rows)
    are bitwise the TP=1 rows for per-row / per-group configs. Row-parallel shards split the input
    dimension: a per-row scale becomes a per-rank half-row scale (not TP=1's); a per-group config
    equals TP=1 when the shard boundary falls on a group boundary (`in / tp % group == 0`, else
    torchao refuses the shape). Tested in `tests/quant/test_torchao.py`.
  - MoE experts stay in the model dtype (torchao configs apply to `nn.Linear`); embeddings, the LM
    head and norms too, and every layer an `ignore` regex matches.
  - Float32 partial sums (`TPContext(reduce_dtype=torch.float32)`): torchao's matmul output is in the
    model dtype, widened after (one rounding more than the native schemes).

Reload in place: the new bf16 weight is quantized by the same config into a fresh tensor whose
inner tensors (`__tensor_flatten__`: qdata, scale, zero_point, ...) are copied into the live
weight's own (same storage, same addresses), after checking that class, inner names, shapes, dtypes
and metadata agree; so a reload is bitwise a cold load of the same weights, and no metadata or
loader needs restoring by hand (as vLLM's online path does).

torchao is optional (`pip install torchao`, or the `torchao` extra): without it a torchao scheme fails
naming what to install. Tested with torchao 0.18 on CPU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from streamquant.loading.errors import NonFiniteWeightError
from streamquant.loading.parameters import WeightLoader
from streamquant.loading.validate import is_finite
from streamquant.parallel.context import all_reduce
from streamquant.quant.base import EmbeddingMethod, LinearMethod, MoEMethod, check_ignore
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.unquantized import (UnquantizedEmbeddingMethod, UnquantizedFusedMoEMethod,
                                          UnquantizedLinearMethod, linear_weight)

PREFIX = "torchao:"
INSTALL_HINT = "pip install torchao (or pip install 'streamquant[torchao]')"


def _torchao_quantization():
    try:
        import torchao.quantization as quantization
    except ImportError as e:
        raise ImportError(f"a torchao scheme needs the torchao package, which is not importable ({e}); "
                          f"{INSTALL_HINT}") from None
    return quantization


def _int4(config_name: str, granularity_key: str) -> Callable[[], Any]:
    def make():
        q = _torchao_quantization()
        from torchao.quantization.granularity import PerGroup

        return getattr(q, config_name)(weight_dtype=torch.int4, **{granularity_key: PerGroup(INT4_GROUP)})
    return make


def _plain(config_name: str) -> Callable[[], Any]:
    return lambda: getattr(_torchao_quantization(), config_name)()


INT4_GROUP = 32  # torchao group size of the int4 presets (a divisor of every tested input dimension)
# Preset name -> a function making its torchao config (called only when used: torchao stays optional).
TORCHAO_PRESETS = MappingProxyType({
    f"{PREFIX}int8-weight-only": _plain("Int8WeightOnlyConfig"),
    f"{PREFIX}int8-dynamic": _plain("Int8DynamicActivationInt8WeightConfig"),
    f"{PREFIX}float8-weight-only": _plain("Float8WeightOnlyConfig"),
    f"{PREFIX}int4-weight-only": _int4("IntxWeightOnlyConfig", "granularity"),
    f"{PREFIX}int8-dynamic-int4": _int4("Int8DynamicActivationIntxWeightConfig", "weight_granularity"),
})


def is_torchao_scheme(quantization: Any) -> bool:
    """A preset name, or an object that is a torchao `AOBaseConfig` (checked without importing torchao
    unless the object comes from it)."""
    if isinstance(quantization, str):
        return quantization.startswith(PREFIX)
    return type(quantization).__module__.startswith("torchao.")


def resolve(quantization: Any) -> tuple[Any, str]:
    """(torchao config, name) for a preset name or a config object; clear errors otherwise."""
    if isinstance(quantization, str):
        if quantization not in TORCHAO_PRESETS:
            raise ValueError(f"unknown torchao preset {quantization!r}; presets: {', '.join(TORCHAO_PRESETS)} "
                             "(or pass a torchao AOBaseConfig object as quantization=)")
        return TORCHAO_PRESETS[quantization](), quantization
    from torchao.core.config import AOBaseConfig

    if not isinstance(quantization, AOBaseConfig):
        raise TypeError(f"quantization={quantization!r} is not a torchao AOBaseConfig")
    return quantization, f"{PREFIX}{type(quantization).__name__}"


@dataclass(frozen=True)
class TorchaoConfig:
    """A torchao config applied to every linear layer not `ignore`d; `name` is what the load report says."""

    config: Any
    name: str
    ignore: tuple[str, ...] = ()
    error_log: QuantErrorLog | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", check_ignore(self.ignore))

    def is_ignored(self, prefix: str) -> bool:
        return any(re.search(pattern, prefix) for pattern in self.ignore)

    def get_linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod() if self.is_ignored(prefix) else TorchaoLinearMethod(self.config, self.error_log)

    def get_moe_method(self, prefix: str) -> MoEMethod:
        return UnquantizedFusedMoEMethod()

    def get_embedding_method(self, prefix: str) -> EmbeddingMethod:
        return UnquantizedEmbeddingMethod()


def quantized_weight(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """torchao's quantized tensor of a 2-D weight under `config` (`quantize_` on a throwaway nn.Linear)."""
    quantization = _torchao_quantization()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantization.quantize_(linear, config)
    return linear.weight.detach()


def inner_tensors(t: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The plain tensors inside a tensor subclass, by dotted name (nested subclasses flattened)."""
    if not hasattr(t, "__tensor_flatten__"):
        return {prefix: t}
    names, _ = t.__tensor_flatten__()
    out = {}
    for name in names:
        out.update(inner_tensors(getattr(t, name), f"{prefix}.{name}" if prefix else name))
    return out


def copy_inner_(live: torch.Tensor, fresh: torch.Tensor, where: str) -> None:
    """Copy `fresh`'s inner tensors into `live`'s, in place, after checking that they are laid out alike."""
    live_meta = (type(live), *(live.__tensor_flatten__() if hasattr(live, "__tensor_flatten__") else ((), None)))
    fresh_meta = (type(fresh), *(fresh.__tensor_flatten__() if hasattr(fresh, "__tensor_flatten__") else ((), None)))
    if live_meta != fresh_meta:
        raise RuntimeError(f"{where}: the new weight quantizes to {fresh_meta}, the live one is {live_meta}; "
                           "cannot update it in place")
    targets, sources = inner_tensors(live), inner_tensors(fresh)
    for name, target in targets.items():
        source = sources[name]
        if target.shape != source.shape or target.dtype != source.dtype:
            raise RuntimeError(f"{where}: inner tensor {name!r} is {source.dtype} {tuple(source.shape)}, the live "
                               f"one {target.dtype} {tuple(target.shape)}")
    for name, target in targets.items():
        target.copy_(sources[name])


class TorchaoLinearMethod:
    """A torchao config on one linear layer (see the module doc); one instance per layer."""

    def __init__(self, config: Any, error_log: QuantErrorLog | None = None):
        _torchao_quantization()  # fail at model build, naming what to install, not mid-load
        self.config = config
        self.error_log = error_log

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, tp, weight_loader) -> None:
        checkpoint_weight = linear_weight(output_partition_sizes, input_size_per_partition, params_dtype, tp,
                                          weight_loader)
        layer.checkpoint_params = {**(getattr(layer, "checkpoint_params", None) or {}), "weight": checkpoint_weight}
        self.tp = tp

    def _check_finite(self, layer, w: torch.Tensor) -> None:
        """Raise on NaN / Inf on every rank (a flag all-reduced at TP > 1, so no rank waits alone)."""
        bad = torch.tensor([0.0 if is_finite(w) else 1.0], device=w.device)
        if self.tp.size > 1:
            all_reduce(bad, self.tp, torch.distributed.ReduceOp.MAX)
        if bool(bad.item()):
            where = f"layer {getattr(layer, 'prefix', '')!r}, parameter 'weight'"
            if is_finite(w):
                raise NonFiniteWeightError(f"{where}: another tensor-parallel rank's shard holds NaN or Inf",
                                           param="weight")
            index = tuple(int(i) for i in (~torch.isfinite(w)).nonzero()[0])
            raise NonFiniteWeightError(f"{where} holds NaN or Inf (element {list(index)}); refusing to quantize it",
                                       param="weight", index=index)

    @torch.no_grad()
    def process_weights_after_loading(self, layer) -> None:
        slot = layer.checkpoint_params["weight"]
        if slot.is_meta:
            return
        w = slot.detach()
        self._check_finite(layer, w)
        try:
            fresh = quantized_weight(w, self.config)
        except (AssertionError, ValueError, RuntimeError, NotImplementedError) as e:
            raise ValueError(f"layer {getattr(layer, 'prefix', '')!r}: torchao {type(self.config).__name__} cannot quantize "
                             f"this rank's weight shard of shape {list(w.shape)}: {e}") from e
        live = layer._parameters.get("weight")
        if live is None:
            layer.register_parameter("weight", torch.nn.Parameter(fresh, requires_grad=False))
        else:
            copy_inner_(live, fresh, f"layer {getattr(layer, 'prefix', '')!r}")
        if self.error_log is not None:
            start = time.perf_counter()
            signal = w.double().square().sum()
            noise = (fresh.dequantize().double() - w.double()).square().sum()
            sums = all_reduce(torch.stack([signal, noise]), self.tp).cpu()
            self.error_log.record(f"{getattr(layer, 'prefix', '')}.weight", float(sums[0]), float(sums[1]))
            self.error_log.seconds += time.perf_counter() - start

    def checkpoint_params(self, layer) -> dict[str, torch.nn.Parameter]:
        return layer.checkpoint_params

    def quantized_loaders(self, layer) -> dict[str, WeightLoader]:
        return {}  # a torchao weight is made from high-precision weights only

    def derived_tensors(self, layer) -> dict[str, torch.Tensor]:
        """The tensors a reload writes, by name under the layer: the torchao weight's inner tensors."""
        live = layer._parameters.get("weight")
        return {} if live is None else {f"weight.{n}": t for n, t in inner_tensors(live).items()}

    def apply(self, layer, x, bias=None, out_dtype=None):
        weight = layer._parameters.get("weight")
        if weight is None:
            raise RuntimeError(f"layer {getattr(layer, 'prefix', '')!r} has no torchao weight: its checkpoint "
                               "weights were never completely loaded (a strict=False load that missed some?)")
        if out_dtype is None or out_dtype == x.dtype:
            return F.linear(x, weight, bias)
        y = F.linear(x, weight).to(out_dtype)
        return y if bias is None else y.add_(bias.to(out_dtype))
