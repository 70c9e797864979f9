"""launch(): N spawned ranks over gloo, rank 0's result back, any rank's failure raised with its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from streamquant.parallel.context import is_peer_failure
from streamquant.parallel.launch import LaunchError, RankPool, launch

REPO = Path(__file__).resolve().parents[2]


def all_reduce_ranks(scale: float) -> dict:
    x = torch.tensor([scale * (dist.get_rank() + 1)])
    dist.all_reduce(x)
    return {"rank": dist.get_rank(), "size": dist.get_world_size(), "sum": x.item(), "backend": dist.get_backend()}


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise KeyError("rank one has no such key")
    x = torch.zeros(1)
    dist.all_reduce(x)  # rank 0 waits here for a peer that never comes
    return 0


def test_all_reduce_at_tp2_returns_rank0_result():
    result = launch(all_reduce_ranks, 2, 10.0)
    assert result == {"rank": 0, "size": 2, "sum": 30.0, "backend": "gloo"}
    assert not dist.is_initialized()  # the parent never joins the group


def test_failure_on_a_rank_raises_with_its_traceback():
    with pytest.raises(LaunchError) as info:
        launch(fail_on_rank_one, 2)
    err = info.value
    assert err.rank == 1
    assert isinstance(err.exception, KeyError)
    assert "fail_on_rank_one" in err.traceback_text and "rank one has no such key" in str(err)


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="tp_size"):
        launch(all_reduce_ranks, 0, 1.0)


def _one_rank_goes_silent():
    if dist.get_rank() == 1:
        time.sleep(120)  # never reaches the collective; ended by launch once rank 0 fails
    dist.all_reduce(torch.ones(1))


def test_a_silent_rank_fails_its_peers_within_the_timeout():
    with pytest.raises(LaunchError) as info:
        launch(_one_rank_goes_silent, 2, timeout_s=2)
    assert info.value.rank == 0 and is_peer_failure(info.value.exception)
    assert info.value.unreported == (1,)  # the silent rank is named


def _pid_and_sum(scale: float) -> tuple[int, float]:
    x = torch.tensor([scale * (dist.get_rank() + 1)])
    dist.all_reduce(x)
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return tuple(pids), x.item()


def test_a_pool_runs_many_jobs_on_the_same_ranks():
    with RankPool(2) as pool:
        pids, first = pool.run(_pid_and_sum, 1.0)
        again, second = pool.run(_pid_and_sum, 2.0)
        procs = list(pool.procs)
    assert (first, second) == (3.0, 6.0)
    assert pids == again and os.getpid() not in pids and len(set(pids)) == 2  # the same two processes
    assert all(p.exitcode == 0 for p in procs)  # leaving the block ended them cleanly
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_pid_and_sum, 1.0)


def test_a_failed_job_closes_the_pool_and_an_unpicklable_one_does_not():
    pool = RankPool(2)
    try:
        with pytest.raises(Exception, match="pickle"):
            pool.run(lambda: None)  # refused in the parent: nothing was sent, the ranks stay usable
        assert pool.run(_pid_and_sum, 1.0)[1] == 3.0
        with pytest.raises(LaunchError) as info:
            pool.run(fail_on_rank_one)
        assert info.value.rank == 1 and isinstance(info.value.exception, KeyError)
        assert pool.closed and not any(p.is_alive() for p in pool.procs)  # the waiting rank 0 was ended too
        with pytest.raises(RuntimeError, match="closed"):
            pool.run(_pid_and_sum, 1.0)
    finally:
        pool.close()


def test_a_pool_dropped_without_close_ends_its_ranks():
    import gc

    pool = RankPool(2)
    assert pool.run(_pid_and_sum, 1.0)[1] == 3.0
    procs = list(pool.procs)
    del pool
    gc.collect()
    assert not any(p.is_alive() for p in procs)  # nothing left for interpreter exit to wait on


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_ranks_of_a_killed_parent_end():
    code = ("import os, signal\n"
            "from streamquant.parallel.launch import RankPool\n"
            "from parallel.test_launch import _pid_and_sum\n"
            "pool = RankPool(2)\n"
            "print(*pool.run(_pid_and_sum, 1.0)[0], flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")  # no close(), no finalizer, no atexit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    # the ranks hold the output pipe open: while they live, this waits (and fails at the timeout)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=150)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 60  # a liveness bound, not a speed check: ranks poll every second
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids)


def test_an_unclosed_pool_does_not_hold_up_interpreter_exit():
    code = ("import tempfile, weakref\n"
            "weakref.finalize(tempfile, print)  # a finalizer made before multiprocessing's exit hook\n"
            "from streamquant.parallel.launch import RankPool\n"
            "from parallel.test_launch import _pid_and_sum\n"
            "pool = RankPool(2)\n"
            "print(pool.run(_pid_and_sum, 1.0)[1], flush=True)\n")  # exits without close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0 and out.stdout.split()[0] == "3.0", out.stderr


def _leave_a_collective_pending() -> int:
    if dist.get_rank() == 1:
        dist.all_reduce(torch.ones(1), async_op=True)  # never waited for: rank 0 never makes it
    return 0


def test_a_job_that_leaves_the_ranks_out_of_step_fails_itself():
    with RankPool(2, timeout_s=3) as pool:
        with pytest.raises(LaunchError):
            pool.run(_leave_a_collective_pending)  # not the next job, which did nothing wrong
        assert pool.closed
