"""Independent GPTQ / AWQ writers and readers (numpy, written from each format's own packing code), and the
compressed-tensors library's decompression of the converted layout, for the gptq / awq / int4 tests.

Ground truth is a `Layer`: unsigned codes q [out, in] and zero points z [out, groups] in 0..15, fp16
scales [out, groups] and the group of each input column. Its weight is (q - z) * scale in fp16.
  - GPTQ (AutoGPTQ's `pack`): qweight[r, o] |= q[o, 8r + j] << 4j; qzeros[g, c] |= z[8c + j, g] << 4j; v1
    stores z - 1, computed as GPTQModel's v2 -> v1 save does, one subtraction of 0x11111111 per word
    modulo 2^32 (a zero point of 0 borrows from the next nibble);
  - AWQ (AutoAWQ's `WQLinear_GEMM.from_linear`): word c |= value[8c + order_map[i]] << 4i with
    order_map (0, 2, 4, 6, 1, 3, 5, 7), for qweight [in, out / 8] and qzeros [groups, out / 8].
The readers go the other way from the same documents (GPTQModel's v1 -> v2 adds 0x11111111 per word;
AutoAWQ's reverse order (0, 4, 1, 5, 2, 6, 3, 7)), straight to a float weight [out, in].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

AWQ_ORDER_MAP = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
V1_OFFSET = np.uint32(0x11111111)


@dataclass
class Layer:
    q: np.ndarray  # uint8 [out, in], 0..15
    z: np.ndarray  # uint8 [out, groups], 0..15
    scales: np.ndarray  # float16 [out, groups]
    g_idx: np.ndarray  # int32 [in]

    def weight(self) -> np.ndarray:
        """float16 [out, in]: (q - z[group]) * scale[group]."""
        codes = self.q.astype(np.float16) - self.z[:, self.g_idx].astype(np.float16)
        return codes * self.scales[:, self.g_idx]


def random_layer(out: int, inp: int, group: int | None, *, sym: bool, act_order: bool, seed: int) -> Layer:
    rng = np.random.default_rng(seed)
    groups = 1 if group is None else inp // group
    g_idx = np.arange(inp, dtype=np.int32) // (group or inp)
    if act_order:
        g_idx = g_idx[rng.permutation(inp)]  # column perm[i] of group i // group: each group exactly `group` wide
    z = np.full((out, groups), 8, np.uint8) if sym else rng.integers(0, 16, (out, groups), dtype=np.uint8)
    if not sym:
        z[0, 0], z[-1, -1] = 0, 15  # the extremes, a v1 borrow among them
    scales = (rng.random((out, groups), dtype=np.float32) * 0.02 + 1e-3).astype(np.float16)
    return Layer(rng.integers(0, 16, (out, inp), dtype=np.uint8), z, scales, g_idx)


def _pack_rows(values: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """uint [rows, cols] -> int32 [rows, cols / 8]: word c |= values[:, 8c + order[i]] << 4i."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for c in range(words.shape[1]):
        for i in range(8):
            words[:, c] |= values[:, 8 * c + order[i]].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def _unpack_rows(words: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 [rows, n] -> uint8 [rows, 8n]: value 8c + j from nibble order[j] of word c."""
    shifts = np.array(order, np.uint32) * np.uint32(4)
    return ((words.view(np.uint32)[:, :, None] >> shifts) & np.uint32(0xF)).astype(np.uint8).reshape(words.shape[0], -1)


def gptq_tensors(layer: Layer, v1: bool) -> dict[str, torch.Tensor]:
    qzeros = _pack_rows(layer.z.T).view(np.uint32)
    if v1:
        qzeros = qzeros - V1_OFFSET  # uint32 arithmetic wraps modulo 2^32
    return {"qweight": torch.from_numpy(_pack_rows(layer.q).T.copy()),  # [in / 8, out]: packed along in
            "qzeros": torch.from_numpy(qzeros.view(np.int32).copy()),
            "scales": torch.from_numpy(layer.scales.T.copy()), "g_idx": torch.from_numpy(layer.g_idx.copy())}


def read_gptq(t: dict[str, torch.Tensor], v1: bool) -> np.ndarray:
    q = _unpack_rows(t["qweight"].numpy().T.copy())  # [out, in]
    zeros = t["qzeros"].numpy().view(np.uint32)
    if v1:
        zeros = zeros + V1_OFFSET
    z = _unpack_rows(zeros.view(np.int32))  # [groups, out]
    g = t["g_idx"].numpy()
    scales = t["scales"].numpy()
    return ((q.astype(np.float16) - z[g].T.astype(np.float16)) * scales[g].T)


def awq_tensors(layer: Layer) -> dict[str, torch.Tensor]:
    return {"qweight": torch.from_numpy(_pack_rows(np.ascontiguousarray(layer.q.T), AWQ_ORDER_MAP)),
            "qzeros": torch.from_numpy(_pack_rows(np.ascontiguousarray(layer.z.T), AWQ_ORDER_MAP)),
            "scales": torch.from_numpy(layer.scales.T.copy())}


def read_awq(t: dict[str, torch.Tensor], group: int | None) -> np.ndarray:
    q = _unpack_rows(t["qweight"].numpy(), AWQ_REVERSE_ORDER)  # [in, out]
    z = _unpack_rows(t["qzeros"].numpy(), AWQ_REVERSE_ORDER)  # [groups, out]
    g = np.arange(q.shape[0]) // (group or q.shape[0])
    return ((q.astype(np.float16) - z[g].astype(np.float16)) * t["scales"].numpy()[g]).T


def ct_decompress(converted: dict[str, torch.Tensor], ct_config: dict) -> torch.Tensor:
    """compressed-tensors' own decompression of one converted layer (its scheme from `ct_config`).

    The library (0.20) has no g_idx and refuses `actorder: "group"` (removed in 0.19): an act-order
    layer's scheme is read without it, its columns are sorted by group with the library's own unpack /
    pack, decompressed there (contiguous groups), and put back in place."""
    ct_config = copy.deepcopy(ct_config)
    weights = ct_config["config_groups"]["group_0"]["weights"]
    assert (weights["actorder"] == "group") == ("weight_g_idx" in converted)
    weights["actorder"] = None
    scheme = QuantizationConfig.model_validate(ct_config).config_groups["group_0"]
    state = {k: v for k, v in converted.items() if k != "weight_g_idx"}
    if "weight_g_idx" not in converted:
        return PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    shape = converted["weight_shape"]
    perm = torch.argsort(converted["weight_g_idx"], stable=True)
    codes = unpack_from_int32(converted["weight_packed"], 4, shape)
    state["weight_packed"] = pack_to_int32(codes[:, perm].contiguous(), 4)
    weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    return torch.empty_like(weight).index_copy_(1, perm, weight)
