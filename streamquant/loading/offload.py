"""CPU offload before quantization: checkpoint-format weights staged in host memory, only fp8 on the target.

With an `OffloadPlan` the streaming session gives every layer's checkpoint-format (bf16) staging
host memory (pinned when the target is CUDA, so copies run at full bus speed) instead of target
memory. When the layer is complete it is quantized either
  - `quantize_on="device"`: its staging is copied to one reusable buffer on the target, quantized
    there, and that buffer returns to the target pool (the target holds at most the layers being
    quantized, one at a time); or
  - `quantize_on="cpu"`: quantized on the host into host buffers, and only the fp8 codes and
    scales are copied into the layer's target tensors (the target never holds a bf16 weight).
Both give bitwise the codes of a load without offload (the same fp32 formula on every device;
tested). The layer's fp8 tensors keep their storage on the target throughout (a reload writes the
same addresses). `DEFAULT_QUANTIZE_ON` and its reason are in the module constant's comment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from streamquant.loading.materialize import StagingPool, release_, swap_storage

QUANTIZE_ON = ("device", "cpu")
# "device": the bf16 layer crosses the bus once (pinned, ~25-50 GB/s) and the GPU quantizes at
# hundreds of GB/s; "cpu" quantizes at 1.6-2.8 GB/s per 2 cores (measured, benchmarks/peak_memory.py)
# and sends half the bytes. The device path is the faster one wherever one bf16 layer fits next to
# the model; "cpu" is for when even that does not fit.
DEFAULT_QUANTIZE_ON = "device"


@dataclass(frozen=True)
class OffloadPlan:
    """Where staging lives (host) and where a complete layer is quantized."""

    quantize_on: str = DEFAULT_QUANTIZE_ON

    def __post_init__(self) -> None:
        if self.quantize_on not in QUANTIZE_ON:
            raise ValueError(f"quantize_on must be one of {', '.join(QUANTIZE_ON)}, got {self.quantize_on!r}")


def host_device() -> torch.device:
    return torch.device("cpu")


@contextmanager
def quantize_placement(staged: list[torch.nn.Parameter], outputs: list[torch.nn.Parameter], plan: OffloadPlan,
                       target: torch.device, host_pool: StagingPool, target_pool: StagingPool) -> Iterator[None]:
    """Around `process_weights_after_loading` of an offloaded layer: `staged`, its checkpoint-format
    parameters (on the host), `outputs`, what its method derives from them (on the target)."""
    if plan.quantize_on == "device":
        for param in staged:
            if not param.is_meta:
                data = target_pool.take(param.shape, param.dtype, target)
                data.copy_(param)  # blocking: the host buffer goes back to the pool right after
                host_pool.give(swap_storage(param, data).detach())
        try:
            yield
        finally:
            for param in staged:
                release_(param, target_pool)
        return
    held = []  # (parameter, tensor holding its target storage)
    try:
        for param in outputs:  # on the target (the session gave them memory): host buffers stand in
            held.append((param, swap_storage(param, host_pool.take(param.shape, param.dtype, host_device()))))
        yield
        with torch.no_grad():
            for param, on_target in held:
                on_target.copy_(param)
    finally:
        for param, on_target in held:  # the target storage back (unchanged if processing failed)
            host_pool.give(swap_storage(param, on_target.detach()).detach())
