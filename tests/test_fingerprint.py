"""`weights_fingerprint`: equal for a warm reload and a cold load of the same weights (every scheme,
TP 1 and 2), the same string on every rank and in another process, and sensitive to one byte."""

from __future__ import annotations

import hashlib

import pytest
import torch

from streamquant.api import load_model
from streamquant.fingerprint import digest_mismatches, tensor_digest, weights_digests, weights_fingerprint
from streamquant.loading.contract import inference_tensors
from streamquant.parallel.context import TPContext
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint, write_variant

SCHEMES = (None, "fp8", "fp8-channel", "fp8-block", "int8", "mxfp8", "int4")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint")
    a = make_checkpoint(next(c for c in CASES if c.name == "qwen2moe"), root)
    return a, write_variant(a, root / "B")


def test_a_tensor_digest_is_sha256_of_its_bytes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert tensor_digest(t.t()) == hashlib.sha256(t.t().contiguous().numpy().tobytes()).hexdigest()  # C order
    codes = torch.tensor([1, 2, 255], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert tensor_digest(codes) == hashlib.sha256(bytes([1, 2, 255])).hexdigest()
    assert tensor_digest(torch.empty(2, device="meta")) == "unwritten"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_warm_reload_has_the_fingerprint_of_a_cold_load(pair, scheme):
    a, b = pair
    model, cold_b = load_model(a, quantization=scheme), load_model(b, quantization=scheme)
    before = weights_fingerprint(model)
    reload_weights(model, b)
    assert weights_fingerprint(model) == weights_fingerprint(cold_b) != before
    assert weights_digests(model) == weights_digests(cold_b)


def test_one_changed_byte_changes_it_and_is_named(pair):
    a, _ = pair
    model = load_model(a, quantization="fp8")
    digests, fingerprint = weights_digests(model), weights_fingerprint(model)
    name = next(n for n in inference_tensors(model) if n.endswith("experts.w13_weight"))
    codes = inference_tensors(model)[name]
    codes.view(torch.uint8).view(-1)[7] ^= 1
    assert weights_fingerprint(model) != fingerprint
    assert digest_mismatches(weights_digests(model), digests) == [name]


def _fingerprints(path, scheme, size):
    tp = TPContext.from_process_group() if size > 1 else TPContext()
    model = load_model(path, quantization=scheme, tp=tp)
    every = [None] * size
    if size > 1:
        torch.distributed.all_gather_object(every, weights_fingerprint(model))
    else:
        every = [weights_fingerprint(model)]
    return every


@pytest.mark.parametrize("scheme", [None, "fp8-block", "int4"])
def test_tp2_every_rank_has_the_same_string_and_another_process_agrees(pair, ranks, scheme):
    a, b = pair
    tp2 = ranks.run(_fingerprints, 2, a, scheme, 2)
    assert tp2[0] == tp2[1]
    assert ranks.run(_fingerprints, 1, a, scheme, 1) == [weights_fingerprint(load_model(a, quantization=scheme))]
    assert tp2[0] != ranks.run(_fingerprints, 2, b, scheme, 2)[0]
