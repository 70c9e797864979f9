"""Whole GPTQ and AWQ checkpoints (dense and MoE) streamed from disk through `to_compressed_tensors`: every
converted layer, decompressed by the compressed-tensors library, equals the dequantized reference checkpoint
bitwise, every other tensor passes through unchanged, and the header shapes a load plans with are the
shapes the stream then emits."""

from __future__ import annotations

import pytest
import torch

from streamquant.checkpoint.reader import checkpoint_shapes, iterate_weights
from streamquant.formats import (
    checkpoint_quantization_config,
    read_quantization_config,
    shapes_as_compressed_tensors,
    to_compressed_tensors,
)
from hf_cases import CASES, make_checkpoint

from .int4_checkpoints import write_int4_checkpoint
from .int4_layouts import ct_decompress

BY_NAME = {c.name: c for c in CASES}
VARIANTS = {
    "gptq-v1-asym-desc_act": dict(fmt="gptq", sym=False, desc_act=True, v1=True),
    "gptq-v2-sym-quantize_config": dict(fmt="gptq", sym=True, v1=False, quantize_config_json=True),
    "gptq-v1-sym-channel": dict(fmt="gptq", sym=True, group=None),
    "awq": dict(fmt="awq"),
}


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4_float")
    return {name: make_checkpoint(BY_NAME[name], root) for name in ("llama", "qwen3moe")}


@pytest.mark.parametrize("case", ["llama", "qwen3moe"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_converts_bitwise(case, variant, float_checkpoints, tmp_path):
    checkpoint_dir, reference_dir = write_int4_checkpoint(float_checkpoints[case], tmp_path, **VARIANTS[variant])
    checkpoint = read_quantization_config(checkpoint_quantization_config(checkpoint_dir))
    reference = dict(iterate_weights(reference_dir))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    shapes = shapes_as_compressed_tensors(checkpoint_shapes(checkpoint_dir), checkpoint)  # what a plan sees
    for name, tensor in to_compressed_tensors(iterate_weights(checkpoint_dir), checkpoint):
        assert shapes.pop(name) == tuple(tensor.shape), name
        module, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_"):
            layers.setdefault(module, {})[leaf] = tensor
        else:
            assert torch.equal(tensor, reference.pop(name)), name
    assert layers and (case != "qwen3moe" or any(".experts." in m for m in layers))
    for module, converted in layers.items():
        weight = ct_decompress(converted, checkpoint.compressed_tensors_config())
        assert torch.equal(weight.float(), reference.pop(f"{module}.weight")), module
    assert not reference and not shapes  # every tensor of the reference model, every header shape accounted for
