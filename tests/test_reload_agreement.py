"""A tensor-parallel reload commits on every rank or on none, and fails fast: when one rank's source
fails or its values are refused, every rank raises -- the others naming that rank and its reason, at
their next layer instead of in its collective -- and rolls back (atomic) or is marked not ready, and
all keep the same weights_version. The ranks' group has a 30-minute timeout (torch's default), so a
rank left waiting in a collective would hold the test for half an hour: a wall-clock guard (SIGALRM,
whose default action ends the rank) fails the test long before that instead."""

from __future__ import annotations

import signal
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from streamquant import api
from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.parallel.context import TPContext
from streamquant.parallel.launch import LaunchError, RankPool
from streamquant.parallel.gate import RankStoppedError
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint

NORM = "model.layers.0.input_layernorm.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
GROUP_TIMEOUT_S = 1800  # torch's default: what a rank waiting in a collective for a failed one would wait
GUARD_S = 120  # a rank still running after this ends (fails the test): far beyond a fail-fast, far below 1800


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    case = next(c for c in CASES if c.name == "llama-tied-mqa-llama3rope")
    return make_checkpoint(case, tmp_path_factory.mktemp("agree"))


@pytest.fixture(scope="module")
def slow_group():
    """Two ranks whose collectives wait 30 minutes for a peer."""
    with RankPool(2, timeout_s=GROUP_TIMEOUT_S) as pool:
        yield pool


def _guarded(fn, *args):
    signal.alarm(GUARD_S)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)


def _gathered(row):
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _one_rank_fails(path, scheme, atomic, how):
    tp = TPContext.from_process_group()
    model = load_model(path, quantization=scheme, dtype=torch.float32, tp=tp)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    items = [(n, t.clone() * 1.5) for n, t in iterate_weights(path)]  # new weights (scaled)

    def source():
        for i, (name, tensor) in enumerate(items):
            if tp.rank == 1 and how == "raise-mid-stream" and i == len(items) // 2:
                raise ConnectionError("rank 1's trainer went away")
            if tp.rank == 1 and ((how == "nan" and name == NORM) or (how == "nan-quantized" and name == Q_PROJ)):
                tensor = torch.full_like(tensor, float("nan"))
            yield name, tensor
        if how == "raise-at-end" and tp.rank == 1:
            raise ConnectionError("rank 1's trainer went away")

    try:
        reload_weights(model, source(), atomic=atomic)
        outcome, message = "committed", ""
    except Exception as exc:  # noqa: BLE001 -- the outcome is what the test compares
        outcome, message = type(exc).__name__, str(exc)
    unchanged = all(torch.equal(t.view(torch.uint8), before[n].view(torch.uint8)) for n, t in model.state_dict().items())
    return _gathered((outcome, message, model.weights_version, unchanged, model.not_ready_reason is None))


CASES_FAILING = [(None, "nan"), (None, "raise-at-end"), ("fp8", "raise-at-end"), ("fp8-block", "nan"),
                 ("fp8", "raise-mid-stream"), ("fp8-block", "raise-mid-stream"), ("fp8", "nan-quantized")]


@pytest.mark.parametrize("scheme, how", CASES_FAILING)
@pytest.mark.parametrize("atomic", [True, False])
def test_no_rank_commits_when_one_fails(slow_group, checkpoint, scheme, how, atomic):
    rank0, rank1 = slow_group.run(_guarded, _one_rank_fails, checkpoint, scheme, atomic, how)
    failing = "ConnectionError" if how.startswith("raise") else "NonFiniteWeightError"
    assert rank1[0] == failing
    if how == "nan-quantized":  # the layer's amax all-reduce carries the NaN: both ranks refuse that layer
        assert rank0[0] == failing and "another tensor-parallel rank's shard" in rank0[1]
    else:  # told that rank 1 failed, and why
        assert rank0[0] == "RankFailedError" and "tensor-parallel rank 1 failed" in rank0[1]
        assert ("trainer went away" if failing == "ConnectionError" else NORM) in rank0[1]
    if how in ("nan", "raise-mid-stream") and scheme is not None:  # rank 0 stopped at a quantized layer, not
        assert "rank 0 stopped before layer" in rank0[1]               # in its collective nor at the end
    if scheme is None:  # no layer runs a collective: rank 0 learns it when both meet at finish
        assert "so rank 0's update does not commit either" in rank0[1]
    assert rank0[2] == rank1[2] == 0  # no rank counted a new version
    if atomic:
        assert rank0[3:] == rank1[3:] == (True, True)  # both exactly as before, and usable
    else:
        assert rank0[4] is False and rank1[4] is False  # both marked not ready until a complete reload


def _cold_load_source_raises(path):
    tp = TPContext.from_process_group()
    read = api.iterate_weights

    def source(checkpoint):
        items = list(read(checkpoint))
        for i, item in enumerate(items):
            if tp.rank == 1 and i == len(items) // 2:
                raise OSError("rank 1's disk went away")
            yield item

    try:
        with mock.patch.object(api, "iterate_weights", source):  # what load_model reads the checkpoint with
            load_model(path, quantization="fp8", dtype=torch.float32, tp=tp)
        outcome = ("loaded", "")
    except Exception as exc:  # noqa: BLE001
        outcome = (type(exc).__name__, str(exc))
    return _gathered(outcome)


def test_a_cold_load_whose_source_raises_on_one_rank_fails_every_rank(slow_group, checkpoint):
    rank0, rank1 = slow_group.run(_guarded, _cold_load_source_raises, checkpoint)
    assert rank1 == ("OSError", "rank 1's disk went away")
    assert rank0[0] == "RankFailedError"
    assert "tensor-parallel rank 1 failed (OSError: rank 1's disk went away)" in rank0[1]
    assert "rank 0 stopped before layer" in rank0[1]


def _rank_one_stops_mid_stream(path):
    tp = TPContext.from_process_group()
    model = load_model(path, quantization="fp8", dtype=torch.float32, tp=tp)
    items = list(iterate_weights(path))

    def source():
        for i, item in enumerate(items):
            if tp.rank == 1 and i == len(items) // 2:
                signal.raise_signal(signal.SIGSTOP)  # stopped, as by `kill -STOP`: never posts anything
            yield item

    reload_weights(model, source())


def test_a_rank_that_stops_mid_stream_is_named_by_the_others(checkpoint):
    with pytest.raises(LaunchError) as info:
        with RankPool(2, timeout_s=10) as pool:
            pool.run(_guarded, _rank_one_stops_mid_stream, checkpoint)
    assert info.value.rank == 0
    exc = info.value.exception
    assert isinstance(exc, RankStoppedError) and exc.rank == 1, repr(exc)
    assert "tensor-parallel rank 1 stopped answering at layer" in str(exc) and "for 10 s" in str(exc)
