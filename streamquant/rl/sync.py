"""Trainer -> inference weight sync over `torch.distributed`: flat buckets of mixed dtypes.

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
bucket, offset of every tensor) or the sender's error; (2) the buckets, each one `broadcast` of a
flat uint8 buffer, double-buffered on both sides (bucket i+1 travels while bucket i is packed /
consumed); (3) a report gathered from every rank: each receiver's error or None, so the trainer
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

Limitations: one sender per group; a receiver that never calls `reload`/`receive` while the sender
sends blocks the sender until the group's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from streamquant.offline import QuantizePlan, quantize_weights
from streamquant.progress import WeightBar, counted, wants_progress
from streamquant.reload import Reloader, reload_weights
from streamquant.rl.buckets import ALIGN, Bucket, BucketBuffers, entry_view, plan_buckets
from streamquant.rl.errors import PeerLostError, SyncError, lost_peer

DEFAULT_BUCKET_BYTES = 64 << 20
PROTOCOL = 1

T = TypeVar("T")


@dataclass(frozen=True)
class SyncStats:
    """What one `send` moved."""

    tensors: int
    bytes: int
    buckets: int
    seconds: float


def _default_device(group: dist.ProcessGroup | None) -> torch.device:
    """Buckets live where the backend moves data: CUDA for NCCL, host memory otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _report(group: dist.ProcessGroup | None, error: str | None) -> list[str | None]:
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, error, group=group)
    return reports


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class WeightSender:
    """Broadcasts named tensors to every `WeightReceiver` of `group` (this process is global rank `src`)."""

    def __init__(self, group: dist.ProcessGroup | None = None, src: int = 0, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, quantization: QuantizePlan | None = None,
                 progress: bool | None = None):
        if bucket_bytes < ALIGN:
            raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype= casts floating-point tensors; {dtype} is not a floating-point dtype")
        if dist.get_rank() != src:
            raise ValueError(f"WeightSender(src={src}) created on global rank {dist.get_rank()}")
        self.group, self.src, self.bucket_bytes, self.dtype = group, src, bucket_bytes, dtype
        self.quantization, self.progress = quantization, progress
        self.buffers = BucketBuffers(torch.device(device) if device is not None else _default_device(group))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Send every tensor (e.g. `model.named_parameters()`); raises `SyncError` if a receiver refused them,
        or died or stopped answering (within the group's timeout)."""
        with lost_peer("a receiving rank of the sync group"):
            return self._send(named_tensors)

    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        start = time.perf_counter()
        try:
            items = [(name, tensor.detach()) for name, tensor in named_tensors]
            if self.quantization is not None:
                items = list(quantize_weights(items, self.quantization))
            plan = plan_buckets(items, self.bucket_bytes, self.dtype)
        except BaseException as exc:
            dist.broadcast_object_list([{"protocol": PROTOCOL, "error": _describe(exc)}], src=self.src, group=self.group)
            raise
        dist.broadcast_object_list([{"protocol": PROTOCOL, "error": None, "bucket_bytes": self.bucket_bytes,
                                     "plan": plan, "quantized": self.quantization is not None}],
                                   src=self.src, group=self.group)
        with _sync_bar(self.progress, "send", plan, leave=False) as bar:
            self._broadcast(plan, dict(items), bar)
        refused = [f"rank {r}: {e}" for r, e in enumerate(_report(self.group, None)) if e is not None]
        if refused:
            raise SyncError("receiver(s) refused the weights: " + "; ".join(refused))
        return SyncStats(len(items), sum(e.nbytes for b in plan for e in b.entries), len(plan),
                         time.perf_counter() - start)

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


@contextmanager
def _sync_bar(progress: bool | None, desc: str, plan: list[Bucket], leave: bool) -> Iterator[WeightBar | None]:
    """The bar of one send or receive (None where none is drawn), its totals from the plan."""
    if not wants_progress(progress):
        yield None
        return
    tensors, nbytes = sum(len(b.entries) for b in plan), sum(e.nbytes for b in plan for e in b.entries)
    with WeightBar(desc, total_bytes=nbytes, total_tensors=tensors, leave=leave) as bar:
        yield bar


class WeightReceiver:
    """Receives what a `WeightSender` (global rank `src` of `group`) sends."""

    def __init__(self, group: dist.ProcessGroup | None = None, src: int = 0, *,
                 device: torch.device | str | None = None, progress: bool | None = False):
        if dist.get_rank() == src:
            raise ValueError(f"WeightReceiver on global rank {src}, the sender's rank")
        self.group, self.src, self.progress = group, src, progress
        self.quantized = False  # set by each `receive` from the sender's header
        self.buffers = BucketBuffers(torch.device(device) if device is not None else _default_device(group))

    def receive(self, consume: Callable[[Iterator[tuple[str, torch.Tensor]]], T]) -> T:
        """Run `consume` on the received `(name, tensor)` stream; each tensor is a view into a bucket,
        valid until the next one is requested. The stream is drained even if `consume` fails, and
        the outcome is reported to the sender."""
        box: list[Any] = [None]
        sender = f"the sender (global rank {self.src})"
        with lost_peer(sender):
            dist.broadcast_object_list(box, src=self.src, group=self.group)
        header = box[0]
        if header.get("protocol") != PROTOCOL:
            raise SyncError(f"sender speaks protocol {header.get('protocol')}, this receiver {PROTOCOL}")
        if header["error"] is not None:
            raise SyncError(f"the sender failed before sending: {header['error']}")
        self.quantized = bool(header.get("quantized"))  # the stream is pre-quantized fp8 codes and scales
        stream = self._stream(header["plan"], header["bucket_bytes"], sender)
        error, lost = None, False
        with _sync_bar(self.progress, "receive", header["plan"], leave=False) as bar:
            try:
                return consume(counted(stream, bar) if bar is not None else stream)
            except BaseException as exc:
                error = _describe(exc)
                lost = isinstance(exc, PeerLostError)
                raise
            finally:
                if not lost:  # with the sender gone, nobody would take the rest of the stream or the report
                    with lost_peer(sender):
                        stream.close()  # receives any buckets the consumer did not ask for
                        _report(self.group, error)

    def reload(self, target: torch.nn.Module | Reloader, **reload_options: Any) -> set[str]:
        """`reload_weights(model, <the sent tensors>, **reload_options)`, or `reloader(<the sent tensors>)`
        for a `Reloader`; deferred tensors are copied out of the bucket (`transient_source=True`)."""
        if isinstance(target, Reloader):
            return self.receive(lambda tensors: target(tensors, transient_source=True,
                                                       quantized_source=self.quantized, **reload_options))
        return self.receive(lambda tensors: reload_weights(target, tensors, transient_source=True,
                                                           quantized_source=self.quantized, **reload_options))

    def _stream(self, plan: list[Bucket], bucket_bytes: int, sender: str) -> Iterator[tuple[str, torch.Tensor]]:
        def post(i: int) -> tuple[torch.Tensor, Any]:
            buf = self.buffers.get(i, plan[i].nbytes, bucket_bytes)
            return buf, dist.broadcast(buf[:plan[i].nbytes], src=self.src, group=self.group, async_op=True)

        inflight = post(0) if plan else None
        posted = 1
        try:
            for i, bucket in enumerate(plan):
                buf, work = inflight
                with lost_peer(sender):
                    work.wait()
                inflight = None
                if posted < len(plan):  # the other buffer's bucket was consumed: receive the next into it
                    inflight, posted = post(posted), posted + 1
                for entry in bucket.entries:
                    yield entry.name, entry_view(buf, entry)
        finally:
            if inflight is not None:
                inflight[1].wait()
            while posted < len(plan):
                post(posted)[1].wait()
                posted += 1
