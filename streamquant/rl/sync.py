"""Trainer -> inference weight sync over `torch.distributed`: flat buckets of mixed dtypes, or only what changed.

The RL refit path without a disk in between. The trainer's process runs a `WeightSender`, every
inference rank a `WeightReceiver`, all in one process group (gloo for CPU buckets, NCCL for CUDA
ones); each inference rank takes its tensor-parallel shards from the full tensors it receives.

    # trainer (global rank `src` of `group`)
    sender = WeightSender(group=group, src=0)
    sender.send(hf_model.named_parameters())          # raises SyncError if a receiver rejected them

    # every inference rank
    receiver = WeightReceiver(group=group, src=0)
    receiver.reload(model, atomic=True)               # = reload_weights(model, <received>, ...)

Protocol of one `send`: (1) a header broadcast as a Python object -- the plan (name, dtype, shape,
bucket, offset of every tensor), the sync's id and digests (below), or the sender's error; (2) the
buckets, each one `broadcast` of a flat uint8 buffer, double-buffered on both sides (bucket i+1
travels while bucket i is packed / consumed); (3) a report gathered from every rank: each receiver's error or None, so the trainer
learns that (and why) an inference rank refused the weights. The receiver hands out views into its
buckets; they are valid until the consumer asks for the next tensor, so `reload` tells
`reload_weights` to copy any tensor it defers (`transient_source=True`). If the consumer fails
mid-way the receiver still drains the remaining buckets, so sender and receivers stay in step and
the next `send` works.

Trainer-side quantization: `WeightSender(quantization=QuantizePlan(...))` quantizes the tensors on
the trainer (`offline.quantize_weights`: fp8 codes plus scales in checkpoint naming, about half the
bytes of bf16 on the wire) and flags the stream; receivers install the codes and scales as they are
(`reload_weights(quantized_source=True)`), bitwise what receiver-side quantization of the same
weights gives when the plan and the model agree on scheme and formula. The trainer holds the
quantized copy of every tensor while sending (about half a bf16 model).

Delta sync: `WeightSender(quantization=plan, delta=True)` keeps what it sent last (`rl/replica.py`)
and then sends only what changed: for each tensor, nothing, the changed elements' positions and
values, a bitmap and values, or the whole tensor, whichever is smallest (`rl/delta.py`; an Adam step
changes about 0.2-2% of the fp8 codes). Every receiver keeps the same copy (host memory, the whole
unsharded state) and rebuilds each changed tensor in it; `reload(model)` loads only the changed ones
(`begin_update(expected=...)`). Before a delta the sender asks (one more header and one gather of a
flag per receiver) whether every receiver's copy is the sync the delta builds on; if any is not
(a receiver restarted: a fresh `WeightReceiver`; one refused or stopped early last time) the sync is
a full one. A receiver whose model no longer holds its last sync (reloaded from elsewhere since)
takes the delta but loads every tensor from its copy. Works for any wire dtype; without
`quantization=` (bf16 deltas) the receiver loads every tensor, since receiver-side quantization
needs whole layers.

Digests (`fingerprint=True`, the default with `delta=True`): the header carries the SHA-256 of every
tensor as sent (full, checkpoint format; after this sync); each receiver hashes what it received or
rebuilt and fails closed on a mismatch (`FingerprintMismatchError` naming the tensor and the rank)
before loading that tensor; unchanged tensors are compared by the digests kept with the copy. This
checks the checkpoint-format tensors, not the model: the receiver's kernel layout (its shards,
`weights_fingerprint`) is not known on the sender. Cost: one SHA-256 pass over the changed tensors
on each side (about 1-2 GB/s per core).

The bucket layout (the plan, alignment, the two reusable buffers per side, a tensor larger than
`bucket_bytes` alone in a buffer of its own size) is `rl/buckets.py`; this module moves the buckets.
`dtype=` on the sender casts floating-point tensors while packing (e.g. fp32 master weights sent as
bf16, no temporary); fp8 codes are never cast.

The inference model's tensor-parallel group is not the sync group (that one also holds the
trainer): pass it to `load_model(..., tp=TPContext(rank, size, group=tp_group))`; the default,
the whole initialized world, would make the trainer a tensor-parallel rank.

Progress (`streamquant/progress.py`): the sender draws a bar of bytes and tensors per send where its
stderr is a terminal (`progress=None`, the default; `False`: never), cleared when the send ends so a
refit loop does not stack one line per step; a receiver draws one only when asked (`progress=True`,
or None: where its stderr is a terminal), since in one terminal the sender's bar already says it.

Failures: `SyncError` and `PeerLostError` (a peer died or went silent), in `rl/errors.py`.

The receiving side is `rl/receiver.py` (re-exported here); what both sides share, `rl/protocol.py`.

Limitations: one sender per group; a receiver that never calls `reload`/`receive` while the sender
sends blocks the sender until the group's timeout; a delta goes to every receiver or to none (one
restarted receiver makes the sync full for all).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from streamquant.fingerprint import tensor_digest
from streamquant.offline import QuantizePlan, quantize_weights
from streamquant.progress import WeightBar
from streamquant.rl.buckets import ALIGN, Bucket, BucketBuffers, entry_view, plan_buckets, wire_dtype
from streamquant.rl.delta import Change
from streamquant.rl.errors import SyncError, lost_peer
from streamquant.rl.protocol import PROTOCOL, SyncStats, default_device, describe, report, sync_bar
from streamquant.rl.receiver import WeightReceiver
from streamquant.rl.replica import SentCopy

__all__ = ["DEFAULT_BUCKET_BYTES", "SyncStats", "WeightReceiver", "WeightSender"]

DEFAULT_BUCKET_BYTES = 64 << 20


class WeightSender:
    """Broadcasts named tensors to every `WeightReceiver` of `group` (this process is global rank `src`)."""

    def __init__(self, group: dist.ProcessGroup | None = None, src: int = 0, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, quantization: QuantizePlan | None = None,
                 delta: bool = False, fingerprint: bool | None = None, progress: bool | None = None):
        if bucket_bytes < ALIGN:
            raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype= casts floating-point tensors; {dtype} is not a floating-point dtype")
        if dtype is not None and quantization is not None:
            raise ValueError(f"dtype={dtype} with quantization=: the plan sets the dtypes (its dtype "
                             f"{quantization.dtype} for what it keeps in high precision, float32 scales), and dtype= "
                             "would cast the scales too")
        if dist.get_rank() != src:
            raise ValueError(f"WeightSender(src={src}) created on global rank {dist.get_rank()}")
        self.group, self.src, self.bucket_bytes, self.dtype = group, src, bucket_bytes, dtype
        self.quantization, self.progress = quantization, progress
        self.copy = SentCopy() if delta else None  # what the last sync sent (delta=True)
        self.fingerprint = delta if fingerprint is None else fingerprint
        self.buffers = BucketBuffers(torch.device(device) if device is not None else default_device(group))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Send every tensor (e.g. `model.named_parameters()`); raises `SyncError` if a receiver refused them,
        or died or stopped answering (within the group's timeout)."""
        with lost_peer("a receiving rank of the sync group"):
            try:
                return self._send(named_tensors)
            except BaseException:
                if self.copy is not None:
                    self.copy.acknowledged = False  # the receivers' copies are unknown: the next sync is full
                raise

    def _header(self, header: dict) -> int:
        """Broadcast one header object; its pickled bytes."""
        dist.broadcast_object_list([{"protocol": PROTOCOL, "error": None, **header}], src=self.src, group=self.group)
        return len(pickle.dumps(header))

    def _items(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The tensors as they travel: quantized (`quantization=`), in their wire dtype where they are
        compared or hashed (`delta`, `fingerprint`; otherwise cast while packing)."""
        items = [(name, tensor.detach()) for name, tensor in named_tensors]
        if self.quantization is not None:
            items = list(quantize_weights(items, self.quantization))
        if self.copy is not None or self.fingerprint:
            items = [(name, t.to(wire_dtype(t, self.dtype))) for name, t in items]
        return items

    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        start, header_bytes, delta = time.perf_counter(), 0, False
        try:
            items = self._items(named_tensors)
            base = self.copy.base_for(items) if self.copy is not None else None
        except BaseException as exc:
            self._header({"error": describe(exc)})
            raise
        if base is not None:  # may every receiver take a delta on `base`?
            header_bytes += self._header({"ask": base})
            delta = all(answer for answer in report(self.group, None) if answer is not None)
        try:
            payload, sync, digests, changes = self._payload(items, base if delta else None)
            plan = plan_buckets(payload, self.bucket_bytes, self.dtype)
        except BaseException as exc:
            self._header({"error": describe(exc)})
            raise
        header_bytes += self._header({"bucket_bytes": self.bucket_bytes, "plan": plan, "sync": sync,
                                      "digests": digests, "quantized": self.quantization is not None})
        with sync_bar(self.progress, "send", plan, leave=False) as bar:
            self._broadcast(plan, dict(payload), bar)
        refused = [f"rank {r}: {e}" for r, e in enumerate(report(self.group, None)) if e is not None]
        if refused:
            raise SyncError("receiver(s) refused the weights: " + "; ".join(refused))
        if self.copy is not None:
            self.copy.acknowledged = True
        return SyncStats(len(payload), header_bytes + sum(e.nbytes for b in plan for e in b.entries), len(plan),
                         time.perf_counter() - start, header_bytes, delta, tuple(changes))

    def _payload(self, items: list[tuple[str, torch.Tensor]], base: tuple[str, int] | None
                 ) -> tuple[list[tuple[str, torch.Tensor]], dict | None, dict[str, str] | None, list[Change]]:
        """(what travels, the sync header, the digests, the changes): every tensor, or (`base`) the changes."""
        if self.copy is None:
            return items, None, ({n: tensor_digest(t) for n, t in items} if self.fingerprint else None), []
        if base is None:
            digests = self.copy.full(items, self.fingerprint)
            return items, {"id": self.copy.id}, digests, []
        changes, payloads, digests = self.copy.delta(items, self.fingerprint)
        return payloads, {"id": self.copy.id, "base": base, "changes": changes}, digests, changes

    def _broadcast(self, plan: list[Bucket], tensors: dict[str, torch.Tensor], bar: WeightBar | None) -> None:
        """The buckets, packed and broadcast two at a time; `bar` moves as each has left."""
        works: list[Any] = [None, None]
        with torch.no_grad():
            for i, bucket in enumerate(plan):
                if works[i % 2] is not None:
                    _sent(*works[i % 2], bar)  # the buffer's previous bucket has left
                buf = self.buffers.get(i, bucket.nbytes, self.bucket_bytes)
                for entry in bucket.entries:
                    entry_view(buf, entry).copy_(tensors[entry.name])  # casts to the entry's dtype if asked
                work = dist.broadcast(buf[:bucket.nbytes], src=self.src, group=self.group, async_op=True)
                works[i % 2] = (buf, work, bucket)  # the buffer stays alive until its broadcast is done
        for pending in works:
            if pending is not None:
                _sent(*pending, bar)


def _sent(buf: torch.Tensor, work: Any, bucket: Bucket, bar: WeightBar | None) -> None:
    """Wait until `bucket` (in `buf`, kept alive until now) has left; count it on `bar`."""
    work.wait()
    if bar is not None:
        bar.update(sum(e.nbytes for e in bucket.entries), len(bucket.entries))
