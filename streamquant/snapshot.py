"""`WeightSnapshot`: one flat buffer holding a copy of every tensor a reload writes, to restore.

An atomic update (`update.begin_update(atomic=True)`, `reload_weights(atomic=True)`) saves the
model's inference tensors (`contract.inference_tensors`: codes, scales, unquantized weights) here
before anything is written, and restores them byte for byte if the update fails. `Reloader` keeps
one between refits so the copy is not allocated and page-faulted every step.
"""

from __future__ import annotations

import torch

from streamquant.loading.contract import inference_tensors
from streamquant.loading.materialize import align_up, byte_view


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter with storage."""
    return next(t.device for t in model.parameters() if not t.is_meta)


class WeightSnapshot:
    """One flat buffer holding a copy of every tensor a reload writes (`inference_tensors`).

    `device` defaults to the model's; "cpu" for a CUDA model keeps the copy in pinned host memory
    (no device memory, slower copies)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None, *, save: bool = True):
        tensors = inference_tensors(model)
        on = model_device(model)
        device = torch.device(device) if device is not None else on
        offsets, total = {}, 0
        for name, t in tensors.items():
            offsets[name] = total
            total += align_up(t.numel() * t.element_size())
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device,
                                  pin_memory=device.type == "cpu" and on.type == "cuda")
        self.views = {n: byte_view(self.buffer, offsets[n], t.shape, t.dtype) for n, t in tensors.items()}
        if save:
            self.save(model)

    def save(self, model: torch.nn.Module) -> None:
        live = inference_tensors(model)
        if live.keys() != self.views.keys():
            raise ValueError("the model's tensors changed since this snapshot was made")
        with torch.no_grad():
            for name, t in live.items():
                self.views[name].copy_(t)

    def restore(self, model: torch.nn.Module) -> None:
        live = inference_tensors(model)
        with torch.no_grad():
            for name, saved in self.views.items():
                live[name].copy_(saved)
