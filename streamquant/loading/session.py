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

from streamquant.loading.contract import loadable_parameters, module_loaders, staged_params
from streamquant.loading.coverage import Coverage, DuplicateWriteError
from streamquant.loading.errors import (
    DuplicateWeightError,
    MissingWeightsError,
    UnexpectedWeightError,
    WeightLoadError,
)
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.validate import check_codes, check_tensor, is_code_dtype


class WeightLoadSession:
    """One pass of checkpoint tensors into `model`'s parameters."""

    def __init__(self, model: torch.nn.Module, mapping: WeightMapping, *, strict: bool = True,
                 check_finite: bool = True, quantized_source: bool = False):
        self.model = model
        self.quantized_source = quantized_source  # codes and scales arrive as they are (`contract.module_loadables`)
        self.loaders = module_loaders(model, quantized_source)
        self.mapping = mapping
        self.strict = strict
        self.check_finite = check_finite  # NaN / Inf in any tensor fails the load (`validate.check_tensor`)
        # checkpoint-format inputs of quant methods: their amax pass (which reads every element
        # anyway) refuses NaN / Inf, whatever check_finite says, so they are not read twice
        self.finite_checked_later = {id(p) for m in model.modules() for p in staged_params(m).values()}
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
        if is_code_dtype(param.dtype):
            check_codes(name, tensor, param.dtype, finite=self.check_finite)
        else:
            check_tensor(name, tensor, finite=self.check_finite and id(param) not in self.finite_checked_later)
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
        """Raise `MissingWeightsError` naming every parameter not fully written."""
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
