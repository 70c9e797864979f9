"""Helpers for the fp8 model tests: the independent per-checkpoint-tensor reference, dequantized
checkpoints for transformers, and access to a model's fp8 tensors.

The reference quantizes each checkpoint tensor on its own (q_proj, k_proj, gate_proj, one expert's
down_proj ...) with `fp8_reference` (numpy + ml_dtypes), which is what per-shard scales promise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from streamquant.checkpoint.reader import iterate_weights
from streamquant.quant.scaled.weights import shard_layouts
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor
from streamquant.quant.math.int4_pack import unpack_int4

from .fp8_reference import ref_dequantize, ref_pack_int4, ref_quantize, to_f32

FP8_SCHEMES = ("fp8", "fp8-channel", "fp8-block")  # the ones with a choice of fp8 dtype and formula
SCHEMES = FP8_SCHEMES + ("int8", "mxfp8", "int4")
GRANULARITY = {"fp8": PerTensor(), "fp8-channel": PerRow(), "fp8-block": PerBlock((128, 128)), "int8": PerRow(),
               "mxfp8": PerBlock((1, 32)), "int4": PerBlock((1, 128))}
# shard ids of the mapping rules -> the label of the logical shard they fill
LABELS = {"q": "q", "k": "k", "v": "v", 0: "gate", 1: "up", "w1": "gate", "w3": "up", "w2": "down"}


def ref_tile(scheme: str, shape) -> tuple[int, int]:
    return {"fp8": tuple(shape), "fp8-channel": (1, shape[1]), "fp8-block": (128, 128), "int8": (1, shape[1]),
            "mxfp8": (1, 32), "int4": (1, 128)}[scheme]


def code_dtype(scheme: str, fp8: torch.dtype) -> torch.dtype:
    """The dtype a scheme's codes are computed in (`fp8` is the fp8 schemes' choice; int4 codes are int8
    values before packing)."""
    return torch.int8 if scheme in ("int8", "int4") else fp8


def stored_dtype(scheme: str, fp8: torch.dtype) -> torch.dtype:
    """The dtype of the codes parameter: int4 is stored packed in int32."""
    return torch.int32 if scheme == "int4" else code_dtype(scheme, fp8)


def ref_scheme_quantize(w: np.ndarray, scheme: str, fp8: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The reference (codes, scales) of one logical weight under `scheme`."""
    return ref_quantize(w, ref_tile(scheme, w.shape), code_dtype(scheme, fp8), mx=scheme == "mxfp8",
                        bits=4 if scheme == "int4" else 8)


def quantized_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, "checkpoint_params", None)}


def checkpoint_pieces(model, path: Path):
    """Yield (checkpoint name, module name, param name, label, expert or None, 2-D float32 weight)
    for every checkpoint tensor that lands in a quantized parameter, split into logical weights."""
    modules = dict(model.named_modules())
    for name, tensor in iterate_weights(path):
        if model.weight_mapping.should_skip(name):
            continue
        param_name, kwargs = model.weight_mapping.map(name)
        mod_name, pname = param_name.rsplit(".", 1)
        if pname not in (getattr(modules[mod_name], "checkpoint_params", None) or {}):
            continue
        shard = kwargs.get("shard_id")
        experts = [kwargs.get("expert_id")] if tensor.dim() == 2 else list(range(tensor.shape[0]))
        for e in experts:
            w = tensor if tensor.dim() == 2 else tensor[e]
            if shard == "w13":
                half = w.shape[0] // 2
                yield name, mod_name, pname, "gate", e, w[:half]
                yield name, mod_name, pname, "up", e, w[half:]
            else:
                yield name, mod_name, pname, LABELS.get(shard, ""), e, w


def check_against_reference(model, path: Path, scheme: str, fp8: torch.dtype) -> int:
    """Assert every quantized shard's codes and scales equal the reference's bit for bit (TP=1).
    Returns how many logical weights were compared; also asserts none was left unchecked."""
    modules = dict(model.named_modules())
    seen = set()
    for name, mod_name, pname, label, e, w in checkpoint_pieces(model, path):
        module = modules[mod_name]
        layout = {lay.label: lay for lay in shard_layouts(module.logical_shards[pname], GRANULARITY[scheme])}[label]
        codes, scales = getattr(module, pname), getattr(module, f"{pname}_scale")
        if e is not None:
            codes, scales = codes[e], scales[e]
        w = w.to(model.params_dtype)  # the load converts the checkpoint to the model dtype first
        ref_codes, ref_scales = ref_scheme_quantize(to_f32(w), scheme, fp8)
        if scheme == "int4":  # the packed words against the reference's own packing
            ours, ref_codes = codes[layout.rows].contiguous().numpy(), ref_pack_int4(ref_codes)
        else:
            ours = codes[layout.rows].contiguous().view(torch.uint8).numpy()
        np.testing.assert_array_equal(ours, ref_codes, err_msg=f"{name} ({label}, expert {e})")
        np.testing.assert_array_equal(scales[layout.scale_rows].numpy(), ref_scales, err_msg=f"{name} scales")
        seen.add((mod_name, pname, label, e))
    expected = set()
    for mod_name, module in quantized_modules(model).items():
        for pname, shards in module.logical_shards.items():
            experts = [None] if getattr(module, pname).dim() == 2 else range(getattr(module, pname).shape[0])
            expected |= {(mod_name, pname, s.label, e) for s in shards for e in experts}
    assert seen == expected, expected - seen
    return len(seen)


def write_dequantized_checkpoint(model, path: Path, scheme: str, fp8: torch.dtype, out: Path) -> Path:
    """A copy of the checkpoint at `path` whose quantized tensors hold the reference's float32
    dequantization (per logical weight), for transformers to run."""
    tensors = {name: t.float().clone() for name, t in iterate_weights(path)}
    for name, _, _, label, e, w in checkpoint_pieces(model, path):
        tile = ref_tile(scheme, w.shape)
        codes, scales = ref_scheme_quantize(to_f32(w), scheme, fp8)
        deq = torch.from_numpy(ref_dequantize(codes, scales, tile, code_dtype(scheme, fp8), torch.float32)
                               .view(np.float32).copy())
        target = tensors[name] if e is None or tensors[name].dim() == 2 else tensors[name][e]
        if label in ("gate", "up") and target.shape[0] == 2 * w.shape[0]:
            half = w.shape[0]
            target = target[:half] if label == "gate" else target[half:]
        target.copy_(deq)
    out.mkdir(parents=True, exist_ok=True)
    for extra in path.iterdir():
        if extra.suffix == ".json":
            (out / extra.name).write_text(extra.read_text())
    for index in out.glob("*.index.json"):
        index.unlink()
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def fp8_state(model) -> dict[str, torch.Tensor]:
    """Every code and scale tensor of the model, by name, codes as raw bytes (packed int4 codes unpacked
    to one int8 byte each, so windows slice them like any code tensor); compare with torch.equal."""
    state = {}
    for mod_name, module in quantized_modules(model).items():
        for pname in module.checkpoint_params:
            codes = getattr(module, pname).detach()
            codes = unpack_int4(codes) if codes.dtype == torch.int32 else codes
            state[f"{mod_name}.{pname}"] = codes.view(torch.uint8).clone()
            state[f"{mod_name}.{pname}_scale"] = getattr(module, f"{pname}_scale").detach().clone()
    return state
