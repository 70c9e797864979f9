"""Run a function on N tensor-parallel ranks, one process each.

`launch(fn, tp_size, *args, device=...)` spawns `tp_size` processes (torch.multiprocessing, spawn
context). Each joins a fresh process group (`gloo` for CPU, `nccl` for CUDA with rank r on GPU r)
over a key-value store this process hosts on 127.0.0.1 (on CPU each rank gets cpu_count // N threads unless
OMP_NUM_THREADS is set), runs `fn(*args)`, and sends back either its pickled result (only rank 0's
is kept) or its traceback; a rank that finishes destroys its group. The first failure terminates the
other ranks (they would otherwise wait in a collective, the failed rank's group still up) and raises
`LaunchError` in the parent. `RankPool(tp_size)` keeps such ranks for many calls
(`pool.run(fn, *args)`); `launch` is one call of a fresh pool.
Collectives time out after `timeout_s` (default 5 minutes, not gloo's 30): a rank that stops
answering makes its peers fail within that time.

This module is the parent's side: the pool, collecting the ranks' reports, ending the ranks. What
runs in each rank process (joining the group, the job loop, the reports) is `rank.py`.

Under `torchrun` the processes already exist: `under_torchrun()` tells so from the environment and
`init_from_env()` joins the group it describes (`torchrun.py`; re-exported here).

Ending the ranks after a failure terminates them, and wakes a stopped one (SIGSTOP) so that it takes
the signal instead of holding the parent for the join's minute.

Limitations: single node; `fn` and `args` must pickle with plain `pickle` (module-level functions;
no multiprocessing queues or locks; tensors are copied to each rank, not shared).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.util import Finalize
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamquant.parallel.rank import DEFAULT_TIMEOUT_S, backend_for, serve
from streamquant.parallel.torchrun import init_from_env, shutdown, under_torchrun

__all__ = ["DEFAULT_TIMEOUT_S", "LaunchError", "RankPool", "backend_for", "free_port", "init_from_env", "launch",
           "shutdown", "under_torchrun"]

POLL_SECONDS = 0.2


class LaunchError(RuntimeError):
    """A rank failed. `exception` is the rank's own exception when it could be sent back."""

    def __init__(self, rank: int, message: str, traceback_text: str = "", exception: BaseException | None = None,
                 unreported: tuple[int, ...] = ()):
        super().__init__(f"rank {rank}: {message}" + (f"\n{traceback_text}" if traceback_text else ""))
        self.rank = rank
        self.traceback_text = traceback_text
        self.exception = exception
        self.unreported = unreported  # the other ranks that had not reported then (a silent peer is among them)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(procs: list, results) -> Any:
    """Rank 0's result once every rank reported success; `LaunchError` at the first failure."""
    pending = set(range(len(procs)))
    value = None
    while pending:
        # A rank that had exited before this wait and sent nothing during it died silently.
        exited = sorted(r for r in pending if procs[r].exitcode is not None)
        try:
            rank, status, payload = results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if exited:
                code = procs[exited[0]].exitcode
                raise LaunchError(exited[0], f"process exited with code {code} without reporting") from None
            continue
        pending.discard(rank)
        if status == "error":
            text, exc_bytes = payload
            exception = pickle.loads(exc_bytes) if exc_bytes is not None else None
            raise LaunchError(rank, "failed", text, exception, tuple(sorted(pending))) from exception
        if rank == 0:
            value = pickle.loads(payload)
    return value


def _end_ranks(procs: list, jobs: list, results, stop: bool, store=None) -> None:
    """End a pool's ranks: `stop` asks each to finish (None job), else they are terminated (after a
    failure the others may be blocked in a collective with the failed rank). `store`, the group's, is
    kept alive until they ended."""
    started = [(p, queue_) for p, queue_ in zip(procs, jobs) if p.pid is not None]
    for p, queue_ in started:
        if stop and p.is_alive():
            queue_.put(None)
        else:
            p.terminate()
            _wake(p)
    for p, _ in started:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
    for q in (*jobs, results):
        q.close()


def _wake(p) -> None:
    """Continue `p` if it is stopped (SIGSTOP), so that it takes the signal it was just sent."""
    if hasattr(signal, "SIGCONT"):
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:  # it already ended
            pass


class RankPool:
    """`tp_size` rank processes kept between calls: `pool.run(fn, *args)` is `launch(fn, tp_size,
    *args)` without starting processes, importing torch and forming the group again (seconds each time
    on CPU). Jobs run one at a time, every rank runs each; the group and each rank's module state
    persist between jobs, random states included (fresh processes get random seeds from torch anyway:
    a job that needs reproducible draws seeds them itself). The first failure of a job closes the pool
    (its ranks may be stuck in a collective): `run` raises `LaunchError`, and later calls raise
    `RuntimeError`. `close()` (or leaving a `with` block) ends the ranks; dropping the pool or the
    interpreter's exit terminates them; an idle rank also ends once its parent process is gone. Rank processes see the environment of the moment the pool was made,
    not of each call."""

    def __init__(self, tp_size: int, *, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        backend = backend_for(device)
        if backend == "nccl" and torch.cuda.device_count() < tp_size:
            raise ValueError(f"tensor-parallel size {tp_size} needs {tp_size} GPUs, found {torch.cuda.device_count()}")
        self.tp_size = tp_size
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(tp_size)]
        # the group's key-value store lives here, not in a rank: a rank that stops does not take it along
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.procs = [ctx.Process(target=serve, args=(r, tp_size, self.store.port, backend, self.jobs[r],
                                                      self.results, timeout_s)) for r in range(tp_size)]
        self._lock = threading.Lock()  # one job at a time, whichever thread calls
        # A pool dropped, or alive at interpreter exit, without close(): its ranks are terminated. An
        # exit priority runs this before multiprocessing joins its (non-daemon) children at exit.
        self._finalizer = Finalize(self, _end_ranks, args=(self.procs, self.jobs, self.results, False, self.store),
                                   exitpriority=10)
        for p in self.procs:
            p.start()

    @property
    def closed(self) -> bool:
        return not self._finalizer.still_active()

    def run(self, fn: Callable, *args: Any) -> Any:
        """`fn(*args)` on every rank; rank 0's result. `fn` and `args` must pickle (module-level functions)."""
        return self._run(pickle.dumps((fn, args)))  # pickled here: what cannot be fails the call, not a feeder thread

    def _run(self, job: bytes) -> Any:
        with self._lock:
            if self.closed:
                raise RuntimeError("this RankPool is closed (close() was called, or a job failed); make a new one")
            try:
                for jobs in self.jobs:
                    jobs.put(job)
                return _collect(self.procs, self.results)
            except BaseException:
                self._end(stop=False)
                raise

    def close(self) -> None:
        """End the rank processes (they finish the job in hand first)."""
        if not self.closed:
            self._end(stop=True)

    def _end(self, stop: bool) -> None:
        if self._finalizer.still_active():
            self._finalizer.cancel()
            _end_ranks(self.procs, self.jobs, self.results, stop, self.store)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def launch(fn: Callable, tp_size: int, *args: Any, device: str | torch.device = "cpu",
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run `fn(*args)` on `tp_size` ranks and return rank 0's result; a collective waits at most
    `timeout_s` seconds for a peer. One job of a fresh `RankPool`."""
    job = pickle.dumps((fn, args))  # before any process starts
    with RankPool(tp_size, device=device, timeout_s=timeout_s) as pool:
        return pool._run(job)
