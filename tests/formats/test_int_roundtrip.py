"""int8 / int4 checkpoints `quantize_checkpoint` writes in the compressed-tensors format, read by that
library: its config parser takes the `quantization_config` and picks the format we wrote for the
scheme, its own decompressors turn our tensors into exactly the weights our online load dequantizes,
and the codes, scales and zero points on disk are bitwise the online load's parameters (int4 codes:
the same packed int32 words). Dense and MoE, symmetric and asymmetric int4, W8A8 and W8A16, both
formulas. (Loading these checkpoints with `load_model` is the read side's test.)"""

from __future__ import annotations

import json

import pytest
import torch

from hf_cases import CASES, make_checkpoint

from streamquant import load_model
from streamquant.offline import quantize_checkpoint
from streamquant.quant.math.int4_pack import unpack_int4_rows
from streamquant.quant.scaled.readback import dequantize_weight
from streamquant.quant.scaled.weights import shard_layouts

from .helpers import tensors

ct_quantization = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402

# (scheme, options): W8A8, W8A16, W4A16 and W4A16_ASYM (groups of 32: the tiny models' inputs are 32 to 96 wide)
VARIANTS = [("int8", {}), ("int8", {"activation_scheme": "none"}), ("int4", {"group_size": 32}),
            ("int4", {"group_size": 32, "symmetric": False})]
VARIANT_IDS = ["w8a8", "w8a16", "w4a16", "w4a16-asym"]
LABELS = {"q": "q", "k": "k", "v": "v", 0: "gate", 1: "up", "w1": "gate", "w3": "up", "w2": "down", None: ""}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("int")
    return {name: make_checkpoint(next(c for c in CASES if c.name == name), root) for name in ("llama", "qwen3moe")}


def online_pieces(model, name: str):
    """(codes rows, float32 scale rows, zero point rows or None, dequantized rows in bf16) of checkpoint
    weight `name` in the online model: its logical shard (q, gate, an expert's down, ...) of its layer."""
    param_name, kwargs = model.weight_mapping.map(name)
    mod_name, pname = param_name.rsplit(".", 1)
    module = model.get_submodule(mod_name)
    lay = {x.label: x for x in shard_layouts(module.logical_shards[pname], module.quant_method.spec.granularity)}[
        LABELS[kwargs.get("shard_id")]]
    codes, scales = getattr(module, pname), getattr(module, f"{pname}_scale")
    zeros = getattr(module, f"{pname}_zero_point", None)
    if zeros is not None:
        zeros = unpack_int4_rows(zeros)  # stored packed eight rows per int32, as on disk
    expert = kwargs.get("expert_id")
    if expert is not None:
        codes, scales, zeros = codes[expert], scales[expert], None if zeros is None else zeros[expert]
    zeros_rows = None if zeros is None else zeros[lay.scale_rows]
    # the layer's own dequantization (what its weight-only matmul multiplies by), of this shard
    deq = dequantize_weight(codes, scales, [lay], torch.bfloat16, zeros)[lay.rows]
    return codes[lay.rows], scales[lay.scale_rows], zeros_rows, deq


def quantized_names(written: dict) -> list[str]:
    return sorted(n[: -len("_scale")] for n in written if n.endswith(".weight_scale"))


@pytest.mark.parametrize("formula", ["streamquant", "compressed-tensors"])
@pytest.mark.parametrize("scheme,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", ["llama", "qwen3moe"])
def test_written_tensors_are_the_online_load_and_the_library_decompresses_them_to_its_weights(
        sources, tmp_path, case, scheme, options, formula):
    report = quantize_checkpoint(sources[case], tmp_path / "q", scheme, formula=formula, **options)
    written = tensors(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    parsed = ct_quantization.QuantizationConfig.model_validate(config)
    scheme_args = parsed.config_groups["group_0"]
    fmt = infer_module_format(torch.nn.Linear, scheme_args)  # the library's own choice for this scheme
    assert fmt.value == config["format"] == scheme_args.format
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    model = load_model(sources[case], quantization=scheme, formula=formula, **options)
    names = quantized_names(written)
    assert len(names) == report.quantized_tensors > 8
    packed, bits = fmt.value == "pack-quantized", scheme_args.weights.num_bits
    for name in names:
        stem = name[: -len(".weight")]
        codes, scales, zeros, deq = online_pieces(model, name)
        on_disk = {k.removeprefix(stem + "."): v for k, v in written.items() if k.rsplit(".", 1)[0] == stem}
        assert sorted(on_disk) == sorted(compressor.compression_param_names(scheme_args)), name
        want_scale_dtype = torch.bfloat16 if formula == "compressed-tensors" else torch.float32
        assert on_disk["weight_scale"].dtype == want_scale_dtype
        assert torch.equal(on_disk["weight_scale"].float(), scales), name
        if packed:
            assert on_disk["weight_shape"].tolist() == [deq.shape[0], deq.shape[1]]
            disk_codes = on_disk["weight_packed"]
            if bits == 4:  # the online parameter holds the same words
                assert torch.equal(disk_codes, codes), name
            else:
                assert torch.equal(unpack_from_int32(disk_codes, 8, deq.shape), codes), name
        else:
            assert torch.equal(on_disk["weight"], codes), name
        if zeros is not None:
            assert torch.equal(unpack_from_int32(on_disk["weight_zero_point"], 4, tuple(scales.shape), packed_dim=0),
                               zeros), name
        weight = compressor.decompress(dict(on_disk), scheme_args)["weight"]
        assert torch.equal(weight.to(torch.bfloat16), deq), name


def test_transformers_loads_what_we_write(sources, tmp_path):
    """transformers' compressed-tensors integration (decompressing on CPU) on a W4A16_ASYM llama: its
    logits are a bf16 model's with the weights our online int4 load dequantizes."""
    import transformers

    quantize_checkpoint(sources["llama"], tmp_path / "q", "int4", group_size=32, symmetric=False,
                        formula="compressed-tensors")
    config = transformers.CompressedTensorsConfig(run_compressed=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=config,
                                                           dtype=torch.bfloat16)
    model = load_model(sources["llama"], quantization="int4", group_size=32, symmetric=False,
                       formula="compressed-tensors")
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(module.weight.detach(), online_pieces(model, f"{name}.weight")[3]), name
