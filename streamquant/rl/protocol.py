"""What both sides of a weight sync share (`rl/sync.py` sends, `rl/receiver.py` receives): the
protocol version every header carries, the report collective, what a send moved (`SyncStats`), where
buckets live, and the progress bar of one plan. The protocol itself is described in `rl/sync.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from streamquant.progress import WeightBar, wants_progress
from streamquant.rl.buckets import Bucket
from streamquant.rl.delta import Change

PROTOCOL = 2


@dataclass(frozen=True)
class SyncStats:
    """What one `send` moved. `bytes`: everything the sender broadcast, its header objects (pickled,
    `header_bytes`) and the tensors in the buckets; `tensors`: the tensors that travelled (for a delta,
    those that changed); `delta`: whether only changes were sent, each tensor's in `changes`."""

    tensors: int
    bytes: int
    buckets: int
    seconds: float
    header_bytes: int = 0
    delta: bool = False
    changes: tuple[Change, ...] = ()


def default_device(group: dist.ProcessGroup | None) -> torch.device:
    """Buckets live where the backend moves data: CUDA for NCCL, host memory otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def report(group: dist.ProcessGroup | None, answer: Any) -> list[Any]:
    """Every rank's `answer` (a picklable object), in group rank order, on every rank."""
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, answer, group=group)
    return reports


def describe(exc: BaseException) -> str:
    """An exception as one report line: its class and message."""
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def sync_bar(progress: bool | None, desc: str, plan: list[Bucket], leave: bool) -> Iterator[WeightBar | None]:
    """The bar of one send or receive (None where none is drawn), its totals from the plan."""
    if not wants_progress(progress):
        yield None
        return
    tensors, nbytes = sum(len(b.entries) for b in plan), sum(e.nbytes for b in plan for e in b.entries)
    with WeightBar(desc, total_bytes=nbytes, total_tensors=tensors, leave=leave) as bar:
        yield bar
