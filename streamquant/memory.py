"""Peak memory of a block of code, measured the same honest way every time.

`PeakMemorySampler` is a context manager; after the block, `result` is a frozen `MemoryPeak`.

- CUDA (method "cuda_max_memory_allocated"): `reset_peak_memory_stats()` on entry, then
  `max_memory_allocated()` on exit. Exact for tensors from torch's caching allocator; it does not
  see the CUDA context, the allocator's cached-but-free blocks or other libraries' memory.
- CPU (method "cpu_rss_anon_sampled_5ms", Linux only): a daemon thread reads `RssAnon` and
  `RssFile` from `/proc/self/status` every ~5 ms, plus one sample at entry, at exit and on each
  `sample()` call; `timeline` and `file_backed_timeline` keep every sample (the memory picture of
  `streamquant load --plot`). `peak_bytes` is the highest anonymous RSS minus the value at entry;
  `file_backed_peak_bytes` is the same for file-backed pages (mmapped checkpoints, which stay
  resident while any tensor views them). They are never summed.

About freed memory (glibc): torch's CPU allocator calls glibc directly. Blocks above glibc's mmap
threshold (128 KiB, raised dynamically up to 32 MiB after large frees) are unmapped on `free` and
leave `RssAnon` at once; smaller ones return to the heap, which glibc may keep. Memory glibc kept
counts in `RssAnon`, so it counts in the peak, as it does for the OS. To keep memory freed
*before* the block from hiding growth inside it (it would be reused without raising RSS), entry
calls `malloc_trim(0)` when glibc is present.

Limitations: a spike shorter than the sampling interval can be missed on CPU (call `sample()` at
known high points to be sure); RSS is per process, so threads of the same process are included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CUDA_METHOD = "cuda_max_memory_allocated"
STATUS_FILE = Path("/proc/self/status")


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory above the level at entry, and how it was measured."""

    method: str
    peak_bytes: int  # highest (anonymous, on CPU) memory above the entry level
    baseline_bytes: int  # the level at entry (allocated on CUDA, RssAnon on CPU)
    file_backed_peak_bytes: int | None  # CPU only: highest RssFile above the entry level
    timeline: tuple[tuple[float, int], ...]  # (seconds since entry, anonymous bytes above entry); CPU only
    file_backed_timeline: tuple[tuple[float, int], ...] = ()  # the same samples' file-backed bytes; CPU only


def read_rss() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes, from /proc/self/status."""
    anon = file = None
    for line in STATUS_FILE.read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    if anon is None or file is None:
        raise RuntimeError(f"{STATUS_FILE} has no RssAnon/RssFile lines (Linux >= 4.5 needed)")
    return anon, file


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim`, looked up once (None without glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def trim_heap() -> None:
    """Return free glibc heap memory to the OS (no-op without glibc); costs microseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemorySampler:
    """`with PeakMemorySampler(device) as s: ...`, then read `s.result`."""

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.result: MemoryPeak | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self._baseline = (0, 0)
        self._peak = (0, 0)
        self._timeline: list[tuple[float, int]] = []
        self._file_timeline: list[tuple[float, int]] = []

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return CUDA_METHOD
        return f"cpu_rss_anon_sampled_{round(self.interval_s * 1000)}ms"

    def __enter__(self) -> "PeakMemorySampler":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = (torch.cuda.memory_allocated(self.device), 0)
            return self
        trim_heap()
        self._start = time.perf_counter()
        self._baseline = read_rss()
        self._peak = self._baseline
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakMemorySampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._baseline[0]
            self.result = MemoryPeak(self.method, max(peak, 0), self._baseline[0], None, ())
            return
        self.sample()
        self._stop.set()
        self._thread.join()
        self._thread = None
        with self._lock:
            self.result = MemoryPeak(
                method=self.method,
                peak_bytes=max(self._peak[0] - self._baseline[0], 0),
                baseline_bytes=self._baseline[0],
                file_backed_peak_bytes=max(self._peak[1] - self._baseline[1], 0),
                timeline=tuple(self._timeline),
                file_backed_timeline=tuple(self._file_timeline),
            )

    def sample(self) -> None:
        """Take one CPU sample now (use at known high points); no-op on CUDA."""
        if self.device.type == "cuda":
            return
        anon, file = read_rss()
        with self._lock:
            seconds = time.perf_counter() - self._start
            self._timeline.append((seconds, anon - self._baseline[0]))
            self._file_timeline.append((seconds, file - self._baseline[1]))
            self._peak = (max(self._peak[0], anon), max(self._peak[1], file))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
