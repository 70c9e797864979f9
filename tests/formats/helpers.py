"""Shared helpers for the format tests: edited copies of the `fp8_checkpoints` fixture's checkpoints, and a
checkpoint directory's tensors read with safetensors itself (independent of streamquant's reader)."""

from __future__ import annotations

import json
import shutil

import safetensors.torch
from safetensors import safe_open


def tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def variant(fp8_checkpoints, tmp_path, which, edit_config=None, edit_tensors=None):
    out = tmp_path / which
    shutil.copytree(fp8_checkpoints / which, out)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        for file in out.glob("*.safetensors"):
            tensors = safetensors.torch.load_file(file)
            edit_tensors(tensors)
            safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return out


def group(config):
    return config["config_groups"]["group_0"]
