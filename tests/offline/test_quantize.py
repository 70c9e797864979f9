"""`quantize_checkpoint` (`offline/quantize.py`): all-or-nothing output, any number of workers gives the
same bytes, shards bounded, non-weight files copied, bad input named before anything is written. The
command line over it: tests/cli/test_quantize.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch
import transformers
from safetensors import safe_open

from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint
from streamquant.formats import QuantizationConfigError
from streamquant.models import UnsupportedArchitectureError
from streamquant.offline import quantize_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "tiny"
    write_synthetic_checkpoint(src, TINY_SPEC)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')
    return src


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_workers_write_bitwise_the_same_files(source, tmp_path):
    one = quantize_checkpoint(source, tmp_path / "one", "fp8-block", max_shard_size=100_000)
    two = quantize_checkpoint(source, tmp_path / "two", "fp8-block", max_shard_size=100_000, workers=2)
    assert one.shards == two.shards > 2
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_shards_index_and_other_files(source, tmp_path):
    report = quantize_checkpoint(source, tmp_path / "q", "fp8", max_shard_size=100_000)
    out = tmp_path / "q"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) == report.shards and report.bytes_out == sum((out / f).stat().st_size for f in shard_files)
    for file in shard_files:
        with safe_open(out / file, "pt") as handle:  # the library reads every file back
            names = list(handle.keys())
            sizes = [handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names]
        assert sum(sizes) <= 100_000 or len({n.removesuffix("_scale") for n in names}) == 1  # oversize: alone
        assert all(index["weight_map"][n] == file for n in names)
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "generation_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_a_failed_run_leaves_nothing_and_a_full_destination_is_refused(source, tmp_path):
    bad = tmp_path / "bad"
    write_synthetic_checkpoint(bad, TINY_SPEC)
    for file in bad.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(file)
        if "model.layers.1.mlp.down_proj.weight" in tensors:
            tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
            safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj.weight' holds NaN or Inf"):
        quantize_checkpoint(bad, out, "fp8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no destination, no hidden partial directory

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        quantize_checkpoint(source, out, "fp8")
    assert (out / "keep.txt").read_text() == "mine"
    quantize_checkpoint(source, out, "fp8", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_bad_requests_fail_before_writing(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QuantizationConfigError, match="'hf-fp8' stores block scales only"):
        quantize_checkpoint(source, out, "fp8-channel", format="hf-fp8")
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'"):
        quantize_checkpoint(source, out, "fp8", format="gguf")
    with pytest.raises(ValueError, match="ignore pattern 'qkv_prj' matches no linear or MoE layer"):
        quantize_checkpoint(source, out, "fp8", ignore=["qkv_prj"])
    with pytest.raises(ValueError, match="fp8_dtype=torch.float8_e4m3fnuz"):
        quantize_checkpoint(source, out, "fp8", fp8_dtype="e4m3fnuz")
    config = json.loads((source / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        quantize_checkpoint(other, out, "fp8")
    assert not out.exists()
    quantize_checkpoint(source, tmp_path / "q", "fp8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", out, "fp8")


@pytest.mark.parametrize(("key", "dtype", "want"), [("dtype", None, "bfloat16"), ("torch_dtype", None, "bfloat16"),
                                                    ("dtype", "float32", "float32"), (None, None, "bfloat16")])
def test_config_names_the_dtype_the_tensors_were_written_in(tmp_path, key, dtype, want):
    """A float32 checkpoint quantized with the default --dtype gets bf16 tensors, and its config says so under the
    key the source used (transformers 5's `dtype`, older `torch_dtype`; neither: `dtype`)."""
    src = tmp_path / "fp32"
    write_synthetic_checkpoint(src, dataclasses.replace(TINY_SPEC, dtype=torch.float32))
    config = json.loads((src / "config.json").read_text())
    assert config.pop("dtype") == "float32" and "torch_dtype" not in config
    if key is not None:
        config[key] = "float32"
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "q"
    quantize_checkpoint(src, out, "fp8", **({"dtype": dtype} if dtype else {}))
    written = json.loads((out / "config.json").read_text())
    assert written[key or "dtype"] == want and ({"dtype", "torch_dtype"} & set(written)) == {key or "dtype"}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(out / index["weight_map"]["model.norm.weight"], "pt") as handle:  # an unquantized tensor
        assert str(handle.get_tensor("model.norm.weight").dtype) == f"torch.{want}"
    assert transformers.AutoConfig.from_pretrained(out).dtype == getattr(torch, want)
