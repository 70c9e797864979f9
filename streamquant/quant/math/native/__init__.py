"""Native CPU kernels for the quantization pass: per-tile amax, codes, dequantization.

`math.quantize` calls these for CPU tensors whenever `build.cpu_kernels()` has a module, and the pure-torch
kernels of `torch_kernels.py` otherwise; the two are bitwise equal (tests/quant/math/test_native.py
checks every bf16 and fp16 value and random float32 ones, for every code format and formula). Each
function here returns False, doing nothing, when it does not apply (no module, a non-CPU tensor, a
dtype or layout the C++ does not take), so the caller runs the torch path instead.

Geometry: a window's local row i lies in local tile row (i + row0 % tile_r) // tile_r of its local
scale grid (`Window.local_grid`), likewise for columns; the C++ gets [B, R, C] views (batch dims
flattened, the last dim contiguous) and the local grid as [B, GR, GC].
"""

from __future__ import annotations

import torch

from streamquant.quant.math.granularity import Window
from streamquant.quant.math.native.build import cpu_kernels

CODES = {torch.float8_e4m3fn: 0, torch.float8_e4m3fnuz: 1, torch.int8: 2}
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DIVIDE, MULTIPLY, DIVIDE_ROUNDED = 0, 1, 2


def _as_3d(t: torch.Tensor, contiguous_rows: bool = True) -> torch.Tensor | None:
    """`t` [..., R, C] as a [B, R, C] view, or None when that needs a copy (or, with `contiguous_rows`,
    when the last dim is strided)."""
    if t.dim() < 2 or (contiguous_rows and t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        return None


def _offsets(window: Window, tile: tuple[int, int]) -> tuple[int, int, int, int]:
    return window.row0 % tile[0], window.col0 % tile[1], tile[0], tile[1]


def _usable(*tensors: torch.Tensor):
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return cpu_kernels()


def amax_(grid_local: torch.Tensor, w: torch.Tensor, window: Window, tile: tuple[int, int]) -> bool:
    """grid_local (float32, the window's local tiles) <- max |w| per tile; False if not applicable."""
    module = _usable(w) if w.dtype in WEIGHT_DTYPES else None
    src, grid = _as_3d(w), _as_3d(grid_local, contiguous_rows=False)
    if module is None or src is None or grid is None or w.numel() == 0:
        return False
    module.amax(src, grid, *_offsets(window, tile))
    return True


def quantize_(codes: torch.Tensor, w: torch.Tensor, factors_local: torch.Tensor, window: Window,
              tile: tuple[int, int], fmax: float, op: int) -> bool:
    """codes <- code(clamp(w / factor (op DIVIDE; DIVIDE_ROUNDED: quotient rounded to w's dtype) or
    w * factor (MULTIPLY), +-fmax)) per tile; False if not applicable."""
    module = _usable(w, codes) if w.dtype in WEIGHT_DTYPES and codes.dtype in CODES else None
    src, dst, grid = _as_3d(w), _as_3d(codes), _as_3d(factors_local, contiguous_rows=False)
    if module is None or src is None or dst is None or grid is None or w.numel() == 0:
        return False
    module.quantize(src, grid, dst, *_offsets(window, tile), CODES[codes.dtype], fmax, op)
    return True


def tiles_are_local(window: Window, tile: tuple[int, int]) -> bool:
    """Every tile the window touches lies wholly inside it (starts on a tile edge, ends on one or at
    the global edge): its amaxes need no other rank's elements."""
    return all(start % t == 0 and (size % t == 0 or start + size == total)
               for start, size, total, t in ((window.row0, window.rows, window.global_rows, tile[0]),
                                             (window.col0, window.cols, window.global_cols, tile[1])))


def quantize_tiles_(codes: torch.Tensor, w: torch.Tensor, scales_local: torch.Tensor, amax_local: torch.Tensor,
                    window: Window, tile: tuple[int, int], fmax: float, min_scale: float, mx: bool) -> bool:
    """One read of the weight for tile-local scales: per tile its amax (into `amax_local`), its scale
    (streamquant rule, or MX's power of two; into `scales_local`) and its codes. False (nothing
    written) where it does not apply: tiles not local to the window, or fewer tile rows than twice
    the threads (one tile row per task: per-tensor scales run the two parallel passes instead)."""
    module = _usable(w, codes) if w.dtype in WEIGHT_DTYPES and codes.dtype in CODES else None
    src, dst = _as_3d(w), _as_3d(codes)
    scales, amaxes = _as_3d(scales_local, contiguous_rows=False), _as_3d(amax_local, contiguous_rows=False)
    if (module is None or None in (src, dst, scales, amaxes) or w.numel() == 0 or not tiles_are_local(window, tile)
            or scales.shape[0] * scales.shape[1] < 2 * torch.get_num_threads()):
        return False
    module.quantize_tiles(src, dst, scales, amaxes, tile[0], tile[1], CODES[codes.dtype], fmax, min_scale, mx)
    return True


def dequantize_(out: torch.Tensor, codes: torch.Tensor, scales_local: torch.Tensor, window: Window,
                tile: tuple[int, int]) -> bool:
    """out <- decode(codes) * scale per tile, cast to out's dtype; False if not applicable."""
    module = _usable(codes, out) if codes.dtype in CODES and out.dtype in WEIGHT_DTYPES else None
    src, dst, grid = _as_3d(codes), _as_3d(out), _as_3d(scales_local, contiguous_rows=False)
    if module is None or src is None or dst is None or grid is None or codes.numel() == 0:
        return False
    module.dequantize(src, grid, dst, *_offsets(window, tile), CODES[codes.dtype])
    return True

