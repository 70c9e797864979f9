"""The quant-method seam (`quant/base.py`): every method a config hands out satisfies the protocol of its
layer kind, a method that computes with the checkpoint as it is stages and derives nothing
(`DirectWeights`), and a config's `ignore` is a tuple of valid regexes (checked when the config is made)."""

from __future__ import annotations

import pytest
import torch

from streamquant.quant.base import DirectWeights, EmbeddingMethod, LinearMethod, MoEMethod, check_ignore
from streamquant.quant.scaled.config import ScaledConfig
from streamquant.quant.scaled.linear import ScaledLinearMethod
from streamquant.quant.unquantized import UnquantizedEmbeddingMethod, UnquantizedFusedMoEMethod, UnquantizedLinearMethod


@pytest.mark.parametrize("scheme", ["fp8", "fp8-block", "int8", "int4", "mxfp8"])
def test_a_config_hands_out_a_method_of_each_kind(scheme):
    config = ScaledConfig(scheme, ignore=[r"\.o_proj$"])
    linear, moe = config.get_linear_method("model.layers.0.mlp.down_proj"), config.get_moe_method("model.layers.0.mlp.experts")
    assert isinstance(linear, LinearMethod) and isinstance(linear, ScaledLinearMethod)
    assert isinstance(moe, MoEMethod) and isinstance(config.get_embedding_method("lm_head"), EmbeddingMethod)
    ignored = config.get_linear_method("model.layers.0.self_attn.o_proj")
    assert isinstance(ignored, LinearMethod) and isinstance(ignored, UnquantizedLinearMethod)


def test_unquantized_methods_are_direct_weights():
    layer = torch.nn.Linear(3, 2)
    for method, protocol in ((UnquantizedLinearMethod(), LinearMethod), (UnquantizedFusedMoEMethod(), MoEMethod),
                             (UnquantizedEmbeddingMethod(), EmbeddingMethod)):
        assert isinstance(method, protocol) and isinstance(method, DirectWeights)
        assert method.checkpoint_params(layer) == {} and method.quantized_loaders(layer) == {}
        assert method.derived_tensors(layer) == {}
    assert not isinstance(object(), LinearMethod)


def test_ignore_is_a_tuple_of_valid_regexes():
    assert check_ignore([r"mlp\.experts$", "o_proj"]) == (r"mlp\.experts$", "o_proj")
    assert check_ignore(()) == ()
    assert check_ignore(p for p in ["o_proj", "down_proj"]) == ("o_proj", "down_proj")  # a generator, read once
    with pytest.raises(TypeError, match="ignore must be a sequence of regexes, not one string"):
        check_ignore("o_proj")
    with pytest.raises(ValueError, match=r"ignore pattern '\(unclosed' is not a valid regex"):
        check_ignore(["fine", "(unclosed"])
    with pytest.raises(ValueError, match="not a valid regex"):
        ScaledConfig("fp8", ignore=["[z-a]"])  # the config checks its own when it is made
    assert ScaledConfig("fp8", ignore=["o_proj"]).ignore == ("o_proj",)
