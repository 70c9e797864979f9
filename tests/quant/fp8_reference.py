"""An independent reference for the 8-bit schemes: numpy float32 arithmetic and ml_dtypes' casts.

Implements the formulas of `streamquant.quant.math.quantize` / `code_format` the plain way: pad the global
weight with zeros to whole tiles (zeros never raise an amax), reshape to [grid_rows, tile_rows,
grid_cols, tile_cols], take max |w|, then
  - fp8: `scale = max(amax / fp8_max, 1 / (fp8_max * 512))` in float32, divide, clip, cast with
    ml_dtypes (round to nearest even);
  - int8 / int4: the same with max 127 / 7 (ml_dtypes' int4), then `np.rint` (half to even) and the
    integer cast; int4 words packed by `ref_pack_int4` with plain integer arithmetic;
  - MX (`mx=True`): `scale = 2 ** clip(e - 1 - 8, -127, 127)` from `np.frexp(amax) = (m, e)`
    (2^-127 for a zero block), checked to survive ml_dtypes' float8_e8m0fnu unchanged; divide, clip
    to +-448, cast to e4m3fn;
and crop. No torch arithmetic is used: tensors come in and go out through their raw bits.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

NUMPY_FP8 = {torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e4m3fnuz: ml_dtypes.float8_e4m3fnuz,
             torch.int8: np.int8}


def to_f32(w: torch.Tensor) -> np.ndarray:
    """The float32 values of a bf16 / fp16 / fp32 tensor, converted from its raw bits."""
    w = w.detach().cpu().contiguous()
    if w.dtype == torch.bfloat16:
        bits = w.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if w.dtype == torch.float16:
        return w.view(torch.int16).numpy().view(np.float16).astype(np.float32)
    assert w.dtype == torch.float32, w.dtype
    return w.numpy().copy()


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor as unsigned integers of its element size."""
    t = t.detach().cpu().contiguous()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(view).numpy().view({1: np.uint8, 2: np.uint16, 4: np.uint32}[t.element_size()])


def constants(fp8: torch.dtype, bits: int = 8) -> tuple[np.float32, np.float32]:
    """(code max, min_scale) as float32, from ml_dtypes' (numpy's for int8) own finfo / iinfo; int4
    (`bits=4`): ml_dtypes' int4 max."""
    if bits == 4:
        fmax = float(ml_dtypes.iinfo(ml_dtypes.int4).max)
    else:
        fmax = float(np.iinfo(np.int8).max if fp8 == torch.int8 else ml_dtypes.finfo(NUMPY_FP8[fp8]).max)
    return np.float32(fmax), np.float32(1.0 / (fmax * 512.0))


def _tiled(x: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    rows, cols = x.shape
    gr, gc = -(-rows // tile[0]), -(-cols // tile[1])
    padded = np.zeros((gr * tile[0], gc * tile[1]), dtype=x.dtype)
    padded[:rows, :cols] = x
    return padded.reshape(gr, tile[0], gc, tile[1])


def _expand(grid: np.ndarray, tile: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    full = np.repeat(np.repeat(grid, tile[0], axis=0), tile[1], axis=1)
    return full[: shape[0], : shape[1]]


def ref_scales(w: np.ndarray, tile: tuple[int, int], fp8: torch.dtype, mx: bool = False, bits: int = 8) -> np.ndarray:
    fmax, min_scale = constants(fp8, bits)
    amax = np.abs(_tiled(w, tile)).max(axis=(1, 3)).astype(np.float32)
    if mx:
        _, e = np.frexp(amax)
        shared = np.where(amax > 0, np.clip(e - 1 - 8, -127, 127), -127)
        scales = np.ldexp(np.float32(1), shared).astype(np.float32)
        assert np.array_equal(scales.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), scales)
        return scales
    return np.maximum(amax / fmax, min_scale).astype(np.float32)


def ref_codes(w: np.ndarray, scales: np.ndarray, tile: tuple[int, int], fp8: torch.dtype, bits: int = 8) -> np.ndarray:
    """uint8 bytes of `clip(w / scale, +-max)` cast to fp8 by ml_dtypes (int8 / int4: `np.rint`, then the cast)."""
    fmax, _ = constants(fp8, bits)
    q = np.clip(w / _expand(scales, tile, w.shape), -fmax, fmax).astype(np.float32)
    if fp8 == torch.int8:
        return np.rint(q).astype(np.int8).view(np.uint8)
    return q.astype(NUMPY_FP8[fp8]).view(np.uint8)


def ref_quantize(w: np.ndarray, tile: tuple[int, int], fp8: torch.dtype, mx: bool = False, bits: int = 8
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 code bytes, float32 scale grid) of a global float32 weight (int4: one int8 byte per code)."""
    scales = ref_scales(w, tile, fp8, mx, bits)
    return ref_codes(w, scales, tile, fp8, bits), scales


def ref_pack_int4(codes: np.ndarray) -> np.ndarray:
    """int32 words of signed int4 codes (uint8 bytes of int8 values), eight per word along the last axis:
    code 8k + i as the nibble `code + 8` at bits [4i, 4i + 4), by Python integer arithmetic."""
    values = codes.view(np.int8).astype(np.int64) + 8
    rows = values.reshape(-1, values.shape[-1] // 8, 8)
    words = sum(rows[..., i] << (4 * i) for i in range(8))
    return words.astype(np.uint32).view(np.int32).reshape(*codes.shape[:-1], -1)


def ref_dequantize(codes: np.ndarray, scales: np.ndarray, tile: tuple[int, int], fp8: torch.dtype,
                   dtype: torch.dtype) -> np.ndarray:
    """Raw bits of `codes.float() * scale` in `dtype` (bf16 / fp16 / fp32)."""
    values = codes.view(NUMPY_FP8[fp8]).astype(np.float32) * _expand(scales, tile, codes.shape)
    values = values.astype(np.float32)
    if dtype == torch.bfloat16:
        return values.astype(ml_dtypes.bfloat16).view(np.uint16)
    if dtype == torch.float16:
        return values.astype(np.float16).view(np.uint16)
    return values.view(np.uint32)



def ref_quantize_asymmetric(w: np.ndarray, tile: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 bytes of int8 codes, float32 scales, int8 zero points) of asymmetric int4 (ml_dtypes' int4
    range -8..7): hi = max(max w, 0), lo = max(-min w, 0), scale = max((hi + lo) / 15, 1 / (15 * 512)),
    zero = clip(rint(-8 + lo / scale), -8, 7), codes = clip(rint(w / scale) + zero, -8, 7)."""
    q_min, q_max = int(ml_dtypes.iinfo(ml_dtypes.int4).min), int(ml_dtypes.iinfo(ml_dtypes.int4).max)
    tiles = _tiled(w, tile)
    hi = np.maximum(tiles.max(axis=(1, 3)), 0).astype(np.float32)
    lo = np.maximum(-tiles.min(axis=(1, 3)), 0).astype(np.float32)
    levels = np.float32(q_max - q_min)
    scales = np.maximum((hi + lo) / levels, np.float32(1.0 / (15 * 512.0))).astype(np.float32)
    zeros = np.clip(np.rint((lo / scales).astype(np.float32) + np.float32(q_min)), q_min, q_max).astype(np.float32)
    codes = np.rint((w / _expand(scales, tile, w.shape)).astype(np.float32)) + _expand(zeros, tile, w.shape)
    codes = np.clip(codes, q_min, q_max).astype(np.int8)
    return codes.view(np.uint8), scales, zeros.astype(np.int8)
