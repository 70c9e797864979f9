"""`quantize_checkpoint` then `load_model`: bitwise the online load, every architecture, both formats,
every formula, TP 1 and 2; independent readers (transformers + compressed-tensors) see the same
weights; reload of a model loaded from an fp8 checkpoint equals offline quantization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_cases import CASE_IDS, CASES, make_checkpoint
import safetensors.torch
from safetensors import safe_open

from streamquant import load_model
from streamquant.offline import quantize_checkpoint
from streamquant.parallel.context import TPContext
from streamquant.quant.math.code_format import E4M3FN
from streamquant.quant.math.quantize import dequantize, quantize
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor
from streamquant.loading.contract import inference_tensors
from streamquant.reload import reload_weights

# (scheme, format, formula): every format with every formula it may carry
VARIANTS = [("fp8", "compressed-tensors", "compressed-tensors"), ("fp8-channel", "compressed-tensors", "streamquant"),
            ("fp8-block", "compressed-tensors", "transformers"), ("fp8-block", "hf-fp8", "transformers"),
            ("fp8-block", "hf-fp8", "streamquant")]
GRANULARITY = {"fp8": PerTensor(), "fp8-channel": PerRow(), "fp8-block": PerBlock((128, 128))}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)


def assert_models_bitwise_equal(a, b):
    ta, tb = inference_tensors(a), inference_tensors(b)
    assert ta.keys() == tb.keys()
    bad = [k for k in ta if not same(ta[k], tb[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case.name: make_checkpoint(case, root) for case in CASES}


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("scheme,fmt,formula", VARIANTS)
def test_quantize_then_load_is_the_online_load(sources, tmp_path, case, scheme, fmt, formula):
    out = tmp_path / "q"
    report = quantize_checkpoint(sources[case], out, scheme, format=fmt, formula=formula)
    assert report.quantized_tensors > 0 and report.bytes_out < report.bytes_in
    loaded = load_model(out)
    assert loaded.load_report.quantization == scheme and loaded.prequantized.formula.value == formula
    assert_models_bitwise_equal(load_model(sources[case], quantization=scheme, formula=formula), loaded)


def _tp_state(path, kwargs):
    tp = TPContext.from_process_group()
    model = load_model(path, tp=tp, **kwargs)
    # fp8 travels back as its bytes (torch's multiprocessing pickling has no fp8 storages)
    return {k: (v.view(torch.uint8) if v.dtype.itemsize == 1 else v).clone() for k, v in inference_tensors(model).items()}


@pytest.mark.parametrize("case", ["llama", "qwen3moe"])
@pytest.mark.parametrize("scheme,fmt,formula", [VARIANTS[0], VARIANTS[3]])
def test_pre_quantized_load_at_tp2_is_the_online_load(ranks, sources, tmp_path, case, scheme, fmt, formula):
    out = tmp_path / "q"
    quantize_checkpoint(sources[case], out, scheme, format=fmt, formula=formula)
    got = ranks.run(_tp_state, 2, out, {})
    want = ranks.run(_tp_state, 2, sources[case], {"quantization": scheme, "formula": formula})
    assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in got)


def test_block_grid_straddling_ranks_is_split_not_refused(ranks, tmp_path):
    """hidden 64 over 2 ranks: every rank's rows are half of one 128-row block; both keep its scale."""
    from hf_cases import Case

    case = Case("wide", "LlamaConfig", "LlamaForCausalLM", tuple(sorted(dict(
        vocab_size=97, hidden_size=192, intermediate_size=320, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64).items())))
    src = make_checkpoint(case, tmp_path)
    quantize_checkpoint(src, tmp_path / "q", "fp8-block", format="hf-fp8")
    got = ranks.run(_tp_state, 2, tmp_path / "q", {})
    want = ranks.run(_tp_state, 2, src, {"quantization": "fp8-block"})
    assert all(same(got[k], want[k]) for k in got)


@pytest.mark.parametrize("scheme,fmt,formula", VARIANTS)
def test_transformers_reads_the_same_weights(sources, tmp_path, scheme, fmt, formula):
    """transformers' own loader (compressed-tensors' decompressor / FineGrainedFP8 dequantize) on CPU."""
    import transformers

    out = tmp_path / "q"
    quantize_checkpoint(sources["llama"], out, scheme, format=fmt, formula=formula)
    config = (transformers.CompressedTensorsConfig(run_compressed=False) if fmt == "compressed-tensors"
              else transformers.FineGrainedFP8Config(dequantize=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, quantization_config=config, dtype=torch.bfloat16)
    source = transformers.AutoModelForCausalLM.from_pretrained(sources["llama"], dtype=torch.bfloat16)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = source.get_submodule(name).weight.detach()
        codes, scales = quantize(w, GRANULARITY[scheme], E4M3FN, formula=formula)
        expected = dequantize(codes, scales, GRANULARITY[scheme], torch.bfloat16)
        assert same(hf.get_submodule(name).weight.detach(), expected), name


def test_compressed_tensors_library_parses_what_we_write(sources, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    for scheme in ("fp8", "fp8-channel", "fp8-block"):
        out = tmp_path / scheme
        quantize_checkpoint(sources["qwen2moe"], out, scheme, ignore=[r"layers\.0\.self_attn"])
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        parsed = QuantizationConfig.model_validate(config)
        weights = parsed.config_groups["group_0"].weights
        assert str(getattr(weights.strategy, "value", weights.strategy)) == {"fp8": "tensor", "fp8-channel": "channel", "fp8-block": "block"}[scheme]
        # ignore: HF module names (q/k/v of the ignored fused layer, the routers, lm_head), not streamquant's
        assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "lm_head",
                "model.layers.0.mlp.gate"} <= set(parsed.ignore)
        with safe_open(next(out.glob("*.safetensors")), "pt") as f:
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
            assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("scheme,fmt,formula", [VARIANTS[0], VARIANTS[3]])
def test_reload_bf16_into_a_model_loaded_from_fp8_equals_offline_quantization(sources, tmp_path, scheme, fmt,
                                                                             formula):
    """The RL case: start from a published fp8 model, refit with bf16 weights; quantized with the
    checkpoint's scheme and formula, bitwise what quantizing the new weights offline gives."""
    other = tmp_path / "other"  # the same model with other weights
    shutil.copytree(sources["llama"], other)
    for file in other.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(file)
        safetensors.torch.save_file({k: v * 1.5 for k, v in tensors.items()}, file, metadata={"format": "pt"})
    quantize_checkpoint(other, tmp_path / "start", scheme, format=fmt, formula=formula)
    quantize_checkpoint(sources["llama"], tmp_path / "a", scheme, format=fmt, formula=formula)
    model = load_model(tmp_path / "start")
    addresses = {k: t.data_ptr() for k, t in inference_tensors(model).items()}
    reload_weights(model, sources["llama"])
    assert {k: t.data_ptr() for k, t in inference_tensors(model).items()} == addresses
    assert_models_bitwise_equal(model, load_model(tmp_path / "a"))
