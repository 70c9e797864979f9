"""Running under `torchrun`: the processes already exist, and the environment describes their group.

`under_torchrun()` tells so from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT all
set); `init_from_env(device, timeout_s)` joins the group it describes (`env://`, the backend and
collective timeout of `rank.py`: gloo on CPU, nccl on CUDA with the device LOCAL_RANK) and returns
this rank's `TPContext`; `shutdown()` destroys the default group.

Invariants: `init_from_env` joins at most once per process (an initialized default group is kept,
whatever its backend and timeout) and `shutdown` is a no-op without a group.

Limitations: the whole world is the tensor-parallel group (no data- or pipeline-parallel split).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from streamquant.parallel.context import TPContext
from streamquant.parallel.rank import DEFAULT_TIMEOUT_S, backend_for

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when the environment describes a process group (as `torchrun` sets it up)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> TPContext:
    """Join the process group described by the environment (once) and return this rank's context."""
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return TPContext.from_process_group()


def shutdown() -> None:
    """Destroy the default process group if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
