"""How a weight sync fails: `SyncError`, `PeerLostError`, and the translation of a backend's error
for a dead or silent peer into `PeerLostError`.

`SyncError` is every failure `rl/sync.py` raises on purpose: the sender could not send, a receiver
refused the weights, or the two sides speak different protocols; the message says which rank and
why. `PeerLostError` (a `SyncError`) is a collective of the sync group that failed because a peer
died or stopped answering within the group's timeout: `lost_peer(who)` turns the backend's own
error (gloo / NCCL wording, recognised by `parallel.context.is_peer_failure`) into one naming the
lost peer and this rank, chained to the original. Any other exception passes through unchanged.

Limitations: recognising a peer failure reads the backend's message, so a backend that words it
differently passes through as its own error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from streamquant.parallel.context import is_peer_failure


class SyncError(RuntimeError):
    """The sender could not send, or a receiver refused the weights (the message says which and why)."""


class PeerLostError(SyncError):
    """A peer of the sync group died or stopped answering (the group's timeout ran out)."""


@contextmanager
def lost_peer(who: str) -> Iterator[None]:
    """A collective that fails because `who` died or stopped answering (the group's timeout) raises
    `PeerLostError` naming them and this rank, instead of a backend error."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, SyncError) or not is_peer_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(f"rank {dist.get_rank()}: lost {who} during the weight sync: {first}") from exc
