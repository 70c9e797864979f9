"""streamquant.rl.delta: a change encoded on one side and applied on the other rebuilds the new tensor bit for
bit, in the smallest of the three payloads (sizes checked against the formulas written out here), and a
payload that does not fit its record is refused."""

from __future__ import annotations

import math

import pytest
import torch

from streamquant.rl.delta import Encoding, apply_, encode

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(INT_OF[t.element_size()])


def _changed(old: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """`old` with about `fraction` of its elements replaced by other values of its dtype."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(old.shape, generator=g) < fraction
    new = old.clone()
    if old.dtype == torch.bool:
        new[mask] = ~old[mask]
    else:
        new[mask] = (old.float()[mask] * 1.5 + 0.25).to(old.dtype)
    return new


def _smallest(numel: int, itemsize: int, count: int) -> Encoding:
    """The encoding the module doc promises, from its byte formulas (parts padded to 8 bytes aside)."""
    sizes = {Encoding.FULL: numel * itemsize,
             Encoding.SPARSE: 4 * math.ceil(numel / 65536) + (2 + itemsize) * count,
             Encoding.BITMAP: math.ceil(numel / 8) + itemsize * count}
    return min(sizes, key=sizes.get)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32, torch.bool])
@pytest.mark.parametrize("fraction", [0.0, 0.002, 0.03, 0.3, 0.98])
def test_apply_rebuilds_the_new_tensor_bitwise(dtype, fraction):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 300, 257, generator=g).to(dtype) if dtype != torch.bool else torch.rand(3, 300, 257) > 0.5
    new = _changed(old, fraction, seed=2)  # 231,300 elements: four SPARSE chunks
    change, payload = encode("w", old, new)
    count = int((_bits(old) != _bits(new)).sum())
    assert change.count == count and change.numel == new.numel()
    if count == 0:
        assert change.encoding is Encoding.UNCHANGED and payload is None
        return
    assert change.encoding is _smallest(new.numel(), new.element_size(), count)
    assert payload.dtype == torch.uint8 and payload.numel() == change.nbytes
    base = old.clone()  # the receiver's copy
    apply_(base, change, payload)
    assert torch.equal(_bits(base), _bits(new))


def test_changes_in_many_chunks_land_at_their_positions():
    old = torch.zeros(5 * 65536 + 3, dtype=torch.float8_e4m3fn)
    positions = torch.tensor([0, 65535, 65536, 3 * 65536 + 7, 5 * 65536 + 2])
    new = old.clone()
    new[positions] = torch.tensor([1.0, -2.0, 3.0, 0.5, -448.0]).to(torch.float8_e4m3fn)
    change, payload = encode("w", old, new)
    assert change.encoding is Encoding.SPARSE and change.count == 5
    base = old.clone()
    apply_(base, change, payload)
    assert torch.equal(_bits(base), _bits(new))


def test_elements_compare_by_their_bits():
    old = torch.tensor([float("nan"), 0.0, 1.0])
    new = torch.tensor([float("nan"), -0.0, 1.0])  # the same NaN; 0.0 and -0.0 are equal as numbers, not as bits
    change, _ = encode("w", old, new)
    assert change.count == 1


def test_a_payload_that_does_not_fit_its_record_is_refused():
    old = torch.zeros(1000, dtype=torch.bfloat16)
    new = old.clone()
    new[[3, 500]] = 1.0
    change, payload = encode("layer.weight", old, new)
    assert change.encoding is Encoding.SPARSE
    with pytest.raises(ValueError, match="'layer.weight': the delta payload holds 19 bytes, 20 expected"):
        apply_(old.clone(), change, payload[:-1])
    wrong = payload.clone()
    wrong[0] = 7  # the first chunk's count
    with pytest.raises(ValueError, match="'layer.weight': the delta's chunk counts"):
        apply_(old.clone(), change, wrong)
    with pytest.raises(ValueError, match="'layer.weight': the delta is for 1000 elements, the copy holds 999"):
        apply_(torch.zeros(999, dtype=torch.bfloat16), change, payload)
    with pytest.raises(ValueError, match="same dtype and shape"):
        encode("layer.weight", old, new.float())
