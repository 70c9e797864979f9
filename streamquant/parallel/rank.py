"""One tensor-parallel rank: how it joins its process group and, in a `RankPool`, serves jobs.

Joining: `backend_for(device)` is `gloo` for CPU and `nccl` for CUDA; collectives wait at most
`DEFAULT_TIMEOUT_S` for a peer unless told otherwise (gloo's own default is 30 minutes): a rank that
died or stopped answering then fails its peers with an error instead of a silent wait.
Joining itself (every rank's process started and connected) may take up to `JOIN_TIMEOUT_S`
whatever the collectives' timeout, since starting a process is seconds of imports on a loaded
machine. `torchrun.py` joins with the same backend and timeout.

Serving (`serve`, the target of each process `launch.RankPool` spawns): join a fresh group over the
key-value store the parent hosts at `127.0.0.1:<port>` (so a rank that stops does not take the store
with it), whose timeout is then the collectives' (`parallel.gate` waits that long for a silent rank)
(rank r on GPU r; on CPU with cpu_count // N threads unless
OMP_NUM_THREADS is set), then run each job from the rank's own queue (pickled `(fn, args)`; None
ends the loop) and put one report per job on the shared results queue: `(rank, "ok", pickled
result)` (rank 0's result only; the others send None) or `(rank, "error", (traceback text, pickled
exception or None))`. A job that succeeded here is closed by a check that every rank finished it
(`_in_step`), so a job that left unmatched collectives fails itself instead of the next one. A rank
that finishes destroys its group; an idle rank ends once its parent process is gone.

Invariants: every exception a job raises, or the closing check, reaches the parent as a report
(results are pickled on the rank, so one that cannot be pickled is the rank's error, not a lost
message); a job's exception that cannot be pickled or rebuilt travels as its traceback text only.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

PARENT_CHECK_SECONDS = 1.0  # how often an idle pool rank checks that its parent still lives
# Collectives wait at most this long for a peer (gloo's own default is 30 minutes): a rank that died
# or stopped answering then fails the survivors with an error instead of a silent wait.
DEFAULT_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 120.0  # the longest a rank waits for the others to join (start and connect)


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _picklable_exception(exc: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt (extra __init__ args)
        return data
    except Exception:
        return None


def _failure(rank: int, exc: BaseException) -> tuple:
    """The message a rank sends for the exception being handled: its traceback and, if it pickles, itself."""
    return rank, "error", (traceback.format_exc(), _picklable_exception(exc))


def _run_rank(rank: int, fn: Callable, args: tuple) -> tuple:
    """The message a rank sends back: its pickled result (rank 0 only) or its failure."""
    try:
        # Pickled here, not by the queue's feeder thread, so a result that cannot be pickled
        # becomes this rank's error instead of a message that never arrives.
        value = fn(*args)
        return rank, "ok", pickle.dumps(value) if rank == 0 else None
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        return _failure(rank, exc)


def serve(rank: int, size: int, port: int, backend: str, jobs, results, timeout_s: float) -> None:
    """A rank's process: join the group once, then run each job from `jobs` (pickled `(fn, args)`;
    None ends the loop) and report it on `results`."""
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # N ranks each using every core would oversubscribe the CPU; split the cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        # joining waits for the other ranks' processes to start (seconds of imports on a loaded machine),
        # so it gets at least JOIN_TIMEOUT_S; the collectives get timeout_s
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False,
                              timeout=timedelta(seconds=max(timeout_s, JOIN_TIMEOUT_S)))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        store.set_timeout(timedelta(seconds=timeout_s))  # joined: a silent peer is waited for as in a collective
    except BaseException as exc:  # noqa: BLE001
        results.put(_failure(rank, exc))
        return
    parent = multiprocessing.parent_process()
    try:
        count = 0
        while (job := _next_job(jobs, parent)) is not None:
            count += 1
            report = _run_rank(rank, lambda: _call(job), ())
            if report[1] == "ok":
                report = _in_step(rank, count, backend) or report
            results.put(report)
        if parent is None or parent.is_alive():
            results.close()
            results.join_thread()  # flushed before the group goes away, so every report reaches the parent
        else:
            results.cancel_join_thread()  # nobody reads them any more: a full pipe must not keep this rank
    finally:
        dist.destroy_process_group()


def _in_step(rank: int, count: int, backend: str) -> tuple | None:
    """After a job that succeeded here: None when every rank finished job `count` in step, else this
    rank's failure report. A job that left the ranks' collectives out of step (one more on some rank)
    fails itself here, instead of the next job waiting on a collective nobody else makes."""
    try:
        device = "cuda" if backend == "nccl" else "cpu"
        lo, hi = torch.tensor([count], device=device), torch.tensor([count], device=device)
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if int(lo) != count or int(hi) != count:
            raise RuntimeError(f"after job {count} the ranks are out of step (jobs {int(lo)}..{int(hi)} in the "
                               "closing check): the job left unmatched collectives")
        return None
    except BaseException as exc:  # noqa: BLE001 - reported as this job's failure
        return _failure(rank, exc)


def _next_job(jobs, parent) -> bytes | None:
    """The next job, or None when the pool ends it or the `parent` process is gone (a killed parent
    never sends None: its ranks must not wait for it forever)."""
    while True:
        try:
            return jobs.get(timeout=PARENT_CHECK_SECONDS)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None


def _call(job: bytes) -> Any:
    fn, args = pickle.loads(job)
    return fn(*args)
