"""Streaming load from a meta-built model: same result as an eager load, in any order; layers
finish exactly when their last element arrives; a failed load releases what was in flight."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig

from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.errors import MissingWeightsError
from streamquant.loading.streaming import StreamingLoadSession, stream_weights
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext

from hf_cases import CASES, make_checkpoint

NAN = float("nan")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_stream")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name in ("llama", "qwen2moe", "opt")}


def meta_model(path):
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return get_model_class(config)(config, tp=TPContext(), params_dtype=torch.float32)


def eager_model(path):
    config = AutoConfig.from_pretrained(path)
    model = get_model_class(config)(config, tp=TPContext(), params_dtype=torch.float32)
    stream_weights(model, iterate_weights(path), model.weight_mapping, device="cpu")
    return model


def orders(items):
    by_type = sorted(items, key=lambda kv: (kv[0].split(".")[-2:], kv[0]))  # grouped by parameter type across layers
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    return {"in-order": items, "reversed": items[::-1], "shuffled": shuffled, "by-type": by_type}


@pytest.mark.parametrize("name", ["llama", "qwen2moe", "opt"])
def test_stream_equals_eager_in_any_order(checkpoints, name):
    path = checkpoints[name]
    reference = dict(eager_model(path).named_parameters())
    items = list(iterate_weights(path))
    for label, order in orders(items).items():
        model = meta_model(path)
        stream_weights(model, order, model.weight_mapping, device="cpu", fill=NAN)
        got = dict(model.named_parameters())
        assert got.keys() == reference.keys(), label
        for n, p in got.items():
            assert not p.is_meta, (label, n)
            assert torch.equal(p, reference[n]), (label, n)


class _Spy:
    """A quant method that records when its layer was finished and what it saw."""

    def __init__(self, log):
        self.log = log

    def process_weights_after_loading(self, layer):
        self.log.append((layer.prefix, {n: bool(torch.isnan(p).any()) for n, p in layer.named_parameters(recurse=False)}))


def test_layer_finishes_only_after_its_last_element_including_late_bias(checkpoints):
    path = checkpoints["qwen2moe"]  # qkv_proj has a bias
    model = meta_model(path)
    log = []
    qkv = model.model.layers[0].self_attn.qkv_proj
    qkv.quant_method.process_weights_after_loading = _Spy(log).process_weights_after_loading
    items = [kv for kv in iterate_weights(path) if "layers.0.self_attn" in kv[0]]
    late = [kv for kv in items if kv[0].endswith("v_proj.bias")]
    early = [kv for kv in items if not kv[0].endswith("v_proj.bias")]
    session = StreamingLoadSession(model, model.weight_mapping, device="cpu", strict=False, fill=NAN)
    session.load_all(early)
    assert log == [] and "model.layers.0.self_attn.qkv_proj" in session.in_flight
    session.load_all(late)
    assert log == [("model.layers.0.self_attn.qkv_proj", {"weight": False, "bias": False})]


def test_in_order_stream_keeps_few_layers_in_flight(checkpoints):
    path = checkpoints["llama"]
    model = meta_model(path)
    session = StreamingLoadSession(model, model.weight_mapping, device="cpu", fill=NAN)
    peak = 0
    for name, tensor in iterate_weights(path):
        session.load(name, tensor)
        peak = max(peak, len(session.in_flight))
    session.check_complete()
    assert peak <= 3 and not session.in_flight  # qkv_proj and gate_up_proj wait for their sibling shards


def test_failed_stream_releases_in_flight_layers(checkpoints):
    path = checkpoints["llama"]
    model = meta_model(path)
    items = [kv for kv in iterate_weights(path) if not kv[0].endswith("layers.1.self_attn.k_proj.weight")]
    with pytest.raises(MissingWeightsError, match="layers.1.self_attn.k_proj.weight"):
        stream_weights(model, items, model.weight_mapping, device="cpu", fill=NAN)
    assert model.model.layers[1].self_attn.qkv_proj.weight.is_meta  # its storage was given back
    assert not model.model.layers[1].self_attn.o_proj.weight.is_meta  # finished layers stay loaded
