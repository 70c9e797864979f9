"""One rule for every tensor a load or reload writes: a 16-bit-or-wider float dtype, no NaN / Inf.

Checked on real loads of a saved transformers Llama: tensors that are not quantized (norms,
embeddings, LM head) are refused like quantized ones, with and without fp8, in load and reload;
skipped names (rotary inv_freq) are never checked; `check_finite=False` turns the value check off.
"""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from streamquant.api import load_model
from streamquant.loading.errors import NonFiniteWeightError, WeightDtypeError
from streamquant.loading.validate import check_tensor
from streamquant import ModelNotReadyError
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint

EMBED, NORM, QPROJ = "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("good"))


def edited(good, tmp_path, name, change):
    """A copy of the checkpoint with tensor `name` replaced by change(tensor)."""
    directory = tmp_path / "edited"
    shutil.copytree(good, directory)
    file = directory / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors[name] = change(tensors[name])
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return directory, tensors


def poisoned(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize("name", [EMBED, NORM, QPROJ])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_fail_the_load_naming_the_tensor(good, tmp_path, name, quantization, value):
    directory, _ = edited(good, tmp_path, name, poisoned(value))
    with pytest.raises(NonFiniteWeightError, match=name.replace(".", r"\.")):
        load_model(directory, quantization=quantization)


def test_check_finite_false_loads_a_non_finite_unquantized_weight(good, tmp_path):
    directory, _ = edited(good, tmp_path, NORM, poisoned(float("nan")))
    model = load_model(directory, check_finite=False)
    weight = dict(model.named_parameters())[NORM]
    assert int(weight.isnan().sum()) == 1  # what was asked for: no check, the value as stored


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_non_float_and_fp8_tensors_fail_naming_tensor_and_dtype(good, tmp_path, dtype, quantization):
    directory, _ = edited(good, tmp_path, NORM, lambda t: t.to(dtype))
    expected = str(dtype).removeprefix("torch.")
    with pytest.raises(WeightDtypeError, match=rf"{NORM.replace('.', '[.]')}.*dtype {expected}"):
        load_model(directory, quantization=quantization)


def test_skipped_tensors_are_not_checked(good, tmp_path):
    """A checkpoint may carry buffers the model skips (rotary inv_freq); their values never matter."""
    directory, _ = edited(good, tmp_path, NORM, lambda t: t)
    file = directory / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.full((4,), float("nan"))
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    model = load_model(directory)  # the NaN buffer is skipped, not refused, and never reaches the model
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("quantization", [None, "fp8-block"])
def test_reload_refuses_the_same_inputs_and_stays_closed(good, quantization):
    model = load_model(good, quantization=quantization)
    tensors = safetensors.torch.load_file(good / "model.safetensors")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    bad_norm = {**tensors, NORM: poisoned(float("nan"))(tensors[NORM])}
    with pytest.raises(NonFiniteWeightError, match=NORM.replace(".", r"\.")):
        reload_weights(model, bad_norm.items(), atomic=True)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # atomic: exactly as before
    with pytest.raises(WeightDtypeError, match="int32"):
        reload_weights(model, {**tensors, EMBED: tensors[EMBED].to(torch.int32)}.items())
    with pytest.raises(ModelNotReadyError):
        model(torch.tensor([[1, 2]]))
    reload_weights(model, tensors.items())  # a good reload makes it usable again
    assert torch.isfinite(model(torch.tensor([[1, 2]]))).all()


def test_check_tensor_accepts_every_loadable_dtype():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert check_tensor("w", torch.ones(3, dtype=dtype)) is None  # accepted: no error
    assert check_tensor("w", torch.empty(0, dtype=torch.bfloat16)) is None
    with pytest.raises(WeightDtypeError, match="int32"):  # the same call refuses what no weight comes from
        check_tensor("w", torch.ones(3, dtype=torch.int32))
