"""The copies both sides of a delta sync keep of the last sync: `SentCopy` (sender) and `ReceivedCopy` (receiver).

A delta is only meaningful against a base both sides hold bit for bit. Each sync of a delta sender
has an id `(sender uid, number)`; the sender's `SentCopy` holds the tensors of its last sync as sent
(full checkpoint-format tensors in their wire dtype: fp8 codes, scales, bf16 weights) and their
SHA-256 digests; a receiver's `ReceivedCopy` holds the same tensors, rebuilt from what arrived, in
host memory, and the id of the sync they are. The sender offers a delta only against its last sync,
when every receiver acknowledged it and the new tensors have the same names, dtypes and shapes; a
receiver takes it only when its copy is that sync (`sync.py` asks before sending).

Memory: the sender keeps one copy of what it sends (for fp8, about half a bf16 model) where the
tensors live (the trainer's device); every receiver one copy of the whole, unsharded state in host
memory -- at tensor parallelism N the host holds N copies. A receiver's copy is valid only after a
sync it consumed to the end without error; anything else (an early stop, a refusal, a digest
mismatch) leaves it invalid, so the next sync is a full one.

Digests: `tensor_digest` (SHA-256 of the bytes, `fingerprint.py`) of every tensor as sent, recomputed
for the changed ones only (about 1-2 GB/s per core on both sides). They describe the checkpoint
format; the receiver's kernel layout (`weights_fingerprint`) depends on its tensor-parallel shards,
which the sender does not know, so it cannot be predicted on the sender.
"""

from __future__ import annotations

import uuid
import weakref

import torch

from streamquant.fingerprint import tensor_digest
from streamquant.rl.delta import Change, Encoding, apply_, encode
from streamquant.update import FingerprintMismatchError

SyncId = tuple[str, int]


def _layout(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, tuple(t.shape)) for name, t in items]


def compare_digest(rank: int, name: str, got: str, want: str | None) -> None:
    """Raise `FingerprintMismatchError` naming the tensor and the rank unless `got` is the sender's digest."""
    if want is not None and got != want:
        raise FingerprintMismatchError(f"rank {rank}: checkpoint tensor {name!r} as received hashes {got[:16]}..., "
                                       f"the sender's digest is {want[:16]}...")


class SentCopy:
    """What a delta sender sent last, and whether every receiver took it."""

    def __init__(self):
        self.uid = uuid.uuid4().hex
        self.number = 0  # syncs prepared so far
        self.tensors: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}
        self.acknowledged = False  # every receiver reported success for sync `number`

    @property
    def id(self) -> SyncId:
        return self.uid, self.number

    def base_for(self, items: list[tuple[str, torch.Tensor]]) -> SyncId | None:
        """The sync a delta to `items` would build on, or None when only a full send will do."""
        if not self.acknowledged or _layout(items) != _layout(list(self.tensors.items())):
            return None
        return self.id

    def full(self, items: list[tuple[str, torch.Tensor]], digests: bool) -> dict[str, str] | None:
        """Keep `items` as the new sync (copies); their digests when asked."""
        self.acknowledged, self.number = False, self.number + 1
        same = _layout(items) == _layout(list(self.tensors.items()))
        kept = {}
        for name, tensor in items:
            kept[name] = self.tensors[name].copy_(tensor) if same else tensor.detach().clone()
        self.tensors = kept
        self.digests = {name: tensor_digest(t) for name, t in kept.items()} if digests else {}
        return dict(self.digests) if digests else None

    def delta(self, items: list[tuple[str, torch.Tensor]], digests: bool
              ) -> tuple[list[Change], list[tuple[str, torch.Tensor]], dict[str, str] | None]:
        """Every tensor's change against the last sync, the payloads of those that changed, the new
        digests; the copy becomes the new sync."""
        self.acknowledged, self.number = False, self.number + 1
        changes, payloads = [], []
        for name, tensor in items:
            change, payload = encode(name, self.tensors[name], tensor)
            changes.append(change)
            if payload is not None:
                payloads.append((name, payload))
                self.tensors[name].copy_(tensor)
                if digests:
                    self.digests[name] = tensor_digest(self.tensors[name])
        return changes, payloads, (dict(self.digests) if digests else None)


class ReceivedCopy:
    """A receiver's copy of the last sync (host memory), rebuilt from full sends and deltas."""

    def __init__(self, rank: int):
        self.rank = rank  # named in a digest mismatch
        self.sync: SyncId | None = None  # the sync the copy holds; None while invalid
        self.tensors: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}
        self.model: weakref.ref | None = None  # the model the last sync was applied to, and its version then
        self.model_version = -1

    def begin(self) -> None:
        """A sync starts: the copy is invalid until `commit`."""
        self.sync = None

    def start_full(self, names: list[str]) -> None:
        """A full sync of `names`: drop tensors it no longer holds."""
        self.begin()
        self.tensors = {n: self.tensors[n] for n in names if n in self.tensors}
        self.digests = {}

    def store(self, name: str, tensor: torch.Tensor, want: str | None) -> torch.Tensor:
        """Keep a full tensor of a full sync (copied into the old storage where it fits)."""
        old = self.tensors.get(name)
        if old is None or old.dtype != tensor.dtype or old.shape != tensor.shape:
            old = self.tensors[name] = torch.empty(tensor.shape, dtype=tensor.dtype)
        old.copy_(tensor)
        self._check(name, want)
        return old

    def apply(self, change: Change, payload: torch.Tensor, want: str | None) -> torch.Tensor:
        """Rebuild a changed tensor in place from its payload; the full tensor."""
        base = self.tensors.get(change.name)
        if base is None:
            raise FingerprintMismatchError(f"rank {self.rank}: a delta for {change.name!r}, which this receiver's copy "
                                           "does not hold")
        apply_(base, change, payload)
        self._check(change.name, want)
        return base

    def check_unchanged(self, changes: list[Change], digests: dict[str, str] | None, rehash: bool) -> None:
        """Before anything is applied: the tensors the delta leaves alone hash as the sender says (by the
        digests kept with the copy; `rehash`: hashed again, where they are about to be loaded)."""
        if digests is None:
            return
        for change in changes:
            if change.encoding is Encoding.UNCHANGED:
                if change.name not in self.tensors:
                    raise FingerprintMismatchError(f"rank {self.rank}: checkpoint tensor {change.name!r} is not in "
                                                   "this receiver's copy")
                self._check(change.name, digests.get(change.name), rehash)

    def _check(self, name: str, want: str | None, rehash: bool = True) -> None:
        if want is None:
            return
        if rehash or name not in self.digests:
            self.digests[name] = tensor_digest(self.tensors[name])
        compare_digest(self.rank, name, self.digests[name], want)

    def commit(self, sync: SyncId, model: torch.nn.Module | None) -> None:
        """The sync was consumed to its end without error: the copy is `sync`, `model` holds it."""
        self.sync = sync
        self.model = weakref.ref(model) if model is not None else None
        self.model_version = getattr(model, "weights_version", -1)

    def holds(self, model: torch.nn.Module | None) -> bool:
        """`model` holds exactly this copy: the one the last sync went into, unchanged since."""
        return (model is not None and self.model is not None and self.model() is model
                and getattr(model, "weights_version", None) == self.model_version)
