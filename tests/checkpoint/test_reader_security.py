"""Nothing from a checkpoint runs or reaches outside it: shard paths, remote code, pickles.

Each case is how an attacker would write a checkpoint; the rule is enforced in checkpoint.reader
for every caller (load, reload from disk, the CLI)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from streamquant.api import load_model
from streamquant.checkpoint.reader import CheckpointError, checkpoint_files, iterate_weights, load_hf_config
from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture
def tiny(tmp_path):
    return write_synthetic_checkpoint(tmp_path / "ckpt", TINY_SPEC)


def point_index_at(directory: Path, shard_name: str) -> None:
    """Make the index name `shard_name` for every tensor of its first shard."""
    index = json.loads((directory / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (shard_name if v == first else v) for k, v in index["weight_map"].items()}
    (directory / INDEX).write_text(json.dumps(index))
    return first


@pytest.mark.parametrize("how", ["parent", "absolute", "nested-parent", "backslash"])
def test_index_shards_outside_the_directory_are_refused(tiny, tmp_path, how):
    outside = tmp_path / "elsewhere.safetensors"
    first = sorted(set(json.loads((tiny / INDEX).read_text())["weight_map"].values()))[0]
    os.replace(tiny / first, outside)  # a complete, readable shard: only its place is wrong
    name = {"parent": "../elsewhere.safetensors", "absolute": str(outside),
            "nested-parent": "sub/../../elsewhere.safetensors", "backslash": "..\\elsewhere.safetensors"}[how]
    point_index_at(tiny, name)
    with pytest.raises(CheckpointError, match=r"names shard .*elsewhere\.safetensors"):
        checkpoint_files(tiny)
    with pytest.raises(CheckpointError, match="elsewhere"):
        load_model(tiny)


def test_a_folder_symlinked_outside_is_refused(tiny, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(json.loads((tiny / INDEX).read_text())["weight_map"].values()))[0]
    os.replace(tiny / first, outside / first)
    (tiny / "sub").symlink_to(outside, target_is_directory=True)
    point_index_at(tiny, f"sub/{first}")
    with pytest.raises(CheckpointError, match="through a symlink"):
        checkpoint_files(tiny)


def test_symlinked_shard_files_are_followed_as_in_the_hub_cache(tiny, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    expected = dict(iterate_weights(tiny))
    for shard in sorted(set(json.loads((tiny / INDEX).read_text())["weight_map"].values())):
        os.replace(tiny / shard, blobs / shard)
        (tiny / shard).symlink_to(blobs / shard)
    got = dict(iterate_weights(tiny))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def write_remote_code_config(directory: Path, marker: Path) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "evil-remote", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (directory / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-remote'\n")


def test_remote_code_is_never_run_nor_prompted_for(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    directory = tmp_path / "remote"
    write_remote_code_config(directory, marker)
    monkeypatch.setattr(sys, "stdin", None)  # a prompt would fail here instead of waiting
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted for trust_remote_code"))
    with pytest.raises(CheckpointError, match=r"auto_map.*never runs; not supported"):
        load_hf_config(directory)
    with pytest.raises(CheckpointError, match="not supported"):
        load_model(directory)
    assert not marker.exists()


class Payload:
    """Unpickling this would call os.system; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_bin_pickle_that_wants_code_is_refused_in_one_line(tmp_path):
    directory = write_synthetic_checkpoint(tmp_path / "bin", TINY_SPEC)
    for file in directory.glob("*.safetensors"):
        file.unlink()
    (directory / INDEX).unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds more than tensors") as info:
        list(iterate_weights(directory))
    assert "\n" not in str(info.value)


def test_kimi_k2_config_is_parsed_as_deepseek_v3_without_its_code(tmp_path):
    """Kimi K2 names model_type "kimi_k2" and ships DeepSeek-V3's configuration class as its own code: parsed by
    transformers' DeepseekV3Config, nothing of the checkpoint imported."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "n_group": 1, "topk_group": 1,
              "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "hidden_size": 64,
              "num_attention_heads": 4, "kv_lora_rank": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_deepseek.py").write_text("raise SystemExit('checkpoint code ran')\n")
    parsed = load_hf_config(tmp_path)
    assert type(parsed).__name__ == "DeepseekV3Config" and parsed.architectures == ["DeepseekV3ForCausalLM"]
    assert (parsed.n_group, parsed.kv_lora_rank, parsed.qk_rope_head_dim) == (1, 16, 64)
