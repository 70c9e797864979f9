"""The quant method <-> load session contract (`loading/contract.py`), with toy methods.

The session asks the method which parameters take checkpoint tensors (its staged checkpoint-format
parameters, or its quantized loaders for a pre-quantized source), gives the method's derived tensors
memory before `process_weights_after_loading`, and releases the staging after it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streamquant.loading.contract import (
    QuantizedLayer,
    WeightMethod,
    loadable_parameters,
    method_of,
    module_loadables,
    staging_bytes,
)
from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.parameters import BaseParameter
from streamquant.loading.streaming import stream_weights

ROWS, COLS = 4, 6


def _param(shape, dtype, device="meta", loader=default_weight_loader):
    return BaseParameter(torch.empty(shape, dtype=dtype, device=device), weight_loader=loader)


class Doubling:
    """A toy method: the checkpoint writes a staged bf16 `weight`; the layer computes with a derived
    float32 `weight` (twice the staged one) and a derived `weight_scale`; a pre-quantized source writes
    `weight` and `weight_scale` directly."""

    def __init__(self):
        self.seen_derived_on_meta = None
        self.processed = 0

    def create(self, layer):
        layer.staged = {"weight": _param((ROWS, COLS), torch.bfloat16)}
        layer.register_parameter("weight", nn.Parameter(torch.empty(ROWS, COLS, device="meta"), requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(torch.empty(1, device="meta"), requires_grad=False))
        layer.register_parameter("bias", _param((ROWS,), torch.float32))  # taken directly: it has a loader

    def checkpoint_params(self, layer):
        return layer.staged

    def quantized_loaders(self, layer):
        return {"weight": default_weight_loader, "weight_scale": default_weight_loader}

    def derived_tensors(self, layer):
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}

    def process_weights_after_loading(self, layer):
        self.processed += 1
        self.seen_derived_on_meta = [t.is_meta for t in self.derived_tensors(layer).values()]
        staged = layer.staged["weight"]
        if staged.is_meta:  # a pre-quantized source wrote the derived tensors directly
            return
        layer.weight.copy_(staged.float() * 2)
        layer.weight_scale.fill_(2.0)


class Layer(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.quant_method = method
        method.create(self)


class Norm(nn.Module):  # no quant method: its parameters take the checkpoint themselves
    def __init__(self):
        super().__init__()
        self.weight = _param((COLS,), torch.float32)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Layer(Doubling())
        self.norm = Norm()


def test_a_layer_with_a_method_is_asked_and_one_without_is_not():
    model = Model()
    assert isinstance(model.proj, QuantizedLayer) and isinstance(model.proj.quant_method, WeightMethod)
    assert method_of(model.norm) is None and method_of(model.proj) is model.proj.quant_method
    assert module_loadables(model.proj) == {"bias": model.proj.bias, "weight": model.proj.staged["weight"]}
    assert module_loadables(model.proj, quantized_source=True) == {
        "bias": model.proj.bias, "weight": model.proj.weight, "weight_scale": model.proj.weight_scale}
    assert set(loadable_parameters(model)) == {"proj.bias", "proj.weight", "norm.weight"}
    assert staging_bytes(model.proj) == ROWS * COLS * 2 and staging_bytes(model.norm) == 0


def test_a_method_that_breaks_the_contract_is_named():
    class Incomplete:
        def process_weights_after_loading(self, layer):
            pass

    layer = nn.Module()
    layer.quant_method = Incomplete()
    with pytest.raises(TypeError, match="Incomplete.*does not implement WeightMethod"):
        method_of(layer)


def _checkpoint():
    g = torch.Generator().manual_seed(0)
    return {"proj.weight": torch.randn(ROWS, COLS, generator=g).bfloat16(),
            "proj.bias": torch.randn(ROWS, generator=g), "norm.weight": torch.randn(COLS, generator=g)}


def test_the_session_materializes_derived_tensors_then_releases_the_staging():
    model, ckpt = Model(), _checkpoint()
    stream_weights(model, ckpt.items(), WeightMapping(), device="cpu", fill=float("nan"))
    method = model.proj.quant_method
    assert method.processed == 1 and method.seen_derived_on_meta == [False, False]
    assert torch.equal(model.proj.weight, ckpt["proj.weight"].float() * 2) and model.proj.weight_scale.item() == 2.0
    assert torch.equal(model.proj.bias, ckpt["proj.bias"]) and torch.equal(model.norm.weight, ckpt["norm.weight"])
    assert model.proj.staged["weight"].is_meta  # released after processing


def test_a_pre_quantized_source_goes_through_the_quantized_loaders():
    model = Model()
    codes, scale = torch.randn(ROWS, COLS), torch.tensor([3.0])
    items = [("proj.weight", codes), ("proj.weight_scale", scale), ("proj.bias", torch.zeros(ROWS)),
             ("norm.weight", torch.ones(COLS))]
    stream_weights(model, items, WeightMapping(), device="cpu", quantized_source=True)
    assert torch.equal(model.proj.weight, codes) and model.proj.weight_scale.item() == 3.0
    assert model.proj.staged["weight"].is_meta  # never given memory: no high-precision staging


def test_a_failed_load_releases_what_it_materialized():
    model, ckpt = Model(), _checkpoint()
    items = [("proj.weight", ckpt["proj.weight"]), ("no.such.tensor", torch.zeros(1))]
    with pytest.raises(ValueError, match="no.such.tensor"):
        stream_weights(model, items, WeightMapping(), device="cpu")
    assert model.proj.staged["weight"].is_meta and model.proj.bias.is_meta and model.proj.weight.is_meta


def test_an_unexpected_error_while_processing_is_raised_as_it_is_and_the_staging_released():
    """A method that fails with views of its staged weight alive in its frame: the error is the
    method's own (not a failure to release), and the staging goes back to `meta`."""

    class Failing(Doubling):
        def process_weights_after_loading(self, layer):
            rows = layer.staged["weight"][:2]  # a view of the staged weight, alive in this frame
            raise KeyError(f"bug in the method ({rows.shape[0]} rows)")

    model = Model()
    model.proj = Layer(Failing())
    with pytest.raises(KeyError, match="bug in the method"):
        stream_weights(model, _checkpoint().items(), WeightMapping(), device="cpu")
    assert model.proj.staged["weight"].is_meta and model.proj.bias.is_meta
