"""Whole GPTQ / AWQ checkpoints made from a float Hugging Face checkpoint by round-to-nearest (GPTQ's min-max
quantizer, written with numpy), with the dequantized float checkpoint beside each as the reference model.

Quantized: every 2-D `.weight` of a decoder layer's attention and MLP (experts included), except the MoE
router (`mlp.gate`, `shared_expert_gate`). The codes are packed by `int4_layouts`' writers; config.json gets
the format's `quantization_config` (or, with `quantize_config_json`, GPTQ's quantize_config.json beside it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from streamquant.checkpoint.reader import iterate_weights

from .int4_layouts import Layer, awq_tensors, gptq_tensors

QUANTIZED = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\..*\.weight$")
ROUTERS = re.compile(r"\.mlp\.(gate|shared_expert_gate)\.weight$")


def rtn_layer(weight: np.ndarray, group: int | None, *, sym: bool, act_order: bool, rng) -> Layer:
    """GPTQ's min-max round-to-nearest over the columns of each group (scales rounded to fp16 first)."""
    out, inp = weight.shape
    size = group or inp
    g_idx = np.arange(inp, dtype=np.int32) // size
    if act_order:
        g_idx = g_idx[rng.permutation(inp)]
    groups = inp // size
    q = np.empty((out, inp), np.uint8)
    z = np.empty((out, groups), np.uint8)
    scales = np.empty((out, groups), np.float16)
    for g in range(groups):
        cols = np.flatnonzero(g_idx == g)
        w = weight[:, cols].astype(np.float32)
        lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        scale = np.where(hi > lo, (hi - lo) / 15, 1).astype(np.float16)
        zero = np.full(out, 8.0, np.float32) if sym else np.round(-lo / scale.astype(np.float32))
        q[:, cols] = np.clip(np.round(w / scale[:, None].astype(np.float32)) + zero[:, None], 0, 15)
        z[:, g], scales[:, g] = np.clip(zero, 0, 15), scale
    return Layer(q, z, scales, g_idx)


def write_int4_checkpoint(src: Path, dst: Path, fmt: str, *, sym: bool = False, desc_act: bool = False,
                          v1: bool = True, group: int | None = 16, quantize_config_json: bool = False,
                          seed: int = 0) -> tuple[Path, Path]:
    """(the GPTQ / AWQ checkpoint, its dequantized float32 reference) written under dst."""
    rng = np.random.default_rng(seed)
    quantized, reference = {}, {}
    for name, tensor in iterate_weights(src):
        if not (QUANTIZED.search(name) and not ROUTERS.search(name) and tensor.dim() == 2):
            quantized[name] = reference[name] = tensor.clone()
            continue
        layer = rtn_layer(tensor.float().numpy(), group, sym=sym, act_order=desc_act, rng=rng)
        module = name.removesuffix(".weight")
        parts = gptq_tensors(layer, v1) if fmt == "gptq" else awq_tensors(layer)
        quantized.update({f"{module}.{k}": v for k, v in parts.items()})
        reference[name] = torch.from_numpy(layer.weight().astype(np.float32))
    config = json.loads((src / "config.json").read_text())
    if fmt == "gptq":
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group or -1, "sym": sym, "desc_act": desc_act,
                 "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32"}
    else:
        quant = {"quant_method": "awq", "bits": 4, "group_size": group or -1, "zero_point": True, "version": "gemm"}
    for out, tensors, extra in ((dst / fmt, quantized, quant), (dst / "reference", reference, None)):
        out.mkdir(parents=True, exist_ok=True)
        written = dict(config)
        if extra is not None and quantize_config_json:
            (out / "quantize_config.json").write_text(json.dumps(extra))
        elif extra is not None:
            written["quantization_config"] = extra
        (out / "config.json").write_text(json.dumps(written))
        safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return dst / fmt, dst / "reference"
