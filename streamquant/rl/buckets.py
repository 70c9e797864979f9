"""The bucket layout of one weight sync: which tensor travels in which flat buffer, at which offset.

Pure data layout, no collectives: `plan_buckets` packs named tensors, in order, into `Bucket`s of
`Entry`s (name, wire dtype, shape, byte offset, byte size); `entry_view` is an entry's typed view
into a flat uint8 buffer; `BucketBuffers` holds the two reusable buffers one side packs into or
receives into. `rl/sync.py` moves the buckets (`WeightSender` / `WeightReceiver`).

Invariants of a plan: the tensors keep their order; names are unique; every entry starts at a
multiple of `ALIGN` bytes in its bucket (any dtype can view it) and entries of a bucket do not
overlap; a bucket holds at most `bucket_bytes`, except a tensor larger than that, which travels
alone in a bucket of its own size. `dtype=` sets the wire dtype of floating-point tensors (e.g. fp32
master weights sent as bf16, cast while packing, no temporary); fp8 codes (one-byte floats) and
integer tensors keep their own.

Buffers are kept between sends (two of `bucket_bytes` per side, allocated on first use, grown when a
plan needs more); an oversized tensor's buffer is made for it and not kept.

Limitations: the plan travels as a pickled object (`Entry`, `Bucket`), so sender and receivers must
run the same streamquant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.loading.materialize import FLAT_ALIGN, align_up, byte_view

ALIGN = FLAT_ALIGN  # every tensor starts at a multiple of this many bytes in its bucket


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # e.g. "bfloat16" (torch attribute name)
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: tuple[Entry, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` travels in: `dtype` for floating-point tensors wider than a byte (never fp8 codes)."""
    cast = dtype is not None and tensor.is_floating_point() and tensor.dtype.itemsize > 1
    return dtype if cast else tensor.dtype


def plan_buckets(items: list[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None = None) -> list[Bucket]:
    """Pack tensors, in order, into buckets of at most `bucket_bytes` (one bigger tensor: a bucket of its own)."""
    buckets: list[Bucket] = []
    entries: list[Entry] = []
    used = 0
    seen: set[str] = set()
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        if tensor.is_meta:
            raise ValueError(f"{name!r} is on the meta device (no data to send)")
        if name in seen:
            raise ValueError(f"{name!r} appears twice in the tensors to send")
        seen.add(name)
        out_dtype = wire_dtype(tensor, dtype)
        nbytes = tensor.numel() * out_dtype.itemsize
        start = align_up(used, ALIGN)
        if entries and start + nbytes > bucket_bytes:
            buckets.append(Bucket(used, tuple(entries)))
            entries, start = [], 0
        entries.append(Entry(name, _dtype_name(out_dtype), tuple(tensor.shape), start, nbytes))
        used = start + nbytes
    if entries:
        buckets.append(Bucket(used, tuple(entries)))
    return buckets


def entry_view(buffer: torch.Tensor, entry: Entry) -> torch.Tensor:
    """`entry`'s tensor: a view of its dtype and shape into the flat uint8 `buffer` of its bucket."""
    return byte_view(buffer, entry.offset, entry.shape, getattr(torch, entry.dtype))


class BucketBuffers:
    """Two reusable flat buffers (ping-pong), grown when a plan needs more."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: list[torch.Tensor | None] = [None, None]

    def get(self, index: int, nbytes: int, bucket_bytes: int) -> torch.Tensor:
        if nbytes > bucket_bytes:  # a tensor bigger than a bucket: its own buffer, not kept
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        slot = index % 2
        buf = self.slots[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.slots[slot] = torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device)
        return buf
