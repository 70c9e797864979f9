"""CPU offload before quantization (`loading/offload.py`): bitwise the load without offload, composes with
reload. (Its option errors: tests/test_config.py.)

On CPU the host and the target are the same memory, so these tests check the machinery: staging
taken from a separate host pool, each layer quantized through `quantize_placement` (copied to a
target buffer, or quantized into host temporaries and copied into the layer's target tensors),
with results bitwise equal to a load without offload, stable addresses across reloads, a bounded
staging budget and failures that restore. Device memory is asserted in tests/quant/scaled/test_cuda.py.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading import offload as offload_module
from streamquant.loading.contract import staged_params
from streamquant.loading import streaming
from streamquant.loading.errors import NonFiniteWeightError
from streamquant.loading.offload import OffloadPlan
from streamquant.loading.streaming import largest_layer_staging_bytes
from streamquant.parallel.context import TPContext
from streamquant.reload import Reloader, reload_weights

from hf_cases import CASES, make_checkpoint

SCHEMES = ("fp8", "fp8-channel", "fp8-block")
NAMES = ("llama-tied-mqa-llama3rope", "qwen2moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name in NAMES}


@pytest.fixture(autouse=True)
def _quiet_cpu_target_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "offload_before_quant=True with a CPU target")
        yield


def bits(model):
    return {n: t.detach().reshape(-1).view(torch.uint8).clone() for n, t in model.state_dict().items()}


def assert_same_bits(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def quantized_modules(model):
    return [n for n, m in model.named_modules() if staged_params(m)]


@pytest.fixture
def placements(monkeypatch):
    """Records every layer quantized through the offload placement, and where (quantize_on)."""
    seen = []
    original = offload_module.quantize_placement

    def spy(staged, derived, plan, *args):
        seen.append((tuple(id(p) for p in staged), plan.quantize_on))
        return original(staged, derived, plan, *args)

    monkeypatch.setattr(streaming, "quantize_placement", spy)
    return seen


@pytest.mark.parametrize("quantize_on", ["device", "cpu"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", NAMES)
def test_offload_is_bitwise_the_load_without_it(checkpoints, placements, name, scheme, quantize_on):
    want = bits(load_model(checkpoints[name], quantization=scheme))
    assert placements == []
    model = load_model(checkpoints[name], quantization=scheme, offload_before_quant=True, quantize_on=quantize_on)
    assert_same_bits(bits(model), want)
    assert sorted(p for p, _ in placements) == sorted(tuple(id(p) for p in staged_params(m).values())
                                                      for m in model.modules() if staged_params(m))
    assert {q for _, q in placements} == {quantize_on}
    assert model.offload_plan == OffloadPlan(quantize_on)
    assert all(p.is_meta for m in model.modules() for p in staged_params(m).values())


def _tp_offload(path, quantize_on):
    tp = TPContext.from_process_group()
    plain = bits(load_model(path, quantization="fp8-block", tp=tp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offloaded = bits(load_model(path, quantization="fp8-block", tp=tp, offload_before_quant=True,
                                    quantize_on=quantize_on))
    return plain.keys() == offloaded.keys() and all(torch.equal(plain[n], offloaded[n]) for n in plain)


@pytest.mark.parametrize("quantize_on", ["device", "cpu"])
def test_offload_tp2_is_bitwise_the_load_without_it(ranks, checkpoints, quantize_on):
    assert ranks.run(_tp_offload, 2, checkpoints["qwen2moe"], quantize_on) is True


@pytest.mark.parametrize("quantize_on", ["device", "cpu"])
def test_reload_of_an_offloaded_model_uses_the_same_path(checkpoints, tmp_path, placements, quantize_on):
    """Reload B into a model loaded from A with offload: bitwise a cold B, same addresses, offload path
    taken for every quantized layer; a failing atomic reload restores bitwise; Reloader too."""
    from hf_cases import write_variant

    a = checkpoints["qwen2moe"]
    b = write_variant(a, tmp_path / "B")
    cold_a, cold_b = bits(load_model(a, quantization="fp8")), bits(load_model(b, quantization="fp8"))
    model = load_model(a, quantization="fp8", offload_before_quant=True, quantize_on=quantize_on)
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    placements.clear()
    reload_weights(model, b)
    assert_same_bits(bits(model), cold_b)
    assert len(placements) == len(quantized_modules(model)) and {q for _, q in placements} == {quantize_on}
    items = list(iterate_weights(a))
    poisoned = [(n, torch.full_like(t, float("nan")) if n.endswith("layers.1.mlp.down_proj.weight") else t)
                for n, t in items]
    with pytest.raises(NonFiniteWeightError, match="layers.1.mlp.down_proj"):
        reload_weights(model, poisoned, atomic=True)
    assert_same_bits(bits(model), cold_b)
    reloader = Reloader(model, atomic=True)
    assert not reloader.pool.pin_memory  # pinned only for a CUDA target
    reloader(items)
    assert_same_bits(bits(model), cold_a)
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == addresses


@pytest.mark.parametrize("quantize_on", ["device", "cpu"])
def test_offloaded_staging_respects_the_budget(checkpoints, quantize_on):
    """Shuffled, one-layer budget, offload: staging stays within two layers, bits unchanged."""
    path = checkpoints["qwen2moe"]
    want = bits(load_model(path, quantization="fp8"))
    model = load_model(path, quantization="fp8", offload_before_quant=True, quantize_on=quantize_on)
    largest = largest_layer_staging_bytes(model)
    items = list(iterate_weights(path))
    random.Random(1).shuffle(items)
    session = streaming.StreamingLoadSession(model, model.weight_mapping, device="cpu", staging_budget=largest,
                                             offload=model.offload_plan)
    with torch.no_grad():
        session.load_all(items)
    session.check_complete()
    assert 0 < session.peak_staged_bytes <= 2 * largest
    assert session.pending == [] and not session.in_flight
    assert_same_bits(bits(model), want)


def test_cpu_quantization_leaves_the_target_untouched_when_a_layer_fails(checkpoints):
    """quantize_on="cpu": a layer whose weights hold NaN raises (found at quantization: the session is fed
    directly, without reload's up-front check) and its target codes keep their storage and values."""
    path = checkpoints["llama-tied-mqa-llama3rope"]
    model = load_model(path, quantization="fp8", offload_before_quant=True, quantize_on="cpu")
    layer = model.model.layers[0].self_attn.qkv_proj
    before = layer.weight.detach().clone(), layer.weight_scale.detach().clone(), layer.weight.data_ptr()
    items = [(n, torch.full_like(t, float("nan")) if n.endswith("layers.0.self_attn.k_proj.weight") else t)
             for n, t in iterate_weights(path)]
    session = streaming.StreamingLoadSession(model, model.weight_mapping, device="cpu", offload=model.offload_plan)
    with pytest.raises(NonFiniteWeightError, match="layers.0.self_attn.k_proj"), torch.no_grad():
        session.load_all(items)
    session.abort()
    assert torch.equal(layer.weight.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(layer.weight_scale, before[1]) and layer.weight.data_ptr() == before[2]
