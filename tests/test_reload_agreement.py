"""A tensor-parallel reload commits on every rank or on none: when one rank's source fails, every
rank raises and rolls back (atomic) or is marked not ready, and all keep the same weights_version."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.parallel.launch import LaunchError, launch
from streamquant.parallel.context import TPContext, is_peer_failure
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint

NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    case = next(c for c in CASES if c.name == "llama-tied-mqa-llama3rope")
    return make_checkpoint(case, tmp_path_factory.mktemp("agree"))


def _one_rank_fails(path, scheme, atomic, how):
    tp = TPContext.from_process_group()
    model = load_model(path, quantization=scheme, dtype=torch.float32, tp=tp)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    items = [(n, t.clone() * 1.5) for n, t in iterate_weights(path)]  # new weights (scaled)

    def source():
        for name, tensor in items:
            if how == "nan" and tp.rank == 1 and name == NORM:
                tensor = torch.full_like(tensor, float("nan"))
            yield name, tensor
        if how == "raise-at-end" and tp.rank == 1:
            raise ConnectionError("rank 1's trainer went away")

    try:
        reload_weights(model, source(), atomic=atomic)
        outcome = "committed"
    except Exception as exc:  # noqa: BLE001 -- the outcome is what the test compares
        outcome = type(exc).__name__
    unchanged = all(torch.equal(t.view(torch.uint8), before[n].view(torch.uint8)) for n, t in model.state_dict().items())
    row = (outcome, model.weights_version, unchanged, model.not_ready_reason is None)
    gathered = [None] * tp.size
    dist.all_gather_object(gathered, row)
    return gathered


@pytest.mark.parametrize("scheme, how", [(None, "nan"), (None, "raise-at-end"), ("fp8", "raise-at-end"),
                                         ("fp8-block", "nan")])
@pytest.mark.parametrize("atomic", [True, False])
def test_no_rank_commits_when_one_fails(ranks, checkpoint, scheme, how, atomic):
    rank0, rank1 = ranks.run(_one_rank_fails, 2, checkpoint, scheme, atomic, how)
    failing = "ConnectionError" if how == "raise-at-end" else "NonFiniteWeightError"
    assert rank1[0] == failing
    assert rank0[0] in ("WeightLoadError", failing)  # told that another rank failed (or failed the same way)
    assert rank0[1] == rank1[1] == 0  # no rank counted a new version
    if atomic:
        assert rank0[2:] == rank1[2:] == (True, True)  # both exactly as before, and usable
    else:
        assert rank0[3] is False and rank1[3] is False  # both marked not ready until a complete reload


def _source_dies_mid_stream(path):
    tp = TPContext.from_process_group()
    model = load_model(path, quantization="fp8", dtype=torch.float32, tp=tp)
    items = list(iterate_weights(path))

    def source():
        for i, item in enumerate(items):
            if tp.rank == 1 and i == len(items) // 2:
                raise ConnectionError("rank 1's trainer went away")
            yield item

    reload_weights(model, source())


def test_a_source_dying_mid_stream_ends_within_the_timeout(checkpoint):
    """Rank 0 waits in a layer's amax all-reduce that rank 1 never joins: the timeout ends it, and
    every rank fails (launch ends the survivors at the first failure)."""
    with pytest.raises(LaunchError) as info:
        launch(_source_dies_mid_stream, 2, checkpoint, timeout_s=5)
    exc = info.value.exception
    assert isinstance(exc, ConnectionError) or is_peer_failure(exc), repr(exc)
