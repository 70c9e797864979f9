"""The receiving side of a weight sync (`rl/sync.py` describes the protocol): `WeightReceiver`, and
`Arrivals`, the buckets of one plan as they arrive.

For a delta sender (`WeightSender(delta=True)`) the receiver keeps a `ReceivedCopy` of the last sync
(`rl/replica.py`: the whole checkpoint-format state, unsharded, in host memory) and rebuilds every
changed tensor in it: `receive` yields full tensors in every case, and `reload(model)` loads only
the changed ones into a model that holds the last sync (`begin_update(expected=<changed names>)`:
unchanged tensors are not touched). Every tensor is checked against the sender's SHA-256 digest
when the header carries them; a mismatch fails closed (`FingerprintMismatchError`, naming the tensor
and this rank) before that tensor is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from streamquant.fingerprint import tensor_digest
from streamquant.progress import counted
from streamquant.reload import Reloader, reload_weights
from streamquant.rl.buckets import Bucket, BucketBuffers, entry_view
from streamquant.rl.delta import Encoding
from streamquant.rl.errors import PeerLostError, SyncError, lost_peer
from streamquant.rl.protocol import PROTOCOL, default_device, describe, report, sync_bar
from streamquant.rl.replica import ReceivedCopy, compare_digest

T = TypeVar("T")


class Arrivals:
    """The buckets of one plan as they arrive, two in flight (bucket i+1 is received while bucket i is
    consumed); each tensor is a view into its bucket, valid until the next is asked for. `drain()`
    receives whatever the consumer did not ask for, started or not, so both sides stay in step."""

    def __init__(self, receiver: "WeightReceiver", plan: list[Bucket], bucket_bytes: int, sender: str):
        self.receiver, self.plan, self.bucket_bytes, self.sender = receiver, plan, bucket_bytes, sender
        self.posted = 0
        self.inflight: tuple[torch.Tensor, Any] | None = None

    def _post(self) -> tuple[torch.Tensor, Any]:
        r, bucket = self.receiver, self.plan[self.posted]
        buf = r.buffers.get(self.posted, bucket.nbytes, self.bucket_bytes)
        self.posted += 1
        return buf, dist.broadcast(buf[:bucket.nbytes], src=r.src, group=r.group, async_op=True)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.plan and self.posted == 0:
            self.inflight = self._post()
        for bucket in self.plan:
            buf, work = self.inflight
            with lost_peer(self.sender):
                work.wait()
            self.inflight = None
            if self.posted < len(self.plan):  # the other buffer's bucket was consumed: receive the next into it
                self.inflight = self._post()
            for entry in bucket.entries:
                yield entry.name, entry_view(buf, entry)

    def drain(self) -> None:
        with lost_peer(self.sender):
            if self.inflight is not None:
                self.inflight[1].wait()
                self.inflight = None
            while self.posted < len(self.plan):
                self._post()[1].wait()


class WeightReceiver:
    """Receives what a `WeightSender` (global rank `src` of `group`) sends."""

    def __init__(self, group: dist.ProcessGroup | None = None, src: int = 0, *,
                 device: torch.device | str | None = None, progress: bool | None = False):
        if dist.get_rank() == src:
            raise ValueError(f"WeightReceiver on global rank {src}, the sender's rank")
        self.group, self.src, self.progress = group, src, progress
        self.quantized = False  # set by each `receive` from the sender's header
        self.expected: frozenset[str] | None = None  # set by each `receive`: the names of a partial stream
        self.copy: ReceivedCopy | None = None  # the last sync of a delta sender (host memory)
        self.buffers = BucketBuffers(torch.device(device) if device is not None else default_device(group))

    def _header(self, sender: str) -> dict:
        box: list[Any] = [None]
        with lost_peer(sender):
            dist.broadcast_object_list(box, src=self.src, group=self.group)
        header = box[0]
        if header.get("protocol") != PROTOCOL:
            raise SyncError(f"sender speaks protocol {header.get('protocol')}, this receiver {PROTOCOL}")
        if header["error"] is not None:
            raise SyncError(f"the sender failed before sending: {header['error']}")
        return header

    def receive(self, consume: Callable[[Iterator[tuple[str, torch.Tensor]]], T], *,
                model: torch.nn.Module | None = None) -> T:
        """Run `consume` on the received `(name, tensor)` stream of full tensors; each is valid until the
        next one is requested. The stream is drained even if `consume` fails, and the outcome is
        reported to the sender. A delta sync yields every tensor (unchanged ones from this receiver's
        copy), or, with `model` (which `consume` updates and commits) when `model` holds this
        receiver's last sync, only the changed ones: `self.expected` names them (None: every tensor)."""
        sender = f"the sender (global rank {self.src})"
        header = self._header(sender)
        if "ask" in header:  # a delta on the sync the sender names: can this receiver take it?
            with lost_peer(sender):
                report(self.group, self.copy is not None and self.copy.sync == header["ask"])
            header = self._header(sender)
        self.quantized = bool(header.get("quantized"))  # the stream is pre-quantized fp8 codes and scales
        sync = header["sync"]
        if sync is None:
            self.copy = None  # not a delta sender: nothing to keep
        elif self.copy is None:
            self.copy = ReceivedCopy(dist.get_rank())
        changed_only = bool(sync and "changes" in sync and self.quantized and self.copy.holds(model))
        self.expected = frozenset(c.name for c in sync["changes"] if c.encoding is not Encoding.UNCHANGED) \
            if changed_only else None
        arrivals = Arrivals(self, header["plan"], header["bucket_bytes"], sender)
        done: list[bool] = []
        stream = self._tensors(header, iter(arrivals), changed_only, done)
        error, lost = None, False
        with sync_bar(self.progress, "receive", header["plan"], leave=False) as bar:
            try:
                result = consume(counted(stream, bar) if bar is not None else stream)
                if done and sync is not None:
                    self.copy.commit(sync["id"], model)
                return result
            except BaseException as exc:
                error = describe(exc)
                lost = isinstance(exc, PeerLostError)
                raise
            finally:
                if not lost:  # with the sender gone, nobody would take the rest of the stream or the report
                    stream.close()
                    arrivals.drain()  # receives any buckets the consumer did not ask for
                    with lost_peer(sender):
                        report(self.group, error)

    def _tensors(self, header: dict, arrivals: Iterator[tuple[str, torch.Tensor]], changed_only: bool,
                 done: list[bool]) -> Iterator[tuple[str, torch.Tensor]]:
        """The full tensors of one sync, each checked against the sender's digest where it sent them;
        `done` gets an entry once the last one was consumed."""
        sync, digests = header["sync"], header["digests"] or {}
        if sync is None:
            for name, tensor in arrivals:
                if name in digests:
                    compare_digest(dist.get_rank(), name, tensor_digest(tensor), digests[name])
                yield name, tensor
        elif "changes" not in sync:  # a full sync of a delta sender: every tensor into the copy
            self.copy.start_full([e.name for b in header["plan"] for e in b.entries])
            for name, tensor in arrivals:
                yield name, self.copy.store(name, tensor, digests.get(name))
        else:
            yield from self._delta(sync, digests, arrivals, changed_only)
        done.append(True)

    def _delta(self, sync: dict, digests: dict[str, str], arrivals: Iterator[tuple[str, torch.Tensor]],
               changed_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        copy = self.copy
        if copy is None or copy.sync != sync["base"]:
            raise SyncError(f"rank {dist.get_rank()}: a delta on sync {sync['base']}, but this receiver holds "
                            f"{copy.sync if copy is not None else None}")
        copy.begin()  # invalid until this sync was consumed to the end
        changes = {c.name: c for c in sync["changes"]}
        copy.check_unchanged(sync["changes"], digests or None, rehash=not changed_only)
        if not changed_only:
            for change in sync["changes"]:
                if change.encoding is Encoding.UNCHANGED:
                    yield change.name, copy.tensors[change.name]
        for name, payload in arrivals:
            yield name, copy.apply(changes[name], payload, digests.get(name))

    def reload(self, target: torch.nn.Module | Reloader, **reload_options: Any) -> set[str]:
        """`reload_weights(model, <the sent tensors>, **reload_options)`, or `reloader(<the sent tensors>)`
        for a `Reloader`; deferred tensors are copied out of the bucket (`transient_source=True`). A
        delta sync into the model that took this receiver's last sync loads only the changed tensors
        (`expected=`)."""
        model = target.model if isinstance(target, Reloader) else target

        def consume(tensors: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
            options = {"transient_source": True, "quantized_source": self.quantized, "expected": self.expected,
                       **reload_options}
            return target(tensors, **options) if isinstance(target, Reloader) else reload_weights(target, tensors,
                                                                                                   **options)

        return self.receive(consume, model=model)
