"""How a weight sync fails (`rl/errors.py`): a backend's error for a dead or silent peer, raised inside
`lost_peer(who)`, becomes a `PeerLostError` (a `SyncError`) naming the lost peer and this rank, chained to
the original; every other exception passes through unchanged. A real silent peer over gloo:
tests/rl/test_sync.py::test_a_silent_peer_becomes_a_sync_error_naming_it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import streamquant.rl.errors as errors
from streamquant.rl.errors import PeerLostError, SyncError, lost_peer


@pytest.fixture(autouse=True)
def rank_three(monkeypatch):
    """This process is rank 3 of a sync group (no process group is joined)."""
    monkeypatch.setattr(errors, "dist", SimpleNamespace(get_rank=lambda: 3))


def test_a_lost_peer_is_named_with_this_rank():
    original = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242\nmore")
    with pytest.raises(PeerLostError) as info:
        with lost_peer("the sender (global rank 0)"):
            raise original
    assert str(info.value) == ("rank 3: lost the sender (global rank 0) during the weight sync: "
                               "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    assert info.value.__cause__ is original
    assert isinstance(info.value, SyncError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("exc", [RuntimeError("shape mismatch"), SyncError("rank 1: refused: timed out"),
                                 ValueError("timed out"), KeyError("x")], ids=repr)
def test_other_errors_pass_through_unchanged(exc):
    with pytest.raises(type(exc)) as info:
        with lost_peer("a receiving rank"):
            raise exc
    assert info.value is exc


def test_nothing_happens_without_an_error():
    ran = []
    with lost_peer("a receiving rank"):
        ran.append("body")
    assert ran == ["body"]
