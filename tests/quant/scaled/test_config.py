"""What int8, int4 and MXFP8 add to the fp8 machinery, checked at their edges against independent arithmetic:
int8 rounds half to even and never writes -128; MX scales are E8M0 powers of two (every positive bf16
amax against numpy's frexp and ml_dtypes' float8_e8m0fnu), saturate past 448, and give a zero block
2^-127; the int8 product is bitwise the int64 numpy product scaled in the same order; int4 packs
eight nibbles per int32 in the documented order; the options that do not apply to a scheme are
refused by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from streamquant.api import load_model
from streamquant.config import UnsupportedQuantizationError
from streamquant.offline import quantize_checkpoint
from streamquant.quant.math.code_format import INT8, MXFP8, mx_scales
from streamquant.quant.scaled.config import ScaledConfig
from streamquant.quant.scaled.linear import scaled_matmul
from streamquant.quant.math.quantize import dequantize, quantize, quantize_window_
from streamquant.quant.scaled.weights import ScaledWeightSpec, shard_layouts
from streamquant.parallel.context import TPContext
from streamquant.reload import inference_tensors, reload_weights
from streamquant.quant.math.granularity import LogicalShard, PerBlock, PerRow, Window
from streamquant.quant.math.int4_pack import pack_int4, unpack_int4
from streamquant.quant.math.matmul import INT8_EXACT_DEPTH, INT_MM_CPU_MAX_ROWS, int8_mm

from hf_cases import CASES, make_checkpoint, write_variant

from ..fp8_model_helpers import checkpoint_pieces
from ..fp8_reference import ref_pack_int4, ref_quantize, ref_quantize_asymmetric, to_f32

both_kernels = pytest.mark.usefixtures("cpu_kernels")  # the test runs on the native and the pure-torch kernels


@both_kernels
def test_int8_rounds_half_to_even_and_is_symmetric():
    # amax 127 -> scale exactly 1, so w / scale is w itself
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49, -3.51]])
    q, s = quantize(w, PerRow(), INT8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -127, 3, -4]]
    # a foreign (too small) scale saturates at +-127: -128 is never written
    out = torch.empty(1, 4, dtype=torch.int8)
    quantize_window_(out, torch.tensor([[1e4, -1e4, -127.6, 0.4]]), torch.ones(1, 1), Window(0, 0, 1, 4), (1, 4))
    assert out.tolist() == [[127, -127, -127, 0]]


@both_kernels
def test_int8_round_trip_error_is_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, PerRow(), INT8)
    err = (dequantize(q, s, PerRow(), torch.float32) - w).abs()
    assert bool((err <= s * (0.5 + 1e-6)).all())
    assert int(q.min()) >= -127


def test_mx_scales_of_every_positive_bf16_amax_are_e8m0_powers_of_two():
    """All 32640 finite positive bf16 values (and zero) as block amaxes, against numpy's frexp."""
    amax = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ours = mx_scales(amax)
    _, e = np.frexp(amax.numpy())
    exponent = np.where(amax.numpy() > 0, np.clip(e - 1 - 8, -127, 127), -127)
    np.testing.assert_array_equal(ours.numpy(), np.ldexp(np.float32(1), exponent).astype(np.float32))
    # storable as E8M0 without rounding, in torch's and in ml_dtypes' own format
    assert torch.equal(ours.to(torch.float8_e8m0fnu).float(), ours)
    np.testing.assert_array_equal(ours.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), ours.numpy())
    # every non-zero block lands in [256, 512) before saturation: the OCP "largest power of two" rule
    nonzero = amax > 2.0 ** -118
    ratio = amax[nonzero] / ours[nonzero]
    assert bool(((ratio >= 256) & (ratio < 512)).all())


@both_kernels
def test_mx_saturates_past_448_and_zero_blocks_get_the_smallest_scale():
    w = torch.zeros(2, 64)
    w[0, :5] = torch.tensor([511.0, 480.0, 464.0, 448.0, -500.0])  # amax 511: scale 2^(8 - 8) = 1
    q, s = quantize(w, PerBlock((1, 32)), MXFP8)
    assert s.tolist() == [[1.0, 2.0 ** -127], [2.0 ** -127, 2.0 ** -127]]
    assert q[0, :5].float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]
    assert not torch.isnan(q.float()).any() and (q[1].view(torch.uint8) == 0).all()
    assert s.to(torch.float8_e8m0fnu).view(torch.uint8)[1].tolist() == [0, 0]  # E8M0 code 0 is 2^-127


@both_kernels
def test_int8_w8a8_matmul_is_bitwise_the_integer_product_scaled():
    """W8A8: int32 accumulation (exact; numpy int64 here) then `* scale_x * scale_w` in float32."""
    gen = torch.Generator().manual_seed(3)
    rows, k = 48, 200
    w, x, bias = torch.randn(rows, k, generator=gen), torch.randn(7, k, generator=gen), torch.randn(rows, generator=gen)
    layouts = shard_layouts((LogicalShard("", Window(0, 0, rows, k)),), PerRow())
    codes, scales = quantize(w, PerRow(), INT8)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), PerRow(), bias)
    xc, xs = ref_quantize(to_f32(x), (1, k), torch.int8)
    wc, ws = ref_quantize(to_f32(w), (1, k), torch.int8)
    np.testing.assert_array_equal(codes.view(torch.uint8).numpy(), wc)
    acc = xc.view(np.int8).astype(np.int64) @ wc.view(np.int8).astype(np.int64).T
    assert np.abs(acc).max() < 2 ** 31
    expected = (acc.astype(np.float32) * xs) * ws.reshape(1, -1) + bias.numpy()
    np.testing.assert_array_equal(y.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("rows", [1, INT_MM_CPU_MAX_ROWS, INT_MM_CPU_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("depth", [7, INT8_EXACT_DEPTH, 2 * INT8_EXACT_DEPTH + 5])
def test_int8_mm_is_the_exact_integer_product_on_every_route(rows, depth):
    """`torch._int_mm` (few rows) and the float32 route (more rows) both give numpy's int64 product,
    at the extremes too (every code +-127: the largest partial sums a slice can reach)."""
    gen = torch.Generator().manual_seed(depth)
    a = torch.randint(-127, 128, (rows, depth), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (depth, 33), generator=gen, dtype=torch.int8)
    a[0], b[:, 0], b[:, 1] = 127, 127, -127
    out = int8_mm(a, b)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), a.numpy().astype(np.int64) @ b.numpy().astype(np.int64))


@pytest.mark.parametrize(("scheme", "options", "match"), [
    ("int8", {"fp8_dtype": "e4m3fnuz"}, r"fp8_dtype='e4m3fnuz' does not apply to quantization='int8'"),
    ("mxfp8", {"fp8_dtype": "e4m3fnuz"}, r"MXFP8 elements are e4m3fn"),
    ("mxfp8", {"formula": "transformers"}, r"quantization='mxfp8' has the streamquant formula only"),
    ("int8", {"formula": "compressed-tensors"}, r"quantization='int8' has the streamquant formula only"),
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


def test_block_size_is_for_fp8_block_only(llama):
    with pytest.raises(ValueError, match="block_size applies to quantization='fp8-block' only, not 'mxfp8'"):
        load_model(llama, quantization="mxfp8", block_size=(1, 64))


@pytest.mark.parametrize("scheme", ["int8", "mxfp8"])
def test_on_disk_formats_refuse_the_online_only_schemes(llama, tmp_path, scheme):
    with pytest.raises(UnsupportedQuantizationError, match=rf"quantization='{scheme}' is online only"):
        quantize_checkpoint(llama, tmp_path / "out", scheme)
    assert not (tmp_path / "out").exists()


def test_int4_packing_is_the_documented_nibble_layout():
    """Code 8k + i of a row is the nibble `code + 8` at bits [4i, 4i + 4) of word k; round trip exact."""
    codes = torch.tensor([[-7, -1, 0, 1, 2, 3, 4, 7, 5, -5, 6, -6, 0, 0, 0, -7]], dtype=torch.int8)
    words = pack_int4(codes)
    expected = [sum((int(c) + 8) << (4 * i) for i, c in enumerate(codes[0, k * 8:(k + 1) * 8])) for k in range(2)]
    assert words.view(torch.int32).tolist() == [[np.uint32(e).view(np.int32) for e in expected]]
    assert torch.equal(unpack_int4(words), codes)
    np.testing.assert_array_equal(words.numpy(), ref_pack_int4(codes.view(torch.uint8).numpy()))


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


def test_int4_needs_whole_words_per_rank():
    from streamquant.quant.math.int4_pack import packed_size

    with pytest.raises(ValueError, match="input size 44 is not a multiple of 8"):
        packed_size(44)


@both_kernels
@pytest.mark.parametrize("tile", [(1, 32), (1, 128), (1, 7)])
def test_asymmetric_int4_equals_the_numpy_reference(tile):
    from streamquant.quant.math.int4 import dequantize_window_asymmetric, quantize_window_asymmetric_, range_scales, window_range

    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 200, generator=gen) * torch.exp(torch.randn(40, 1, generator=gen) * 3)).to(torch.bfloat16)
    w[3] = 0  # a zero row: the floor scale, zero point -8, codes -8, dequantized exactly 0
    w[4] = w[4].abs()  # all positive: zero point -8 (lo = 0)
    w[5] = -w[5].abs()  # all negative: zero point 7
    window = Window(0, 0, *w.shape)
    scales, zeros = range_scales(window_range(w, window, tile))
    codes = quantize_window_asymmetric_(torch.empty(w.shape, dtype=torch.int8), w, scales, zeros, window, tile)
    ref_codes, ref_scales, ref_zeros = ref_quantize_asymmetric(to_f32(w), tile)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(zeros.numpy(), ref_zeros)
    np.testing.assert_array_equal(codes.view(torch.uint8).numpy(), ref_codes)
    deq = dequantize_window_asymmetric(codes, scales, zeros, window, tile, torch.float32)
    assert (deq[3] == 0).all() and (zeros[4] == -8).all() and (zeros[5] == 7).all()
    err = (deq - w.float()).abs()
    expanded = scales.repeat_interleave(tile[1], dim=1)[:, : w.shape[1]]
    assert bool((err <= expanded * 0.5 * (1 + 1e-5) + 1e-30).all())  # half a step (range covers every value)


def _asymmetric_state(path):
    model = load_model(path, quantization="int4", symmetric=False, dtype=torch.float32,
                       tp=TPContext.from_process_group() if torch.distributed.is_initialized() else None)
    return {n: t.clone() for n, t in inference_tensors(model).items() if "weight" in n and "norm" not in n}


def _asymmetric_all(path):
    mine = _asymmetric_state(path)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


@pytest.fixture(scope="module")
def asymmetric_cases(ranks, tmp_path_factory):
    """{case: (checkpoint, TP=1 state, every TP=2 rank's state)}, both TP=2 cases in one job."""
    root = tmp_path_factory.mktemp("asym")
    paths = {name: make_checkpoint(next(c for c in CASES if c.name == name), root) for name in ("llama", "qwen3moe")}
    states = ranks.run(_asymmetric_each, 2, paths)
    return {name: (path, _asymmetric_state(path), states[name]) for name, path in paths.items()}


def _asymmetric_each(paths):
    return {name: _asymmetric_all(path) for name, path in paths.items()}


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


def test_asymmetric_int4_reloads_in_place_bitwise_a_cold_load(llama, tmp_path):
    b = write_variant(llama, tmp_path / "b")
    model = load_model(llama, quantization="int4", symmetric=False, group_size=32)
    before = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
    reload_weights(model, b)
    cold = load_model(b, quantization="int4", symmetric=False, group_size=32)
    live, want = inference_tensors(model), inference_tensors(cold)
    assert any(n.endswith("_zero_point") for n in live)
    assert all(torch.equal(live[n], want[n]) for n in want) and {n: t.data_ptr() for n, t in live.items()} == before
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(model(ids), cold(ids))


def test_int8_weight_only_bf16_takes_the_int8_kernel_within_bf16_rounding():
    """W8A16 on CPU in bf16: bitwise torch._weight_int8pack_mm on the layer's codes and bf16 row scales, and
    as close to a float64 reference as dequantize-then-linear is (the output rounding dominates)."""
    gen = torch.Generator().manual_seed(4)
    rows, k = 96, 256
    w, x = torch.randn(rows, k, generator=gen), torch.randn(5, 3, k, generator=gen).to(torch.bfloat16)
    layouts = shard_layouts((LogicalShard("", Window(0, 0, rows, k)),), PerRow())
    codes, scales = quantize(w, PerRow(), INT8)
    y = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), None)
    assert y.shape == (5, 3, rows) and y.dtype == torch.bfloat16
    direct = torch._weight_int8pack_mm(x.reshape(-1, k), codes, scales[:, 0].to(torch.bfloat16)).reshape(5, 3, rows)
    assert torch.equal(y, direct)
    reference = x.double() @ (codes.double() * scales.double()).T
    dequantized = torch.nn.functional.linear(x, (codes.float() * scales).to(torch.bfloat16)).double()
    ours_err = ((y.double() - reference).norm() / reference.norm()).item()
    assert ours_err <= 1.5 * ((dequantized - reference).norm() / reference.norm()).item()
    # with a bias, or wider partial sums, the dequantize-then-linear path keeps its single rounding
    bias = torch.randn(rows, generator=gen).to(torch.bfloat16)
    with_bias = scaled_matmul(x, codes, scales, layouts, ScaledWeightSpec(PerRow(), INT8), None, bias)
    assert torch.equal(with_bias, torch.nn.functional.linear(x, (codes.float() * scales).to(torch.bfloat16), bias))
