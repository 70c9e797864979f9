"""The tensor-parallel context value and its collectives (`parallel/context.py`), in one process: a
context is validated when made, single-process code never touches `torch.distributed` (size 1: the
collectives are the identity, `from_process_group` / `default_tp` give rank 0 of 1), exact division
names what could not be split, and peer failures are told from other errors. The collectives at TP > 1
run in every TP test (tests/layers/test_vocab.py, tests/models/test_hf_equivalence.py, ...)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from streamquant.parallel.context import TPContext, all_gather, all_reduce, default_tp, divide, is_peer_failure


def test_a_context_is_a_validated_frozen_value():
    tp = TPContext(2, 4)
    assert (tp.rank, tp.size, tp.group, tp.reduce_dtype) == (2, 4, None, None)
    with pytest.raises(AttributeError):
        tp.rank = 0  # frozen
    with pytest.raises(ValueError, match="tensor-parallel size must be >= 1, got 0"):
        TPContext(0, 0)
    with pytest.raises(ValueError, match=r"tensor-parallel rank 4 is outside \[0, 4\)"):
        TPContext(4, 4)
    with pytest.raises(ValueError, match=r"rank -1 is outside"):
        TPContext(-1, 2)


def test_partial_sums_are_widened_only_across_ranks_and_only_when_asked():
    assert TPContext(0, 2, reduce_dtype=torch.float32).partial_sum_dtype(torch.bfloat16) == torch.float32
    assert TPContext(0, 2, reduce_dtype=torch.float32).partial_sum_dtype(torch.float32) is None  # already that dtype
    assert TPContext(0, 2).partial_sum_dtype(torch.bfloat16) is None  # not asked
    assert TPContext(reduce_dtype=torch.float32).partial_sum_dtype(torch.bfloat16) is None  # one rank: no partial sums


def test_single_process_code_never_touches_torch_distributed(monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("a collective at size 1"))
    monkeypatch.setattr(dist, "all_gather", lambda *a, **k: pytest.fail("a collective at size 1"))
    x = torch.arange(6.0).reshape(2, 3)
    assert all_reduce(x, TPContext()) is x and all_gather(x, TPContext(), dim=0) is x
    assert TPContext.from_process_group(reduce_dtype=torch.float32) == TPContext(reduce_dtype=torch.float32)
    assert default_tp() == TPContext()


def test_divide_is_exact_and_names_what_could_not_be_split():
    assert divide(12, 4) == 3 and divide(7, 1) == 7
    with pytest.raises(ValueError, match="num_heads 6 is not divisible by tensor-parallel size 4"):
        divide(6, 4, "num_heads")


@pytest.mark.parametrize("message, peer", [
    ("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242", True),
    ("Timed out waiting 3000ms for recv operation to complete", True),
    ("NCCL communicator was aborted: Connection reset by peer", True),
    ("Broken pipe", True),
    ("shape mismatch in all_reduce", False),
], ids=["gloo-closed", "gloo-timeout", "nccl-reset", "broken-pipe", "other"])
def test_peer_failures_are_told_from_other_errors(message, peer):
    assert is_peer_failure(RuntimeError(message)) is peer
    assert is_peer_failure(ValueError(message)) is False  # only the backends' RuntimeErrors
