"""One rank's side of a launch (`parallel/rank.py`): the backend for a device, and a result that cannot
travel back is an error, not a hang (only rank 0's result travels)."""

from __future__ import annotations

from streamquant.parallel.rank import _run_rank, backend_for


def test_backend_for_the_device():
    assert backend_for("cpu") == backend_for("cpu:0") == "gloo"
    assert backend_for("cuda") == backend_for("cuda:1") == "nccl"


def test_unpicklable_result_is_an_error_not_a_hang():
    rank, status, (text, _) = _run_rank(0, lambda: (lambda: None), ())
    assert (rank, status) == (0, "error") and "pickle" in text.lower()
    assert _run_rank(1, lambda: (lambda: None), ())[1] == "ok"  # only rank 0's result travels
