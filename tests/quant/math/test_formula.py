"""Formula modes bit for bit against the libraries they reproduce, run on the same tensors (CPU).

compressed-tensors: its own `calculate_qparams` (scale) and `quantize` (codes) with the weight args
llm-compressor's FP8, W8A8 and W4A16 presets use (the asymmetric int4 variant: tests/quant/math/
test_int4.py); transformers: its own `Fp8Quantize._quantize_one`. Skipped when the library is absent.
Also: the share of codes that differ between modes, stated and bounded.
"""

from __future__ import annotations

import types

import pytest
import torch

from streamquant.quant.math.formula import Formula, code_bounds, formula_of
from streamquant.quant.math.code_format import E4M3FN, INT4, INT8
from streamquant.quant.math.quantize import quantize
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # every test on both kernel implementations


def weight(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w[3] = 0  # a zero row: a zero tile for per-row scales
    w[5, 7] = 0.9  # an outlier
    return w


def tiled_min_max(w: torch.Tensor, tile):
    rows, cols = w.shape
    gr, gc = -(-rows // tile[0]), -(-cols // tile[1])
    padded = torch.zeros(gr * tile[0], gc * tile[1], dtype=w.dtype)
    padded[:rows, :cols] = w
    view = padded.reshape(gr, tile[0], gc, tile[1])
    return view.amin(dim=(1, 3)), view.amax(dim=(1, 3))


CT_CASES = [  # (our granularity, compressed-tensors weight args, tile)
    (PerTensor(), {"strategy": "tensor"}, None),
    (PerRow(), {"strategy": "channel"}, "row"),
    (PerBlock((128, 128)), {"strategy": "block", "block_structure": [128, 128]}, (128, 128)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
@pytest.mark.parametrize("granularity,args,tile", CT_CASES)
def test_compressed_tensors_formula_is_the_library_bit_for_bit(granularity, args, tile, shape, dtype):
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight(shape, dtype)
    if isinstance(granularity, PerBlock) and shape[0] % 128:
        pytest.skip("compressed-tensors' quantize() needs whole blocks (its writer pads first)")
    qargs = ct.QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, **args)
    tile = {None: shape, "row": (1, shape[1])}.get(tile, tile)
    lo, hi = tiled_min_max(w, tile)
    scale, zero = calculate_qparams(lo, hi, qargs)
    if isinstance(granularity, PerTensor):
        scale, zero = scale.reshape(1), zero.reshape(1)
    expected = ct_quantize(w, scale, zero, qargs, dtype=torch.float8_e4m3fn)
    codes, scales = quantize(w, granularity, E4M3FN, formula=Formula.COMPRESSED_TENSORS)
    assert torch.equal(scales.reshape(-1), scale.float().reshape(-1))
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


INT_CASES = [  # (our code format and granularity, compressed-tensors weight args): W8A8's and W4A16's weights
    (INT8, PerRow(), {"num_bits": 8, "strategy": "channel"}),
    (INT4, PerBlock((1, 128)), {"num_bits": 4, "strategy": "group", "group_size": 128}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt,granularity,args", INT_CASES)
def test_compressed_tensors_integer_formula_is_the_library_bit_for_bit(fmt, granularity, args, dtype):
    """amax / 127.5 (7.5) in the weight's dtype, codes over [-128, 127] ([-8, 7]), a zero row's eps scale."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight((256, 384), dtype)
    qargs = ct.QuantizationArgs(type="int", symmetric=True, dynamic=False, **args)
    lo, hi = tiled_min_max(w, (1, args.get("group_size") or 384))
    scale, zero = calculate_qparams(lo, hi, qargs)
    expected = ct_quantize(w, scale, zero, qargs, dtype=torch.int8)
    codes, scales = quantize(w, granularity, fmt, formula=Formula.COMPRESSED_TENSORS)
    assert torch.equal(scales, scale.float()) and torch.equal(codes, expected)
    assert int(codes.min()) == -(fmt.max + 1) and int(codes.max()) == fmt.max  # both ends of the range are used


def test_integer_code_ranges_by_formula():
    assert code_bounds(7.0, True, Formula.COMPRESSED_TENSORS) == (-8.0, 7.0)
    assert code_bounds(127.0, True, Formula.STREAMQUANT) == (-127.0, 127.0)
    assert code_bounds(448.0, False, Formula.COMPRESSED_TENSORS) == (-448.0, 448.0)


def _transformers_quantizer(block):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = types.SimpleNamespace(weight_block_size=block, scale_fmt="float")
    return Fp8Quantize(types.SimpleNamespace(quantization_config=config))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("granularity,block", [(PerTensor(), None), (PerBlock((128, 128)), [128, 128])])
def test_transformers_formula_is_the_library_bit_for_bit(granularity, block, dtype):
    pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = weight((256, 384), dtype)
    w[128:256, 0:128] = 0  # a zero block: transformers keeps scale 1 there
    out = _transformers_quantizer(block)._quantize_one("m.weight", w)
    codes, scales = quantize(w, granularity, E4M3FN, formula=Formula.TRANSFORMERS)
    assert torch.equal(codes.view(torch.uint8), out["m.weight"].view(torch.uint8))
    assert torch.equal(scales.reshape(-1), out["m.weight_scale_inv"].reshape(-1))


def test_modes_differ_in_a_small_stated_share_of_codes_never_by_more_than_one_step():
    """FORMATS.md: compressed-tensors' double rounding changes ~3% of codes, transformers' multiply ~0.1%."""
    w = weight((1024, 1024), torch.bfloat16, seed=1)
    ours, _ = quantize(w, PerBlock((128, 128)), E4M3FN)
    for formula, most in ((Formula.COMPRESSED_TENSORS, 0.06), (Formula.TRANSFORMERS, 0.01)):
        theirs, _ = quantize(w, PerBlock((128, 128)), E4M3FN, formula=formula)
        a, b = ours.view(torch.uint8).to(torch.int16), theirs.view(torch.uint8).to(torch.int16)
        share = float((a != b).float().mean())
        assert 0 < share < most, (formula, share)
        assert int((a - b).abs().max()) == 1  # same sign, neighbouring codes


def test_zero_weight_gets_a_positive_scale_in_every_mode():
    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    for fmt, formulas in ((E4M3FN, list(Formula)), (INT8, [Formula.STREAMQUANT, Formula.COMPRESSED_TENSORS]),
                          (INT4, [Formula.STREAMQUANT, Formula.COMPRESSED_TENSORS])):
        for formula in formulas:
            codes, scales = quantize(w, PerRow(), fmt, formula=formula)
            assert bool((scales > 0).all()) and bool(torch.isfinite(scales).all()), formula
            assert not bool(codes.float().ne(0).any()), formula


def test_integer_codes_have_no_transformers_mode():
    with pytest.raises(ValueError, match="formula 'transformers' writes fp8 codes; torch.int8 codes take"):
        quantize(weight((16, 32)), PerRow(), INT8, formula=Formula.TRANSFORMERS)


def test_integer_modes_differ_by_the_scale_rule_never_by_more_than_one_step():
    """streamquant's amax / 127 against the library's amax / 127.5 (int8; int4: / 7 against / 7.5): the
    codes are the same values on a grid about 0.4% (7%) finer, so many differ, each by one step."""
    w = weight((1024, 1024), torch.bfloat16, seed=1)
    for fmt, granularity, least, most in ((INT8, PerRow(), 0.05, 0.2), (INT4, PerBlock((1, 128)), 0.05, 0.3)):
        ours, _ = quantize(w, granularity, fmt)
        theirs, _ = quantize(w, granularity, fmt, formula=Formula.COMPRESSED_TENSORS)
        share = float((ours != theirs).float().mean())
        assert least < share < most, (fmt, share)
        assert int((ours.to(torch.int16) - theirs.to(torch.int16)).abs().max()) == 1


def test_formula_names():
    assert formula_of("compressed-tensors") is Formula.COMPRESSED_TENSORS
    with pytest.raises(ValueError, match="formula must be one of 'streamquant', 'compressed-tensors'"):
        formula_of("vllm")
