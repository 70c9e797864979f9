"""The contract between a layer's quant method and the load session: which parameters take checkpoint
tensors, which the method derives from them, and what the session releases after processing.

A layer that delegates its weights to a quant method (`layer.quant_method`, vLLM's word) satisfies
`QuantizedLayer`; its method satisfies `WeightMethod`. The load session asks the method, never the
layer's attributes:
  - `checkpoint_params(layer)`: checkpoint-format parameters (bf16 staging) the loaders write IN
    PLACE OF the layer's own parameter of the same name. The session gives them memory at the
    layer's first tensor and releases them (`release_staging`) right after
    `process_weights_after_loading`. Empty for a method whose layer computes with what it loads.
  - `quantized_loaders(layer)`: for a pre-quantized source (codes and scales arrive as they are),
    the layer's parameters, by name, that take them, each with its loader. Empty when the method
    cannot take pre-quantized tensors.
  - `derived_tensors(layer)`: the tensors the method computes from its checkpoint params (codes,
    scales, a torchao weight's inner tensors), by name under the layer. The session gives those
    still on `meta` memory on the target before `process_weights_after_loading` (the method only
    writes into them); a reload writes them in place and an atomic reload snapshots them.
  - `process_weights_after_loading(layer)`: runs once the layer's loadables are complete. It may
    raise `NonFiniteWeightError(param=, index=)`; the session restates it naming the checkpoint
    tensor that wrote the element.
Every other parameter of a layer (and every parameter of a module without a quant method) with a
`weight_loader` takes checkpoint tensors directly.

This module is the only place the loader looks a layer's method up; quant implements the protocol
and never imports the session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from streamquant.loading.materialize import StagingPool, release_
from streamquant.loading.parameters import WeightLoader


@runtime_checkable
class WeightMethod(Protocol):
    """What a quant method tells the load session about one layer (see the module doc)."""

    def checkpoint_params(self, layer: torch.nn.Module) -> Mapping[str, torch.nn.Parameter]: ...

    def quantized_loaders(self, layer: torch.nn.Module) -> Mapping[str, WeightLoader]: ...

    def derived_tensors(self, layer: torch.nn.Module) -> Mapping[str, torch.Tensor]: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...


@runtime_checkable
class QuantizedLayer(Protocol):
    """A layer whose weights its quant method owns."""

    quant_method: WeightMethod


# What `WeightMethod` asks of a method, checked by name: `isinstance` against a runtime-checkable
# Protocol costs ~20 us, and a load or a refit asks for every module's method several times.
WEIGHT_METHOD_NAMES = ("checkpoint_params", "quantized_loaders", "derived_tensors", "process_weights_after_loading")


def method_of(module: torch.nn.Module) -> WeightMethod | None:
    """`module`'s quant method (a `QuantizedLayer`'s), or None for a module that loads its parameters
    itself (norms, ...)."""
    method = getattr(module, "quant_method", None)
    if method is None:
        return None
    if not all(callable(getattr(method, name, None)) for name in WEIGHT_METHOD_NAMES):
        raise TypeError(f"{type(module).__name__}.quant_method ({type(method).__name__}) does not implement "
                        f"WeightMethod ({', '.join(WEIGHT_METHOD_NAMES)})")
    return method


def staged_params(module: torch.nn.Module) -> Mapping[str, torch.nn.Parameter]:
    """The checkpoint-format parameters `module`'s method stages (empty without a method)."""
    method = method_of(module)
    return method.checkpoint_params(module) if method is not None else {}


def quantized_loaders(module: torch.nn.Module) -> Mapping[str, WeightLoader]:
    method = method_of(module)
    return method.quantized_loaders(module) if method is not None else {}


def derived_tensors(module: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    method = method_of(module)
    return method.derived_tensors(module) if method is not None else {}


def module_loadables(module: torch.nn.Module, quantized_source: bool = False) -> dict[str, torch.nn.Parameter]:
    """The parameters checkpoint tensors are written into for `module` itself (not its children):
    its own parameters with a `weight_loader`, except where its method stages a checkpoint-format
    parameter of the same name, or (`quantized_source=True`) where it takes codes and scales as they are."""
    own = {n: p for n, p in module.named_parameters(recurse=False) if hasattr(p, "weight_loader")}
    quantized = quantized_loaders(module)
    if quantized_source and quantized:
        own.update({name: module.get_parameter(name) for name in quantized})
    else:
        own.update(staged_params(module))
    return own


def module_loaders(model: torch.nn.Module, quantized_source: bool) -> dict[str, WeightLoader]:
    """Full parameter name -> loader, for loadables whose loader is not their own `weight_loader`."""
    if not quantized_source:
        return {}
    return {f"{mod_name}.{name}" if mod_name else name: loader for mod_name, module in model.named_modules()
            for name, loader in quantized_loaders(module).items()}


def loadable_parameters(model: torch.nn.Module, quantized_source: bool = False) -> dict[str, torch.nn.Parameter]:
    """Every parameter a checkpoint writes, by full name; a tied parameter under its first name only."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, param in module_loadables(module, quantized_source).items():
            if id(param) not in seen:
                seen.add(id(param))
                out[f"{mod_name}.{name}" if mod_name else name] = param
    return out


def inference_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a reload writes, by name: loadable parameters with storage, and the tensors methods
    derive from checkpoint-format weights (codes and scales, a torchao weight's inner tensors)."""
    out: dict[str, torch.Tensor] = {n: p for n, p in loadable_parameters(model).items() if not p.is_meta}
    for mod_name, module in model.named_modules():
        for name, tensor in derived_tensors(module).items():
            out[f"{mod_name}.{name}" if mod_name else name] = tensor
    return out


def release_staging(module: torch.nn.Module, pool: StagingPool | None = None) -> None:
    """Drop the storage of `module`'s checkpoint-format parameters (back to `meta`, or into `pool`)."""
    for param in staged_params(module).values():
        release_(param, pool)


def staging_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s checkpoint-format parameters (materialized or not)."""
    return sum(p.numel() * p.element_size() for p in staged_params(module).values())
