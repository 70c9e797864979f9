"""What a load is asked for, validated before anything is read (`config.py`): dtype names, unknown schemes
and options (named, with what is accepted), options that do not apply to the scheme, `ignore` patterns
that match no layer, and the offload options against the rest of the load."""

from __future__ import annotations

import warnings

import pytest
import torch

from streamquant.api import load_model
from streamquant.config import (
    DTYPE_NAMES,
    QuantizationOptionError,
    check_ignore_patterns,
    make_offload_plan,
    make_quant_config,
    resolve_dtype,
)
from streamquant.loading.offload import DEFAULT_QUANTIZE_ON
from streamquant.quant.scaled.config import ScaledConfig

from hf_cases import CASES, make_checkpoint

NAMES = ("llama", "llama-tied-mqa-llama3rope", "qwen2moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name in NAMES}


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints["llama"]


@pytest.mark.parametrize("name", sorted(DTYPE_NAMES))
def test_dtype_names(llama, name):
    model = load_model(llama, dtype=name)
    assert {p.dtype for p in model.parameters()} == {DTYPE_NAMES[name]}


def test_dtype_resolution():
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("BF16") is torch.bfloat16
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8")


def test_quantization_rejected_with_supported_values(llama):
    with pytest.raises(ValueError, match=r"'int3'.*supported values: None, 'fp8', 'fp8-channel', 'fp8-block'"):
        load_model(llama, quantization="int3")


def test_fp8_options_validated_before_loading(llama):
    with pytest.raises(TypeError, match="bogus.*accepted: fp8_dtype"):
        load_model(llama, quantization="fp8", bogus=1)
    with pytest.raises(ValueError, match="fp8_dtype must be one of"):
        load_model(llama, quantization="fp8", fp8_dtype="e5m2")
    with pytest.raises(ValueError, match="'dynamic'"):
        load_model(llama, quantization="fp8", activation_scheme="static")
    with pytest.raises(ValueError, match="not a valid regex"):
        load_model(llama, quantization="fp8", ignore=["(unclosed"])
    with pytest.raises(ValueError, match=r"ignore pattern 'q_proj' matches no linear or MoE layer.*qkv_proj"):
        load_model(llama, quantization="fp8", ignore=["q_proj"])


def test_unknown_option_named(llama):
    with pytest.raises(TypeError, match="block_size, foo"):
        load_model(llama, foo=1, block_size=2)


def test_block_size_is_for_fp8_block_only(llama):
    with pytest.raises(ValueError, match="block_size applies to quantization='fp8-block' only, not 'mxfp8'"):
        load_model(llama, quantization="mxfp8", block_size=(1, 64))


def test_ignore_pattern_for_a_never_quantized_layer_is_an_error(checkpoints):
    with pytest.raises(ValueError, match="ignore pattern .*gate.* matches no linear or MoE layer"):
        load_model(checkpoints["qwen2moe"], quantization="fp8", ignore=[r"mlp\.gate$"])
    with pytest.raises(ValueError, match="block_size applies to quantization='fp8-block' only"):
        load_model(checkpoints["llama"], quantization="fp8", block_size=(64, 64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(offload_before_quant=True), "needs a quantization scheme"),
    (dict(quantization="fp8", quantize_on="cpu"), "only applies with offload_before_quant=True"),
    (dict(quantization="fp8", offload_before_quant=True, quantize_on="gpu"), "quantize_on must be one of device, cpu"),
    (dict(quantization="fp8", offload_before_quant=True, streaming=False), "cannot be combined with streaming=False"),
])
def test_option_conflicts_fail_before_touching_the_checkpoint(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "does-not-exist", **kwargs)


def test_cpu_target_warns_that_offload_saves_nothing(checkpoints):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(checkpoints["llama-tied-mqa-llama3rope"], quantization="fp8", offload_before_quant=True)
    assert any("saves nothing" in str(w.message) for w in caught)


def test_int4_kernel_copy_is_for_cpu_targets_only():
    """torch's int4 kernel is a CPU kernel: on another device the copy would take memory and never serve."""
    assert make_quant_config("int4", {}, "cpu").int4_kernel and make_quant_config("int4", {}).int4_kernel
    assert not make_quant_config("int4", {}, "cuda").int4_kernel
    assert not make_quant_config("int4", {"int4_kernel": False}, torch.device("cpu")).int4_kernel
    with pytest.raises(ValueError, match="int4_kernel=True needs a CPU target .*not device='cuda:1'"):
        make_quant_config("int4", {"int4_kernel": True}, "cuda:1")
    with pytest.raises(ValueError, match="int4_kernel applies to quantization='int4' only, not 'fp8'"):
        make_quant_config("fp8", {"int4_kernel": False}, "cpu")


def test_the_validators_without_a_load():
    assert make_quant_config(None, {}) is None
    config = make_quant_config("fp8-block", {"measure_error": True, "block_size": (64, 64)})
    assert isinstance(config, ScaledConfig) and config.error_log is not None
    assert make_quant_config("fp8", {}).error_log is None
    with pytest.raises(QuantizationOptionError, match="unknown option.*quantization=None: ignore$"):
        make_quant_config(None, {"ignore": ["x"]})
    assert issubclass(QuantizationOptionError, TypeError) and issubclass(QuantizationOptionError, ValueError)
    with pytest.raises(ValueError, match="unknown dtype 7"):
        resolve_dtype(7)
    check_ignore_patterns(torch.nn.Linear(2, 2), None)  # nothing to check without a quant config
    assert make_offload_plan(False, None, quantization="fp8", device="cpu", streaming=True) is None
    plan = make_offload_plan(True, None, quantization="fp8", device="cuda", streaming=True)
    assert plan.quantize_on == DEFAULT_QUANTIZE_ON
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CUDA target: no warning (only a CPU target saves nothing)
        assert make_offload_plan(True, "cpu", quantization="fp8", device="cuda:0", streaming=True).quantize_on == "cpu"
