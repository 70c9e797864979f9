"""streamquant.rl.replica: the sender's and a receiver's copies of the last sync stay equal through full syncs
and deltas (digests checked against hashlib directly), a delta is offered only on an acknowledged sync
of the same layout, and a copy that differs from the sender's fails closed naming the tensor and rank."""

from __future__ import annotations

import hashlib

import pytest
import torch

from streamquant.rl.delta import Encoding
from streamquant.rl.replica import ReceivedCopy, SentCopy
from streamquant.update import FingerprintMismatchError


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _state(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(64, 96, generator=g).to(torch.float8_e4m3fn)
    return [("a.weight", codes), ("a.weight_scale", torch.rand(1, generator=g)),
            ("norm.weight", torch.randn(96, generator=g).bfloat16())]


def _stepped(items, seed: int) -> list[tuple[str, torch.Tensor]]:
    """A few codes and norm values moved; the scale kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, t in items:
        t = t.clone()
        if name != "a.weight_scale":
            flat = t.view(-1)
            picks = torch.randint(0, flat.numel(), (5,), generator=g)
            flat[picks] = (flat[picks].float() + 1).to(t.dtype)
        out.append((name, t))
    return out


def test_a_delta_rebuilds_the_receivers_copy_with_the_senders_digests():
    sent, received = SentCopy(), ReceivedCopy(rank=3)
    first = _state(0)
    digests = sent.full(first, digests=True)
    assert digests == {n: _sha(t) for n, t in first}
    received.start_full([n for n, _ in first])
    for name, t in first:
        received.store(name, t, digests[name])
    received.commit(sent.id, None)
    assert sent.base_for(first) is None  # not acknowledged yet
    sent.acknowledged = True
    second = _stepped(first, seed=1)
    base = sent.base_for(second)
    assert base == received.sync
    changes, payloads, digests = sent.delta(second, digests=True)
    assert [c.encoding for c in changes] == [Encoding.SPARSE, Encoding.UNCHANGED, Encoding.BITMAP]  # 5 of 96: bits win
    assert digests == {n: _sha(t) for n, t in second}
    received.begin()
    received.check_unchanged(changes, digests, rehash=True)
    by_name = {c.name: c for c in changes}
    for name, payload in payloads:
        received.apply(by_name[name], payload, digests[name])
    assert all(torch.equal(received.tensors[n].view(torch.uint8), t.view(torch.uint8)) for n, t in second)
    assert sent.base_for(second[:2]) is None  # another layout: a full sync


def test_a_copy_that_differs_from_the_senders_names_the_tensor_and_the_rank():
    sent, received = SentCopy(), ReceivedCopy(rank=3)
    first = _state(0)
    digests = sent.full(first, digests=True)
    received.start_full([n for n, _ in first])
    for name, t in first:
        received.store(name, t, digests[name])
    received.tensors["a.weight"].view(torch.uint8)[0, 0] ^= 1  # the receiver's copy is no longer the base
    sent.acknowledged = True
    changes, payloads, digests = sent.delta(_stepped(first, seed=1), digests=True)
    with pytest.raises(FingerprintMismatchError, match="rank 3: checkpoint tensor 'a.weight' as received hashes"):
        received.apply(next(c for c in changes if c.name == "a.weight"), dict(payloads)["a.weight"],
                       digests["a.weight"])
    with pytest.raises(FingerprintMismatchError, match="rank 3: checkpoint tensor 'norm.weight'"):
        received.store("norm.weight", first[2][1], "0" * 64)  # the sender says otherwise


def test_a_model_holds_the_copy_until_its_weights_change():
    received = ReceivedCopy(rank=1)
    model = torch.nn.Linear(2, 2)
    model.weights_version = 4
    received.commit(("sender", 1), model)
    assert received.holds(model)
    assert not received.holds(torch.nn.Linear(2, 2)) and not received.holds(None)
    model.weights_version = 5  # reloaded from elsewhere since
    assert not received.holds(model)
