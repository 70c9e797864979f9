"""The scaled-code schemes (`quant/scaled/config.py`) and their options, end to end: the options that do
not apply to a scheme are refused by name; MXFP8 has its own fp8 dtype and int8 none; int4 is weight-only
with a group size; asymmetric int4 (zero points) equals the numpy reference on every logical weight, at
TP=1 and TP=2, and reloads in place bitwise a cold load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamquant.api import load_model
from streamquant.parallel.context import TPContext
from streamquant.quant.math.code_format import INT8
from streamquant.quant.math.granularity import PerBlock
from streamquant.quant.scaled.config import ScaledConfig
from streamquant.quant.math.int4_pack import unpack_int4_rows
from streamquant.quant.scaled.weights import shard_layouts
from streamquant.loading.contract import inference_tensors
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint, write_variant

from ..fp8_model_helpers import checkpoint_pieces
from ..fp8_reference import ref_pack_int4, ref_quantize_asymmetric, to_f32


@pytest.mark.parametrize(("scheme", "options", "match"), [
    ("int8", {"fp8_dtype": "e4m3fnuz"}, r"fp8_dtype='e4m3fnuz' does not apply to quantization='int8'"),
    ("mxfp8", {"fp8_dtype": "e4m3fnuz"}, r"MXFP8 elements are e4m3fn"),
    ("mxfp8", {"formula": "transformers"}, r"quantization='mxfp8' has the streamquant formula only"),
    ("int8", {"formula": "transformers"}, r"quantization='int8' takes formula 'streamquant' or 'compressed-tensors'"),
    ("int4", {"formula": "transformers"}, r"quantization='int4' takes formula 'streamquant' or 'compressed-tensors'"),
])
def test_options_that_do_not_apply_are_refused(scheme, options, match):
    with pytest.raises(ValueError, match=match):
        ScaledConfig(scheme, **options)


def test_mxfp8_accepts_its_own_fp8_dtype_and_int8_has_none():
    assert ScaledConfig("mxfp8", fp8_dtype="e4m3fn").fp8_dtype == torch.float8_e4m3fn
    assert ScaledConfig("int8").fp8_dtype is None and ScaledConfig("int8").weight_spec.fmt == INT8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("code_formats"))


def test_int4_is_weight_only_with_a_group_size_option(llama):
    with pytest.raises(ValueError, match="int4' is weight-only"):
        ScaledConfig("int4", activation_scheme="dynamic")
    assert ScaledConfig("int4").activation is None and ScaledConfig("int4", group_size=32).granularity == PerBlock((1, 32))
    with pytest.raises(ValueError, match="group_size applies to quantization='int4' only"):
        load_model(llama, quantization="int8", group_size=64)
    model = load_model(llama, quantization="int4", group_size=32)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.int32 and qkv.weight.shape[-1] == qkv.checkpoint_params["weight"].shape[-1] // 8
    assert qkv.weight_scale.shape[-1] == 64 // 32
    assert model.load_report.quantized_weight_bytes == sum(p.numel() * 4 for p in model.parameters() if p.dtype == torch.int32)


def _asymmetric_state(path, formula="streamquant"):
    dtype = torch.float32 if formula == "streamquant" else torch.bfloat16  # the library rounds to bf16: visible
    model = load_model(path, quantization="int4", symmetric=False, dtype=dtype, formula=formula,
                       tp=TPContext.from_process_group() if torch.distributed.is_initialized() else None)
    return {n: t.clone() for n, t in inference_tensors(model).items() if "weight" in n and "norm" not in n}


def _asymmetric_all(path, formula="streamquant"):
    mine = _asymmetric_state(path, formula)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


@pytest.fixture(scope="module")
def asymmetric_cases(ranks, tmp_path_factory):
    """{case: (checkpoint, TP=1 state, every TP=2 rank's state)}, every TP=2 case in one job; "llama-ct" is
    llama with the compressed-tensors formula (in bf16; the others in float32)."""
    root = tmp_path_factory.mktemp("asym")
    paths = {name: make_checkpoint(next(c for c in CASES if c.name == name), root) for name in ("llama", "qwen3moe")}
    runs = {**{name: (path, "streamquant") for name, path in paths.items()},
            "llama-ct": (paths["llama"], "compressed-tensors")}
    states = ranks.run(_asymmetric_each, 2, runs)
    return {name: (path, _asymmetric_state(path, formula), states[name]) for name, (path, formula) in runs.items()}


def _asymmetric_each(runs):
    return {name: _asymmetric_all(path, formula) for name, (path, formula) in runs.items()}


@pytest.mark.parametrize("name", ["llama", "qwen3moe"])
def test_asymmetric_int4_model_equals_the_reference_and_tp2(asymmetric_cases, name):
    """Every logical weight (q, k, v, gate, up, experts) against the numpy reference; TP=2 zero points
    and scales are TP=1's (groups of 128 straddle down_proj's 48 + 48 split: the range is all-reduced)."""
    path, whole, ranks = asymmetric_cases[name]
    model = load_model(path, quantization="int4", symmetric=False, dtype=torch.float32)
    modules = dict(model.named_modules())
    compared = 0
    for _, mod_name, pname, label, e, w in checkpoint_pieces(model, path):
        module = modules[mod_name]
        lay = {x.label: x for x in shard_layouts(module.logical_shards[pname], PerBlock((1, 128)))}[label]
        codes, scales, zeros = (getattr(module, f"{pname}{s}") for s in ("", "_scale", "_zero_point"))
        zeros = unpack_int4_rows(zeros)  # stored eight rows per int32 (compressed-tensors' layout)
        if e is not None:
            codes, scales, zeros = codes[e], scales[e], zeros[e]
        ref_codes, ref_scales, ref_zeros = ref_quantize_asymmetric(to_f32(w.float()), (1, 128))
        np.testing.assert_array_equal(codes[lay.rows].numpy(), ref_pack_int4(ref_codes))
        np.testing.assert_array_equal(scales[lay.scale_rows].numpy(), ref_scales)
        np.testing.assert_array_equal(zeros[lay.scale_rows].numpy(), ref_zeros)
        compared += 1
    assert compared >= 8
    checked = 0
    for key, value in whole.items():  # row-parallel layers: every rank holds all rows of scales and zero points
        if key.endswith(("_zero_point", "_scale")) and all(r[key].shape == value.shape for r in ranks):
            assert all(torch.equal(r[key], value) for r in ranks), key
            checked += 1
    assert checked >= 4


def test_asymmetric_int4_compressed_tensors_formula_at_tp2_is_tp1s(asymmetric_cases):
    """The library's formula on the all-reduced range grids: TP=2's row-parallel scales and zero points are
    TP=1's, and every scale is a bf16 value (the library computes them in the weight's dtype)."""
    _, whole, ranks = asymmetric_cases["llama-ct"]
    keys = [k for k, v in whole.items() if k.endswith(("_zero_point", "_scale"))
            and all(r[k].shape == v.shape for r in ranks)]
    assert len(keys) >= 4 and all(torch.equal(r[k], whole[k]) for r in ranks for k in keys)
    scales = [whole[k] for k in keys if k.endswith("_scale")]
    assert all(torch.equal(v.to(torch.bfloat16).float(), v) for v in scales)


def test_asymmetric_int4_reloads_in_place_bitwise_a_cold_load(llama, tmp_path):
    b = write_variant(llama, tmp_path / "b")
    model = load_model(llama, quantization="int4", symmetric=False, group_size=32)
    before = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
    reload_weights(model, b)
    cold = load_model(b, quantization="int4", symmetric=False, group_size=32)
    live, want = inference_tensors(model), inference_tensors(cold)
    assert any(n.endswith("_zero_point") for n in live) and live.keys() == want.keys()
    assert all(torch.equal(live[n], want[n]) for n in want) and {n: t.data_ptr() for n, t in live.items()} == before
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(model(ids), cold(ids))
