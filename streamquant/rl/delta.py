"""One tensor's change since the last sync, in as few bytes as possible: encode on the sender, apply on
the receiver. Pure tensor code, no collectives (`rl/replica.py` keeps the copies, `rl/sync.py` moves them).

Elements are compared by their bits (an integer view of the same width), so any dtype works -- fp8
codes, fp32 scales, bf16 weights -- and NaN payloads compare exactly. `encode(old, new)` picks the
smallest of three payloads for the `count` elements that changed, out of `numel`, `itemsize` bytes each:
  - `FULL`: the new tensor (`numel * itemsize` bytes);
  - `SPARSE`: the changed positions as 16-bit offsets inside chunks of 65,536 elements, an int32
    count per chunk, then the new values (`4 * chunks + (2 + itemsize) * count`): 3 bytes per
    changed fp8 code, against 5 for int32 positions;
  - `BITMAP`: one bit per element, then the new values (`numel / 8 + itemsize * count`).
So SPARSE wins below about 6% changed elements, BITMAP up to about 90% (fp8) or 94% (bf16), FULL
above. What Adam steps at learning rates 1e-6 and 1e-5 change is measured by `benchmarks/delta_sync.py`
(fp8 codes: about 0.2% and 2% per step on the demo model; bf16 weights 1% and 8%; fp8 block scales
almost never): SPARSE for codes, SPARSE or BITMAP for bf16 tensors. Whole tiles were considered and
lose: a tile whose scale changes flips only the codes near a rounding boundary, so its changes stay sparse.

A payload is one flat uint8 tensor (one bucket entry); its parts start at multiples of 8 bytes, so
each can be viewed in its own dtype where the bucket entry starts aligned.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

CHUNK_BITS = 16
CHUNK = 1 << CHUNK_BITS  # elements per SPARSE chunk: an offset inside one fits in 16 bits
OFFSET_BIAS = 1 << 15  # offsets travel as int16 (offset - 32768): torch's uint16 lacks most ops
PART_ALIGN = 8
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Encoding(enum.Enum):
    UNCHANGED = "unchanged"  # nothing travels
    FULL = "full"
    SPARSE = "sparse"
    BITMAP = "bitmap"


@dataclass(frozen=True)
class Change:
    """How one tensor travelled in a delta sync (`UNCHANGED`: it did not)."""

    name: str
    encoding: Encoding
    count: int  # elements that changed
    numel: int
    dtype: str  # the tensor's dtype (torch attribute name)
    nbytes: int  # payload bytes on the wire


def element_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width (their bits), flat, C order."""
    if tensor.element_size() not in BITS:
        raise ValueError(f"delta sync compares elements of 1, 2, 4 or 8 bytes; {tensor.dtype} has "
                         f"{tensor.element_size()}")
    return tensor.contiguous().reshape(-1).view(BITS[tensor.element_size()])


def _up(nbytes: int) -> int:
    return -(-nbytes // PART_ALIGN) * PART_ALIGN


def _chunks(numel: int) -> int:
    return -(-numel // CHUNK)


def parts(encoding: Encoding, numel: int, itemsize: int, count: int) -> list[tuple[int, int]]:
    """(offset, bytes) of each part of a payload, in order (see the module doc)."""
    if encoding is Encoding.FULL:
        sizes = [numel * itemsize]
    elif encoding is Encoding.SPARSE:
        sizes = [4 * _chunks(numel), 2 * count, itemsize * count]
    elif encoding is Encoding.BITMAP:
        sizes = [-(-numel // 8), itemsize * count]
    else:
        sizes = []
    out, at = [], 0
    for size in sizes:
        out.append((at, size))
        at += _up(size)
    return out


def payload_bytes(encoding: Encoding, numel: int, itemsize: int, count: int) -> int:
    layout = parts(encoding, numel, itemsize, count)
    return layout[-1][0] + layout[-1][1] if layout else 0


def choose(numel: int, itemsize: int, count: int) -> Encoding:
    """The smallest payload for `count` changed elements out of `numel` (FULL on a tie)."""
    if count == 0:
        return Encoding.UNCHANGED
    return min((Encoding.FULL, Encoding.SPARSE, Encoding.BITMAP),
               key=lambda e: payload_bytes(e, numel, itemsize, count))


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit i of byte j is element 8j + i (numpy's little bit order; numpy on the host, ~50x torch's ops)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    padded = torch.zeros(-(-mask.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:mask.numel()] = mask
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little")).view(torch.bool)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:numel].bool()


def _part(payload: torch.Tensor, layout: list[tuple[int, int]], i: int, dtype: torch.dtype) -> torch.Tensor:
    offset, size = layout[i]
    return payload[offset:offset + size].view(dtype)


def encode(name: str, old: torch.Tensor, new: torch.Tensor) -> tuple[Change, torch.Tensor | None]:
    """`new` as a change against `old` (same dtype and shape): the record and its payload (None: unchanged)."""
    if old.dtype != new.dtype or old.shape != new.shape:
        raise ValueError(f"{name!r}: a delta needs the same dtype and shape, got {old.dtype} {list(old.shape)} "
                         f"then {new.dtype} {list(new.shape)}")
    before, after = element_bits(old), element_bits(new)
    mask = before != after
    count, numel, itemsize = int(torch.count_nonzero(mask)), after.numel(), new.element_size()
    encoding = choose(numel, itemsize, count)
    change = Change(name, encoding, count, numel, str(new.dtype).removeprefix("torch."),
                    payload_bytes(encoding, numel, itemsize, count))
    if encoding is Encoding.UNCHANGED:
        return change, None
    payload = torch.zeros(change.nbytes, dtype=torch.uint8, device=new.device)
    layout = parts(encoding, numel, itemsize, count)
    values = _part(payload, layout, len(layout) - 1, after.dtype)
    if encoding is Encoding.FULL:
        values.copy_(after)
    elif encoding is Encoding.SPARSE:
        positions = mask.nonzero().reshape(-1)
        _part(payload, layout, 0, torch.int32).copy_(torch.bincount(positions >> CHUNK_BITS, minlength=_chunks(numel)))
        _part(payload, layout, 1, torch.int16).copy_((positions & (CHUNK - 1)) - OFFSET_BIAS)
        values.copy_(after[positions])
    else:
        _part(payload, layout, 0, torch.uint8).copy_(_pack_bits(mask))
        values.copy_(after[mask])
    return change, payload


def apply_(base: torch.Tensor, change: Change, payload: torch.Tensor) -> None:
    """Write the change into `base` (contiguous, the receiver's copy of the tensor), in place."""
    bits = base.view(-1).view(BITS[base.element_size()])
    if bits.numel() != change.numel:
        raise ValueError(f"{change.name!r}: the delta is for {change.numel} elements, the copy holds {bits.numel()}")
    if payload.numel() != change.nbytes:
        raise ValueError(f"{change.name!r}: the delta payload holds {payload.numel()} bytes, {change.nbytes} expected")
    layout = parts(change.encoding, change.numel, base.element_size(), change.count)
    if not layout:
        return
    values = _part(payload, layout, len(layout) - 1, bits.dtype).to(bits.device)
    if change.encoding is Encoding.FULL:
        bits.copy_(values)
    elif change.encoding is Encoding.SPARSE:
        counts = _part(payload, layout, 0, torch.int32).to(bits.device, torch.int64)
        offsets = _part(payload, layout, 1, torch.int16).to(bits.device, torch.int64) + OFFSET_BIAS
        if int(counts.sum()) != change.count or bool((counts < 0).any()):
            raise ValueError(f"{change.name!r}: the delta's chunk counts do not add up to {change.count}")
        chunk = torch.repeat_interleave(torch.arange(counts.numel(), device=bits.device), counts)
        bits[(chunk << CHUNK_BITS) + offsets] = values
    else:
        mask = _unpack_bits(_part(payload, layout, 0, torch.uint8).to(bits.device), change.numel)
        marked = int(torch.count_nonzero(mask))
        if marked != change.count:
            raise ValueError(f"{change.name!r}: the delta's bitmap marks {marked} elements, {change.count} expected")
        bits.masked_scatter_(mask, values)
