"""compressed-tensors int8 / int4 checkpoints for the tests, each written by means independent of streamquant:

  - `ct_checkpoint`: the compressed-tensors library's own arithmetic and compressors (its min-max
    `calculate_qparams` per channel / group, `IntQuantizationCompressor` / `PackedQuantizationCompressor`),
    the reference weights what its `decompress` gives back;
  - `numpy_checkpoint`: a numpy writer of `pack-quantized` int4 written from the format's description
    (codes + 8 in nibble i of word k for input column 8k + i, zero points + 8 packed the same way along
    the output, `weight_g_idx` for activation order, which compressed-tensors 0.19+ no longer writes),
    the reference weights `(code - zero[g_idx]) * scale[g_idx]` computed in numpy.
Both write (checkpoint dir, dense dir): the dense one holds the reference weights in the model dtype,
for transformers to run. Every linear projection is quantized (experts per expert), the router, the
embeddings and the LM head are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from streamquant.checkpoint.reader import iterate_weights

QUANTIZED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def quantized(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in QUANTIZED


def _write(src: Path, out: Path, tensors: dict, quantization_config: dict | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _ct_args(scheme: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "int8":
        return (QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True),
                QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True))
    return QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group_size,
                            symmetric=scheme == "int4"), None


def ct_checkpoint(src: Path, root: Path, scheme: str, group_size: int = 32) -> tuple[Path, Path]:
    """`scheme`: "int8" (W8A8, int-quantized), "int4" or "int4-asym" (W4A16, pack-quantized)."""
    from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    weights, activations = _ct_args(scheme, group_size)
    qscheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    compressor = IntQuantizationCompressor if scheme == "int8" else PackedQuantizationCompressor
    packed, dense = {}, {}
    for name, tensor in iterate_weights(src):
        t = tensor.to(torch.bfloat16)
        if not quantized(name):
            packed[name] = dense[name] = t
            continue
        grouped = t.unsqueeze(-2) if scheme == "int8" else t.unflatten(-1, (-1, group_size))  # [out, groups, n]
        scale, zero = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), weights)
        state = {"weight": t, "weight_scale": scale}
        if not weights.symmetric:
            state["weight_zero_point"] = zero
        compressed = compressor.compress(state, qscheme)
        module = name[: -len(".weight")]
        packed.update({f"{module}.{k}": v for k, v in compressed.items()})
        dense[name] = compressor.decompress(dict(compressed), qscheme)["weight"].to(torch.bfloat16)
    fmt = "int-quantized" if scheme == "int8" else "pack-quantized"
    config = QuantizationConfig(config_groups={"group_0": qscheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"]).model_dump(mode="json")
    out = root / f"ct-{scheme}-{group_size}"
    return _write(src, out, packed, config), _write(src, root / f"{out.name}-dense", dense, None)


def pack_columns(q: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], [rows, cols] -> int32 [rows, cols / 8]: value + 8 of column 8k + i in bits 4i."""
    nibbles = (q.astype(np.int64) + 8).astype(np.uint32).reshape(q.shape[0], -1, 8)
    words = np.zeros(nibbles.shape[:2], dtype=np.uint32)
    for i in range(8):
        words |= nibbles[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()


def numpy_int4(w: np.ndarray, group_size: int, symmetric: bool, g_idx: np.ndarray):
    """(codes, bf16-valued float32 scales, zero points or None, float32 reference) of one weight whose
    column j belongs to group g_idx[j]: min-max over each group's columns, compressed-tensors' formula."""
    groups = int(g_idx.max()) + 1
    lo = np.stack([np.minimum(w[:, g_idx == k].min(axis=1), 0) for k in range(groups)], axis=1)
    hi = np.stack([np.maximum(w[:, g_idx == k].max(axis=1), 0) for k in range(groups)], axis=1)
    if symmetric:
        scales = _bf16(np.maximum(np.abs(lo), hi) / np.float32(7.5))
        zeros = np.zeros_like(scales, dtype=np.int64)
    else:
        scales = _bf16((hi - lo) / np.float32(15))
    scales = np.where(scales == 0, np.float32(2 ** -20), scales).astype(np.float32)
    if not symmetric:
        zeros = np.clip(np.rint(-8 - lo / scales), -8, 7).astype(np.int64)
    codes = np.clip(np.rint(w / scales[:, g_idx]) + zeros[:, g_idx], -8, 7).astype(np.int64)
    reference = ((codes - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx]).astype(np.float32)
    return codes, scales, (None if symmetric else zeros), reference


def numpy_checkpoint(src: Path, root: Path, symmetric: bool, group_size: int, act_order: bool,
                     seed: int = 0) -> tuple[Path, Path]:
    """pack-quantized int4 from numpy; with `act_order` every weight gets its own random column order."""
    rng = np.random.default_rng(seed)
    packed, dense = {}, {}
    for name, tensor in iterate_weights(src):
        t = tensor.to(torch.bfloat16)
        if not quantized(name):
            packed[name] = dense[name] = t
            continue
        w = t.float().numpy()
        cols = w.shape[1]
        g_idx = np.arange(cols) // group_size
        if act_order:
            g_idx = np.empty(cols, dtype=np.int64)
            g_idx[rng.permutation(cols)] = np.arange(cols) // group_size
        codes, scales, zeros, reference = numpy_int4(w, group_size, symmetric, g_idx)
        module = name[: -len(".weight")]
        packed[f"{module}.weight_packed"] = torch.from_numpy(pack_columns(codes))
        packed[f"{module}.weight_scale"] = torch.from_numpy(scales).bfloat16()
        packed[f"{module}.weight_shape"] = torch.tensor(w.shape, dtype=torch.int64)
        if zeros is not None:
            packed[f"{module}.weight_zero_point"] = torch.from_numpy(pack_columns(zeros.T).T.copy())
        if act_order:
            packed[f"{module}.weight_g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        dense[name] = torch.from_numpy(reference).bfloat16()
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": "group" if act_order else None, "observer": "minmax"}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                            "output_activations": None}}, "ignore": ["lm_head"], "version": "0.9.1"}
    out = root / f"np-{'sym' if symmetric else 'asym'}-{group_size}{'-actorder' if act_order else ''}"
    return _write(src, out, packed, config), _write(src, root / f"{out.name}-dense", dense, None)
