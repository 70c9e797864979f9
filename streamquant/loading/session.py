"""Strict, table-driven weight loading: checkpoint tensors -> parameters' weight loaders.

`WeightLoadSession` owns the per-load state (what was loaded, what each parameter received) and
nothing else keeps any. For every `(name, tensor)` it maps the name through the model's
`WeightMapping`, calls the target parameter's `weight_loader` and records the regions that loader
says it wrote. Strict by default: an unknown name, a tensor seen twice, a shape that does not fit,
a dtype no weight can come from, a NaN / Inf (`validate.py`) and a parameter left incomplete each
raise an error naming the tensor and the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from streamquant.loading.coverage import Coverage, DuplicateWriteError
from streamquant.loading.errors import (  # noqa: F401  (the errors' historical home: importable from here too)
    DuplicateWeightError,
    MissingWeightsError,
    NonFiniteWeightError,
    UnexpectedWeightError,
    WeightDtypeError,
    WeightLoadError,
)
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.materialize import StagingPool, release_
from streamquant.loading.parameters import WeightLoader
from streamquant.loading.validate import check_codes, check_tensor


def module_loadables(module: torch.nn.Module, quantized_source: bool = False) -> dict[str, torch.nn.Parameter]:
    """The parameters checkpoint tensors are written into for `module` itself (not its children).

    Its own parameters that have a `weight_loader`, except where its quant method keeps a
    checkpoint-format parameter of the same name in `module.checkpoint_params` (the fp8 methods:
    the loaders write a bf16 `weight` there, and `process_weights_after_loading` derives the fp8
    `weight` and `weight_scale` the module computes with; derived parameters have no loader).
    With `quantized_source=True` (fp8 codes and scales arrive, already quantized) a module with
    `quantized_loaders` takes them straight into its fp8 parameters instead (`module_loaders`).
    """
    own = {n: p for n, p in module.named_parameters(recurse=False) if hasattr(p, "weight_loader")}
    quantized = getattr(module, "quantized_loaders", None) or {}
    if quantized_source and quantized:
        own.update({name: getattr(module, name) for name in quantized})
    else:
        own.update(getattr(module, "checkpoint_params", None) or {})
    return own


def module_loaders(model: torch.nn.Module, quantized_source: bool) -> dict[str, WeightLoader]:
    """Full parameter name -> loader, for loadables whose loader is not their own `weight_loader`."""
    if not quantized_source:
        return {}
    return {f"{mod_name}.{name}" if mod_name else name: loader for mod_name, module in model.named_modules()
            for name, loader in (getattr(module, "quantized_loaders", None) or {}).items()}


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


class WeightLoadSession:
    """One pass of checkpoint tensors into `model`'s parameters."""

    def __init__(self, model: torch.nn.Module, mapping: WeightMapping, *, strict: bool = True,
                 check_finite: bool = True, quantized_source: bool = False):
        self.model = model
        self.quantized_source = quantized_source  # fp8 codes and scales arrive (`module_loadables`)
        self.loaders = module_loaders(model, quantized_source)
        self.mapping = mapping
        self.strict = strict
        self.check_finite = check_finite  # NaN / Inf in any tensor fails the load (`validate.check_tensor`)
        # checkpoint-format inputs of quant methods: their amax pass (which reads every element
        # anyway) refuses NaN / Inf, whatever check_finite says, so they are not read twice
        self.finite_checked_later = {id(p) for m in model.modules()
                                     for p in (getattr(m, "checkpoint_params", None) or {}).values()}
        # Tensor parallel: a rank that refuses a tensor's values still writes it and raises only at
        # `check_complete`, so it keeps taking part in its layers' collectives (quantized layers
        # all-reduce amax grids as they finish) and no other rank waits for it forever.
        tp = getattr(model, "tp", None)
        self.defer_value_errors = tp is not None and tp.size > 1
        self.value_error: WeightLoadError | None = None
        self.params = loadable_parameters(model, quantized_source)
        self.coverage = {name: Coverage(p.shape) for name, p in self.params.items()}
        self.loaded: set[str] = set()
        self.renamed: set[str] = set()  # loaded names that a prefix rename changed
        self.skipped: set[str] = set()
        self.unexpected: list[str] = []

    def load(self, name: str, tensor: torch.Tensor) -> str | None:
        """Load one checkpoint tensor; returns the parameter name it went into (None if skipped)."""
        if self.mapping.should_skip(name):
            self.skipped.add(name)
            return None
        if name in self.loaded:
            raise DuplicateWeightError(f"checkpoint tensor {name!r} arrived twice")
        param_name, kwargs = self.mapping.map(name)
        param = self.params.get(param_name)
        if param is None:
            if self.strict:
                raise UnexpectedWeightError(
                    f"checkpoint tensor {name!r} (shape {list(tensor.shape)}) maps to {param_name!r}, "
                    f"which is not a parameter of {type(self.model).__name__}"
                )
            self.unexpected.append(name)
            return None
        try:
            if param.dtype.itemsize == 1 and param.dtype.is_floating_point:
                check_codes(name, tensor, param.dtype, finite=self.check_finite)
            else:
                check_tensor(name, tensor, finite=self.check_finite and id(param) not in self.finite_checked_later)
        except WeightLoadError as e:
            if not self.defer_value_errors:
                raise
            self.value_error = self.value_error or e
        self.before_write(param_name)
        try:
            regions = self.loaders.get(param_name, getattr(param, "weight_loader", None))(param, tensor, **kwargs)
            for region in regions:
                self.coverage[param_name].add(region, name)
        except DuplicateWriteError as e:
            raise DuplicateWeightError(f"parameter {param_name!r}: {e}") from None
        except ValueError as e:
            raise WeightLoadError(
                f"checkpoint tensor {name!r} (shape {list(tensor.shape)}) does not fit parameter "
                f"{param_name!r} (shape {list(param.shape)}): {e}"
            ) from e
        self.loaded.add(name)
        if self.mapping.rename(name) != name:
            self.renamed.add(name)
        self.after_write(param_name)
        return param_name

    def before_write(self, param_name: str) -> None:
        """Hook: called before a loader writes into `param_name` (streaming materializes here)."""

    def after_write(self, param_name: str) -> None:
        """Hook: called after a loader wrote into `param_name` (streaming finishes layers here)."""

    def load_all(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for name, tensor in weights:
            self.load(name, tensor)
        return self.loaded

    def incomplete(self) -> dict[str, Coverage]:
        return {n: c for n, c in self.coverage.items() if not c.complete}

    def check_complete(self) -> None:
        """Raise a deferred value error, then `MissingWeightsError` naming every parameter not fully written."""
        if self.value_error is not None:
            raise self.value_error
        missing = self.incomplete()
        if not missing or not self.strict:
            return
        lines = []
        arrived = {self.mapping.rename(n) for n in self.loaded}
        show = self.mapping.undo_rename if self.renamed else (lambda n: n)  # name them as this checkpoint does
        for name, cov in sorted(missing.items()):
            experts = cov.shape[0] if cov.shape else None
            expected = self.mapping.checkpoint_names_for(name, num_experts=experts, undo_renames=False)
            absent = [show(n) for n in expected if n not in arrived]
            lines.append(f"  {name}: {cov.summary()}; missing checkpoint tensors: {', '.join(absent) or '(partial write)'}")
        raise MissingWeightsError(
            f"{len(missing)} parameter(s) of {type(self.model).__name__} were not fully loaded:\n" + "\n".join(lines)
        )


def load_weights(
    model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMapping, *, strict: bool = True,
    check_finite: bool = True,
) -> set[str]:
    """Load every tensor of `weights` into `model`; returns the checkpoint names loaded."""
    session = WeightLoadSession(model, mapping, strict=strict, check_finite=check_finite)
    loaded = session.load_all(weights)
    session.check_complete()
    return loaded


def release_checkpoint_params(module: torch.nn.Module, pool: StagingPool | None = None) -> None:
    """Drop the storage of `module`'s checkpoint-format parameters (back to `meta`, or into `pool`)."""
    for param in (getattr(module, "checkpoint_params", None) or {}).values():
        release_(param, pool)


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Let every layer's quant method finish its weights (repack, quantize, ...), then release the
    layer's checkpoint-format copies."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
            release_checkpoint_params(module)
