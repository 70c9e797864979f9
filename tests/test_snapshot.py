"""`WeightSnapshot`: a byte-exact copy of every inference tensor, restored in place."""

from __future__ import annotations

import pytest
import torch

from streamquant.api import load_model
from streamquant.fingerprint import weights_fingerprint
from streamquant.loading.contract import inference_tensors
from streamquant.snapshot import WeightSnapshot

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("snapshot"))


def test_restore_is_byte_exact_and_in_place(checkpoint):
    model = load_model(checkpoint, quantization="fp8-channel")
    fingerprint = weights_fingerprint(model)
    snapshot = WeightSnapshot(model)
    tensors = inference_tensors(model)
    addresses = {n: t.data_ptr() for n, t in tensors.items()}
    assert snapshot.buffer.numel() >= sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.no_grad():
        for t in tensors.values():
            t.view(torch.uint8).fill_(0x7f)
    assert weights_fingerprint(model) != fingerprint
    snapshot.restore(model)
    assert weights_fingerprint(model) == fingerprint
    assert {n: t.data_ptr() for n, t in inference_tensors(model).items()} == addresses


def test_a_snapshot_of_another_model_is_refused(checkpoint):
    snapshot = WeightSnapshot(load_model(checkpoint), save=False)
    with pytest.raises(ValueError, match="changed since this snapshot"):
        snapshot.save(load_model(checkpoint, quantization="fp8"))
