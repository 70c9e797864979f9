"""Streaming load: a layer's checkpoint-format weights exist only while the layer is in flight.

The model is built on `meta`. The first tensor written into a module (the direct owner of a
parameter) materializes all of that module's meta parameters on the target device; when every
element of every parameter of the module has been written (exact coverage, see `coverage.py`),
the module's quant method runs `process_weights_after_loading`, which may quantize and release
the high-precision copy at once. Tied parameters belong to every module that holds them and
complete together.

On failure (an exception, or a strict check at the end) every module still in flight is released,
so a failed load gives its memory back. Known limitation: all tensor-parallel ranks must see the
checkpoint in the same order, because finishing a layer may run a collective (amax reduction).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from streamquant.loading.loader import WeightLoadSession
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.materialize import materialize_, release_


class StreamingLoadSession(WeightLoadSession):
    """`WeightLoadSession` that materializes modules at first write and finishes them at last write."""

    def __init__(self, model: torch.nn.Module, mapping: WeightMapping, *, device: torch.device | str,
                 strict: bool = True, fill: float | None = None):
        super().__init__(model, mapping, strict=strict)
        self.device = torch.device(device)
        self.fill = fill
        name_of = {id(p): n for n, p in self.params.items()}
        self.members: dict[str, list[str]] = {}
        self.owners: dict[str, list[str]] = {}
        self.modules = dict(model.named_modules())
        for mod_name, module in self.modules.items():
            names = [name_of[id(p)] for _, p in module.named_parameters(recurse=False)]
            if names:
                self.members[mod_name] = names
                for n in names:
                    self.owners.setdefault(n, []).append(mod_name)
        self.in_flight: set[str] = set()
        self.finished: list[str] = []

    def before_write(self, param_name: str) -> None:
        for mod_name in self.owners[param_name]:
            if mod_name not in self.in_flight and mod_name not in self.finished:
                self.in_flight.add(mod_name)
                for n in self.members[mod_name]:
                    materialize_(self.params[n], self.device, self.fill)

    def after_write(self, param_name: str) -> None:
        for mod_name in self.owners[param_name]:
            if mod_name in self.in_flight and all(self.coverage[n].complete for n in self.members[mod_name]):
                self.finish(mod_name)

    def finish(self, mod_name: str) -> None:
        """Run the module's quant method on its complete weights."""
        self.in_flight.discard(mod_name)
        method = getattr(self.modules[mod_name], "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(self.modules[mod_name])
        self.finished.append(mod_name)

    def abort(self) -> None:
        """Release every module still in flight (after a failure)."""
        for mod_name in sorted(self.in_flight):
            for n in self.members[mod_name]:
                release_(self.params[n])
        self.in_flight.clear()


def stream_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMapping, *,
                   device: torch.device | str, strict: bool = True, fill: float | None = None) -> StreamingLoadSession:
    """Stream `weights` into a meta-built `model`; returns the finished session (loaded names, order of layers)."""
    session = StreamingLoadSession(model, mapping, device=device, strict=strict, fill=fill)
    try:
        session.load_all(weights)
        session.check_complete()
    except BaseException:
        session.abort()
        raise
    return session
