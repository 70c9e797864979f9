"""The push-style update (`begin_update` / load / finish / abort): each lifecycle rule, equality with a
cold load in any order and bucketing, fail-closed on every rank, and the fingerprint check at finish.

A (the checkpoint) and B (every tensor moved) share a config; an update of a model loaded from A with
B's tensors must be bitwise a cold load of B (its `weights_fingerprint` too).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from streamquant import begin_update, weights_digests, weights_fingerprint
from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.errors import DuplicateWeightError, MissingWeightsError, UnexpectedWeightError
from streamquant.models.base import ModelNotReadyError
from streamquant.parallel.context import TPContext
from streamquant.update import FingerprintMismatchError, WeightUpdateError

from hf_cases import CASES, make_checkpoint, write_variant

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    a = make_checkpoint(next(c for c in CASES if c.name == "llama"), root)
    return a, write_variant(a, root / "B")


def tensors(path):
    return dict(iterate_weights(path))


def test_an_update_in_any_order_and_bucketing_is_bitwise_a_cold_load(pair):
    a, b = pair
    model, cold = load_model(a, quantization="fp8-block"), load_model(b, quantization="fp8-block")
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    items = list(tensors(b).items())
    random.Random(0).shuffle(items)
    update = begin_update(model)
    update.load(*items[0])
    update.load_many(items[1:4])  # buckets of any size
    update.load_many(iter(items[4:]))
    loaded = update.finish()
    assert loaded == {n for n, _ in items} and model.weights_version == 1
    assert weights_fingerprint(model) == weights_fingerprint(cold)
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == addresses
    assert torch.equal(model(IDS), cold(IDS))


def test_the_lifecycle_is_enforced(pair):
    a, b = pair
    model = load_model(a)
    update = begin_update(model)
    with pytest.raises(WeightUpdateError, match="already active"):
        begin_update(model)
    with pytest.raises(ModelNotReadyError, match="in progress"):
        model(IDS)  # mixed weights between begin and finish
    update.load_many(tensors(b).items())
    update.finish()
    for step in (lambda: update.load("model.norm.weight", torch.ones(1)), update.finish, update.abort):
        with pytest.raises(WeightUpdateError, match="already ended"):
            step()
    begin_update(model).abort()  # a new one may begin once the last ended; an empty abort changes nothing
    assert model.not_ready_reason is None and model.weights_version == 1


@pytest.mark.parametrize("atomic", [True, False])
def test_an_unknown_or_repeated_name_fails_the_update_closed(pair, atomic):
    a, b = pair
    model, cold_a = load_model(a, quantization="fp8"), load_model(a, quantization="fp8")
    good = tensors(b)
    for bad, error in ((("model.no_such.weight", torch.zeros(2)), UnexpectedWeightError),
                       (("model.norm.weight", good["model.norm.weight"]), DuplicateWeightError)):
        update = begin_update(model, atomic=atomic)
        update.load("model.norm.weight", good["model.norm.weight"])
        with pytest.raises(error, match=bad[0].replace(".", r"\.")):
            update.load(*bad)
        with pytest.raises(WeightUpdateError, match="after this update failed"):
            update.load("model.embed_tokens.weight", good["model.embed_tokens.weight"])
        with pytest.raises(error):
            update.finish()  # the recorded error, after the ranks agreed
        if atomic:
            assert weights_fingerprint(model) == weights_fingerprint(cold_a) and model.not_ready_reason is None
        else:
            with pytest.raises(ModelNotReadyError, match="update failed"):
                model(IDS)
    assert model.weights_version == 0


def test_a_name_missing_at_finish_is_named(pair):
    a, b = pair
    model = load_model(a, quantization="int8")
    items = tensors(b)
    items.pop("model.layers.1.mlp.down_proj.weight")
    update = begin_update(model, atomic=True)
    update.load_many(items.items())
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        update.finish()
    assert model.weights_version == 0 and model.not_ready_reason is None


def test_expected_names_bound_the_update(pair):
    a, b = pair
    model, cold_a, cold_b = load_model(a), load_model(a), load_model(b)
    new = tensors(b)
    names = ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
    update = begin_update(model, expected=names)
    with pytest.raises(UnexpectedWeightError, match="not among the names this update expects"):
        update.load("model.embed_tokens.weight", new["model.embed_tokens.weight"])
    update.abort()
    update = begin_update(model, expected=names)
    update.load(names[0], new[names[0]])
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.0\.input_layernorm\.weight"):
        update.finish()
    update = begin_update(model, expected=names)
    update.load_many((n, new[n]) for n in names)
    update.finish()
    got, was, want = model.state_dict(), cold_a.state_dict(), cold_b.state_dict()
    assert all(torch.equal(got[n], want[n]) for n in names)  # those changed, nothing else did
    assert all(torch.equal(got[n], was[n]) for n in got if n not in names)
    assert any(not torch.equal(was[n], want[n]) for n in names)


def test_the_caller_may_reuse_a_tensor_as_soon_as_load_returns(pair):
    """With a staging budget tensors of later layers are deferred: they must be copied, not referenced."""
    a, b = pair
    model, cold = load_model(a, quantization="fp8"), load_model(b, quantization="fp8")
    update = begin_update(model, staging_budget=1)  # every layer but the first in flight is deferred
    buffer = None
    for name, tensor in reversed(list(tensors(b).items())):  # out of layer order
        buffer = tensor.clone()
        update.load(name, buffer)
        buffer.fill_(float("nan"))  # the caller reuses its memory
    update.finish()
    assert weights_fingerprint(model) == weights_fingerprint(cold)


def test_abort_restores_or_marks(pair):
    a, b = pair
    model, cold = load_model(a, quantization="int4"), load_model(a, quantization="int4")
    items = list(tensors(b).items())
    update = begin_update(model, atomic=True)
    update.load_many(items[: len(items) // 2])
    update.abort()
    assert weights_fingerprint(model) == weights_fingerprint(cold) and model.not_ready_reason is None
    update = begin_update(model)
    update.load_many(items[:3])
    update.abort()
    with pytest.raises(ModelNotReadyError):
        model(IDS)


def test_finish_checks_the_expected_fingerprint(pair):
    a, b = pair
    model, cold_a, cold_b = (load_model(p, quantization="mxfp8") for p in (a, a, b))
    update = begin_update(model, atomic=True)
    update.load_many(tensors(b).items())
    with pytest.raises(FingerprintMismatchError, match=weights_fingerprint(cold_a)):
        update.finish(expected_fingerprint=weights_fingerprint(cold_a))  # the wrong weights arrived
    assert weights_fingerprint(model) == weights_fingerprint(cold_a) and model.weights_version == 0
    update = begin_update(model, atomic=True)
    update.load_many(tensors(b).items())
    expected = weights_digests(cold_b)
    expected["model.layers.0.self_attn.o_proj.weight_scale"] = "0" * 64
    with pytest.raises(FingerprintMismatchError, match=r"rank 0: 1 tensor\(s\) differ.*o_proj\.weight_scale"):
        update.finish(expected_fingerprint=expected)
    update = begin_update(model)
    update.load_many(tensors(b).items())
    update.finish(expected_fingerprint=weights_fingerprint(cold_b))
    assert model.weights_version == 1


def _tp2_update(a, b, abort_on_rank: int | None):
    tp = TPContext.from_process_group()
    model, cold_a = load_model(a, quantization="fp8-block", tp=tp), load_model(a, quantization="fp8-block", tp=tp)
    update = begin_update(model, atomic=True)
    update.load_many(tensors(b).items())
    if tp.rank == abort_on_rank:
        update.abort()
        outcome = "aborted"
    else:
        try:
            update.finish()
            outcome = "committed"
        except Exception as exc:  # noqa: BLE001
            outcome = f"{type(exc).__name__}: {exc}"
    same = weights_fingerprint(model) == weights_fingerprint(cold_a)
    outcomes = [None, None]
    dist.all_gather_object(outcomes, (outcome, same, model.weights_version, weights_fingerprint(model)))
    return outcomes


def test_tp2_commits_on_every_rank_or_on_none(pair, ranks):
    a, b = pair
    committed = ranks.run(_tp2_update, 2, a, b, None)
    assert [o[:3] for o in committed] == [("committed", False, 1)] * 2
    assert committed[0][3] == committed[1][3]  # the fingerprint is the same string on every rank
    aborted = ranks.run(_tp2_update, 2, a, b, 1)
    assert aborted[1][:3] == ("aborted", True, 0)
    assert aborted[0][0] == ("RankFailedError: tensor-parallel rank 1 failed (WeightUpdateError: the update was "
                             "aborted), so rank 0's update does not commit either")  # named, with its reason
    assert aborted[0][1:3] == (True, 0)  # restored on the rank that did not abort too
