"""Progress bars of long work: a load, a reload from disk, an offline quantization, a sync.

Owns: whether a bar is drawn (`wants_progress`), the bar itself (`WeightBar`: one tqdm bar per
checkpoint, not per shard, counting bytes in SI units, so its rate and ETA are in bytes (MB/s: 10^6
bytes a second), with "tensors done / total" beside them) and `progress_over`, which wraps a
`(name, tensor)` iterable so the bar moves as pairs pass. The loading code never sees a bar: it is
handed the wrapped iterable.

Rules:
- `progress=None` (the default of `load_model`, `reload_weights`, `quantize_checkpoint`,
  `WeightSender`) draws only where stderr is a terminal, as transformers' `from_pretrained` does
  (`reload_weights`: for a checkpoint directory only; a `WeightReceiver` defaults to False, see
  `rl/sync.py`); `True` draws anyway (on stderr, or the `stream` given), `False` never.
- Only tensor-parallel rank 0 draws (`rank=`): the other ranks read the same checkpoint in step.
- A tensor counts once its consumer asks for the next one (the work on it is done then; an
  mmapped tensor's bytes are only read while it is being loaded).
- Off, the iterable is handed on unchanged: no wrapper, no header read for the totals.
- tqdm redraws at most every `MIN_INTERVAL_S`; an update between redraws is a few additions
  (`benchmarks/progress.py` measures the whole bar against no bar).

Limitation: the totals come from the checkpoint's headers, so a stream that merges tensors on the
way (a pre-quantized checkpoint's stray fp8 embedding, dequantized from codes and scale) ends a
little short of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO

import torch
from tqdm import tqdm

MIN_INTERVAL_S = 0.2  # tqdm's redraw interval (its default is 0.1 s)
# a terminal that reports no size (a pty nobody sized, e.g. `script -qc ... /dev/null`): tqdm would draw nothing
FALLBACK_SIZE = {"ncols": 100, "nrows": 24}
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
OPEN_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total known: no percentage, no ETA


def is_terminal(stream: TextIO | None) -> bool:
    """Whether `stream` (default: the current stderr) is a terminal; False for a closed or odd stream."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def wants_progress(progress: bool | None, *, rank: int = 0, stream: TextIO | None = None) -> bool:
    """Whether to draw: never off rank 0 or with `progress=False`; `None`: where `stream` (stderr) is a terminal."""
    if rank != 0 or progress is False:
        return False
    return True if progress else is_terminal(stream)


def _has_size(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that knows its size (tqdm can follow it as it changes)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's stream), not a terminal
        return False
    return size.columns > 0 and size.lines > 0


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class WeightBar:
    """One tqdm bar over `total_bytes` (None: unknown), with `tensors / total_tensors` as its postfix."""

    def __init__(self, desc: str, *, total_bytes: int | None, total_tensors: int | None,
                 stream: TextIO | None = None, leave: bool = True):
        self.tensors, self.total_tensors = 0, total_tensors
        stream = sys.stderr if stream is None else stream
        size = {"dynamic_ncols": True} if _has_size(stream) else FALLBACK_SIZE
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=stream,
                        leave=leave, mininterval=MIN_INTERVAL_S, bar_format=BAR_FORMAT if total_bytes else OPEN_FORMAT,
                        postfix=self._count(), **size)

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self.bar.set_postfix_str(self._count(), refresh=False)
        self.bar.update(nbytes)

    def update_to(self, nbytes: int, tensors: int) -> None:
        """Move to absolute counts (a bar fed from counters other processes write)."""
        if (nbytes, tensors) != (self.bar.n, self.tensors):
            self.update(nbytes - self.bar.n, tensors - self.tensors)

    def _count(self) -> str:
        total = f"/{self.total_tensors}" if self.total_tensors is not None else ""
        return f"{self.tensors}{total} tensors"

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "WeightBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counted(weights: Iterable[tuple[str, torch.Tensor]], bar: WeightBar) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` as they are, each pair counted on `bar` once the consumer asks for the next."""
    for name, tensor in weights:
        yield name, tensor
        bar.update(tensor_bytes(tensor))


@contextmanager
def progress_over(weights: Iterable[tuple[str, torch.Tensor]], desc: str, *, enabled: bool,
                  totals: Callable[[], tuple[int, int]] | None = None, stream: TextIO | None = None,
                  leave: bool = True) -> Iterator[Iterable[tuple[str, torch.Tensor]]]:
    """`with progress_over(weights, "load", enabled=..., totals=...) as weights:` the iterable to consume.

    `totals()` gives (tensors, bytes) and is called only when a bar is drawn; None: unknown (the bar
    then shows counts and rate, no percentage or ETA). Disabled, `weights` is yielded unchanged."""
    if not enabled:
        yield weights
        return
    tensors, nbytes = totals() if totals is not None else (None, None)
    with WeightBar(desc, total_bytes=nbytes, total_tensors=tensors, stream=stream, leave=leave) as bar:
        yield counted(weights, bar)
