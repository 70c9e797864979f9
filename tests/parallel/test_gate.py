"""The gate of a load (`parallel/gate.py`): tensor-parallel ranks check in before each step; a rank's
failure stops the others at their next step, naming it and its reason; a silent rank is named as the
one that stopped; a gate's keys are deleted once nobody can read them."""

from __future__ import annotations

import pickle
import time

import pytest
import torch.distributed as dist

from streamquant.parallel.context import TPContext
from streamquant.parallel.gate import GATE_PREFIX, Gate, RankFailedError, RankStoppedError, group_store, reason_of
from streamquant.parallel.launch import RankPool


def _outcome(fn):
    try:
        return ("ok", fn())
    except RankFailedError as exc:
        return (type(exc).__name__, exc.rank, exc.reason, str(exc))


def _gathered(row):
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _steps_then_close(steps: int):
    tp = TPContext.from_process_group()
    numbers, written = [], []
    base = dist.PrefixStore(GATE_PREFIX, group_store(dist.group.WORLD))
    for _ in range(2):  # two gates one after the other: each its own number and keys
        gate = Gate(tp)
        for k in range(steps):
            gate.step(f"layer {k}")
        keys = [f"{gate.number}/{k}/{q}" for k in range(steps) for q in range(tp.size)]
        written.append(all(base.check([key]) for key in keys))
        dist.barrier()  # every rank left its steps
        gate.close(every_rank_done=True)
        numbers.append(gate.number)
    dist.barrier()
    left = [f"{n}/{k}/{q}" for n in numbers for k in range(steps) for q in range(tp.size) if base.check([f"{n}/{k}/{q}"])]
    return _gathered((numbers, written, left))


def test_ranks_pass_their_steps_together_and_close_deletes_their_keys(ranks):
    rank0, rank1 = ranks.run(_steps_then_close, 2, 3)
    numbers, written, left = rank0
    assert rank1[0] == numbers and numbers[1] == numbers[0] + 1  # the same number on every rank, the next each time
    assert written == [True, True]  # every rank checked in for every step
    assert left == [] and rank1[2] == []  # and every key is gone once they all left their steps


def _rank_one_fails_after_two_steps():
    tp = TPContext.from_process_group()
    gate = Gate(tp)
    if tp.rank == 1:
        gate.step("layer 'a'")
        gate.step("layer 'b'")
        gate.fail(ValueError("checkpoint tensor 'x' holds NaN\nmore detail"))
        gate.fail(ValueError("a second failure is not posted"))
        return _gathered(("failed", gate.checked_in))
    passed = []

    def walk():
        for where in ("layer 'a'", "layer 'b'", "layer 'c'"):
            gate.step(where)
            passed.append(where)

    return _gathered((_outcome(walk), passed))


def test_a_failure_posted_by_one_rank_stops_the_other_at_its_next_step(ranks):
    (outcome, passed), rank1 = ranks.run(_rank_one_fails_after_two_steps, 2)
    assert rank1 == ("failed", 3)  # two check-ins and one failure posted (the second is not)
    assert passed == ["layer 'a'", "layer 'b'"]
    kind, rank, reason, message = outcome
    assert (kind, rank, reason) == ("RankFailedError", 1, "ValueError: checkpoint tensor 'x' holds NaN")
    assert "rank 1 failed" in message and "before layer 'c'" in message


def _rank_one_is_silent():
    tp = TPContext.from_process_group()
    gate = Gate(tp)
    dist.barrier()
    start = time.monotonic()
    end = start + 2 * gate.silence_s  # both ranks return then: the pool's closing check waits no longer
    if tp.rank == 1:
        time.sleep(end - time.monotonic())  # never checks in; the other rank gives up first
        return None
    outcome = _outcome(lambda: gate.step("layer 'model.layers.0.mlp.down_proj'"))
    waited = time.monotonic() - start
    time.sleep(max(0.0, end - time.monotonic()))
    return outcome, waited


def test_a_rank_that_never_checks_in_is_named_as_the_one_that_stopped():
    with RankPool(2, timeout_s=3) as pool:
        outcome, waited = pool.run(_rank_one_is_silent)
    kind, rank, _, message = outcome
    assert (kind, rank) == ("RankStoppedError", 1)
    assert "rank 1 stopped answering at layer 'model.layers.0.mlp.down_proj'" in message and "for 3 s" in message
    assert waited >= 3  # it waited the store's timeout (the collectives' under RankPool), not less


def _reason_after_the_last_step():
    tp = TPContext.from_process_group()
    gate = Gate(tp)
    gate.step("layer 'a'")
    if tp.rank == 1:
        gate.fail(ConnectionError("rank 1's trainer went away"))
    dist.barrier()  # as the update's agreement: rank 0 learns that rank 1 failed, then asks why
    return gate.posted_reason(1 - tp.rank) if tp.rank == 0 else None, gate.posted_reason(0) if tp.rank == 1 else None


def test_a_failure_after_the_last_step_can_be_read_by_the_others(ranks):
    posted, _ = ranks.run(_reason_after_the_last_step, 2)
    assert posted == "ConnectionError: rank 1's trainer went away"


def _none_posted():
    tp = TPContext.from_process_group()
    gate = Gate(tp)
    gate.step("layer 'a'")
    dist.barrier()
    return gate.posted_reason(1 - tp.rank)  # nobody failed: nothing is there


def test_posted_reason_is_none_where_nothing_was_posted(ranks):
    assert ranks.run(_none_posted, 2) is None


def test_a_gate_without_a_process_group_or_at_one_rank_does_nothing():
    assert not dist.is_initialized()
    for tp in (None, TPContext(), TPContext(rank=1, size=2)):
        gate = Gate(tp)
        assert gate.store is None
        gate.step("layer 'a'")
        gate.fail(RuntimeError("nobody to tell"))
        gate.close(every_rank_done=True)
        assert gate.posted_reason(0) is None


def test_errors_travel_between_processes_with_their_fields():
    for cls in (RankFailedError, RankStoppedError):
        exc = pickle.loads(pickle.dumps(cls("tensor-parallel rank 3 failed", 3, "OSError: gone")))
        assert type(exc) is cls and (str(exc), exc.rank, exc.reason) == ("tensor-parallel rank 3 failed", 3, "OSError: gone")


def test_a_reason_is_one_line_of_bounded_length():
    assert reason_of(KeyError("x")) == "KeyError: 'x'"
    assert reason_of(RuntimeError("\n  first\nsecond")) == "RuntimeError: first"
    assert reason_of(RuntimeError()) == "RuntimeError"
    long = reason_of(ValueError("v" * 2000))
    assert len(long) == 500 and long.startswith("ValueError: vvv") and long.endswith("...")


def _step_after_a_failure():
    gate = Gate(TPContext.from_process_group())
    gate.fail(ValueError("bad"))
    with pytest.raises(RuntimeError, match="already failed"):
        gate.step("layer 'a'")
    return True


def test_a_step_after_the_gate_failed_is_refused(ranks):
    assert ranks.run(_step_after_a_failure, 2)
