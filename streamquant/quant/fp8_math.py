"""Pure fp8 quantization math: amax, scales, quantize into a given output, dequantize.

The one formula, for every granularity (vLLM's online fp8 formula, with its floor applied to all):

    amax  = max |w| over the tile                      (exact: a max of bf16/fp16/fp32 values)
    scale = max(amax / fp8_max, min_scale)             float32, true IEEE division
    q     = clamp(w.float() / scale, -fp8_max, fp8_max).to(fp8 dtype)   round to nearest even
    w    ~= q.float() * scale                          the stored scale is the dequant multiplier

with `min_scale = 1 / (fp8_max * 512)` (rounded once to float32). A zero tile gets `min_scale`
(codes 0), never a zero or NaN scale. The clamp comes before the cast because older torch versions
do not saturate on cast (and e4m3fnuz does not even in 2.13). Divisors are always tensors, never
Python scalars: CUDA rewrites division by a CPU scalar into a multiplication by its reciprocal,
which can differ in the last bit.

How the neighbours differ (FORMATS.md), and the share of e4m3fn codes that differ from this formula
on a random N(0, 1) 1024x1024 bf16 weight (per tensor / per row / 128x128 blocks; never by more
than one code step): torchao 0.18 rounds `amax / 448` to bf16 before using it in float32 and has
no floor, so a zero row gives 0/0 = NaN codes (0.57% / 1.58% / 2.03%); compressed-tensors 0.20
keeps a bf16 scale and divides in bf16, a double rounding (4.11% / 2.98% / 3.19%); transformers'
FineGrainedFP8 multiplies by `448 / amax` (0.00% / 0.12% / 0.07%).

Tensor parallelism: tiles live on the GLOBAL weight (see `granularity.py`). A rank computes
`window_amax` (its elements' amax on the global grid, 0 elsewhere), the ranks all-reduce it with
MAX, `scale_from_amax` turns it into scales, `local_scales` cuts out the tiles the rank touches,
and `quantize_window_` writes the rank's codes in place. Concatenating the ranks' codes is bitwise
the single-piece quantization of the global weight.

Leading dimensions of a weight (experts) are batch dimensions: each batch element is its own weight.
Limitations: NaN / Inf weights propagate into NaN scales; call `check_finite` to fail loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.quant.fp8_convert import fp8_to_float32
from streamquant.quant.granularity import (
    Granularity,
    Piece,
    Window,
    check_tile,
    grid_shape,
    tile_shape,
    window_pieces,
)

# Elements per eager processing chunk. CPU: 2 MiB of bf16 keeps the pass's temporaries and output
# in cache (one whole-tensor pass is ~2x slower) while each weight takes few kernel calls: every
# call is an intra-op parallel region whose thread wake-up costs far more on a loaded or
# oversubscribed machine than its work (`benchmarks/fp8_kernels.py --chunk-elements` compares sizes;
# 2^20 beat 2^18 at every shape measured, 2^22 and up lose the cache). Accelerators: bounds the
# float32 temporary (64 MiB) while keeping kernel launches few.
CHUNK_ELEMENTS = 1 << 20
DEVICE_CHUNK_ELEMENTS = 1 << 24
# Compiled code has a fixed cost per call (guards, wrapper: ~0.3-0.5 ms on CPU): below this many
# elements a window takes the eager kernel even with compiled=True, so compiled is never the slower
# (`benchmarks/fp8_kernels.py`: compiled lost below ~2M elements and won from ~4M, up to 2x at 68M).
COMPILED_MIN_ELEMENTS = 1 << 22
_FLOAT_BITS_AS_INT = ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                      (torch.float32, torch.int32), (torch.float64, torch.int64))


@dataclass(frozen=True)
class Fp8Format:
    """An fp8 storage dtype and its constants."""

    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not (self.dtype.is_floating_point and self.dtype.itemsize == 1):
            raise ValueError(f"{self.dtype} is not an fp8 dtype")

    @property
    def max(self) -> float:
        """Largest finite value: 448 for float8_e4m3fn, 240 for float8_e4m3fnuz."""
        return float(torch.finfo(self.dtype).max)

    @property
    def min_scale(self) -> float:
        """The scale floor `1 / (max * 512)`; used as a float32."""
        return 1.0 / (self.max * 512.0)


E4M3FN = Fp8Format(torch.float8_e4m3fn)
E4M3FNUZ = Fp8Format(torch.float8_e4m3fnuz)


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise ValueError naming `name` if `w` holds a NaN or an Inf (max and min propagate both)."""
    if not w.is_floating_point() or w.numel() == 0:
        return
    lo, hi = torch.aminmax(w)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} holds NaN or Inf values; refusing to quantize it")


def _check(w: torch.Tensor, window: Window, tile: tuple[int, int], what: str) -> None:
    check_tile(tile)
    if what == "weight" and w.dtype not in dict(_FLOAT_BITS_AS_INT):
        raise ValueError(f"can only quantize a bf16, fp16, fp32 or fp64 weight, got {w.dtype}")
    if w.dim() < 2 or tuple(w.shape[-2:]) != window.shape:
        raise ValueError(f"{what} of shape {tuple(w.shape)} does not match window {window.shape}: {window}")


def _view(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """`t`'s piece as [..., row tiles, tile rows, col tiles, tile cols] (a view, never a copy)."""
    r, c = piece
    part = t[..., r.start : r.stop, c.start : c.stop]
    return part.unflatten(-2, (r.n, r.length)).unflatten(-1, (c.n, c.length))


def _grid_part(grid: torch.Tensor, piece: Piece, base: tuple[int, int]) -> torch.Tensor:
    """The piece's tiles [..., row tiles, col tiles] of a grid whose first tile is global tile `base`."""
    r, c = piece
    return grid[..., r.tile0 - base[0] : r.tile0 - base[0] + r.n, c.tile0 - base[1] : c.tile0 - base[1] + c.n]


def _scale_view(grid: torch.Tensor, piece: Piece, base: tuple[int, int]) -> torch.Tensor:
    """The piece's scales shaped [..., row tiles, 1, col tiles, 1] to broadcast over `_view`."""
    return _grid_part(grid, piece, base).unsqueeze(-2).unsqueeze(-1)


def _chunk_rows(w: torch.Tensor, window: Window, whole: bool) -> int:
    """Rows per chunk: the whole window when `whole` (compiled code needs no temporaries), else about
    CHUNK_ELEMENTS (CPU) or DEVICE_CHUNK_ELEMENTS (accelerators) elements, batch elements included."""
    if whole:
        return max(1, window.rows)
    target = CHUNK_ELEMENTS if w.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, min(window.rows, target // max(1, w[..., :1, :1].numel() * window.cols)))


def _chunks(window: Window, step: int) -> list[tuple[int, Window]]:
    """(local row offset, sub-window of `step` rows or fewer) covering the window."""
    return [(i, window.sub(i, min(i + step, window.rows))) for i in range(0, window.rows, step)]


def _abs_max(view: torch.Tensor) -> torch.Tensor:
    """max |x| over the tile dims of a piece view, as float32.

    Works on the bits with the sign cleared: for IEEE floats the order of non-negative values is
    the order of their bit patterns as integers, so this is exactly max |x| (NaN stays NaN), and
    integer max reductions run several times faster than bf16 ones on CPU. Rows are reduced first
    (elementwise across rows, the vectorizable direction).
    """
    int_dtype = dict(_FLOAT_BITS_AS_INT)[view.dtype]
    magnitude = view.view(int_dtype) & torch.iinfo(int_dtype).max
    if magnitude.shape[-3] > 1:
        magnitude = magnitude.amax(-3, keepdim=True)
    return magnitude.amax(dim=(-3, -1)).view(view.dtype).float()


def _quantize_piece_unclamped(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float) -> None:
    """dst <- (src / scale) cast to fp8 in one kernel: division in float32, cast on store.

    Bitwise `_quantize_piece` when every |src| / scale <= fmax * (1 + 2^-23), which holds when the
    scales come from `scale_from_amax` of an amax at least the tile's: scale = fl(amax / fmax)
    is at most one rounding below amax / fmax, and values up to halfway to the next fp8 step
    (464 for e4m3fn, 248 for e4m3fnuz) round to fmax on the cast exactly as the clamped value does.
    About 1.3x faster on CPU (no float32 temporary).
    """
    torch.div(src, scale, out=dst)


def _quantize_piece(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float) -> None:
    """dst <- clamp(src / scale, +-fmax) cast to dst's fp8 dtype (division in float32).

    `quantize_window_(compiled=True)` runs this through inductor on CPU only: its C++ output was
    verified bitwise against eager (IEEE division, the same fp8 rounding); its GPU output was not,
    and eager GPU code is memory bound anyway. Re-wrapping it in `torch.compile` on every call is
    cheap: dynamo caches the compiled code on the function's code object. The amax pass is never
    compiled: the eager bit trick in `_abs_max` is faster than inductor's reduction.
    """
    dst.copy_(torch.div(src, scale).clamp_(-fmax, fmax))


def window_amax(w_local: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """max |w| of this rank's elements per tile of the GLOBAL grid, float32 [..., grid_rows, grid_cols].

    Tiles the rank holds nothing of are 0. Reduce across ranks with MAX, then `scale_from_amax`.
    """
    _check(w_local, window, tile, "weight")
    batch = tuple(w_local.shape[:-2])
    grid = torch.zeros(batch + grid_shape(tile, window.global_shape), dtype=torch.float32, device=w_local.device)
    for offset, sub in _chunks(window, _chunk_rows(w_local, window, False)):
        rows = w_local[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            target = _grid_part(grid, piece, (0, 0))
            torch.maximum(target, _abs_max(_view(rows, piece)), out=target)
    return grid


def scale_from_amax(amax: torch.Tensor, fmt: Fp8Format = E4M3FN) -> torch.Tensor:
    """float32 `max(amax / fmt.max, fmt.min_scale)`, elementwise, a new tensor."""
    amax = amax.to(torch.float32)
    divisor = torch.full((), fmt.max, dtype=torch.float32, device=amax.device)
    return torch.div(amax, divisor).clamp_min_(fmt.min_scale)


def local_scales(global_scale_grid: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """The sub-grid of tiles `window` touches (a view of `global_scale_grid`)."""
    check_tile(tile)
    expected = grid_shape(tile, window.global_shape)
    if tuple(global_scale_grid.shape[-2:]) != expected:
        raise ValueError(f"scale grid {tuple(global_scale_grid.shape)} is not the global grid {expected}")
    rows, cols = window.local_grid(tile)
    return global_scale_grid[..., rows, cols]


def _check_local_grid(grid: torch.Tensor, w: torch.Tensor, window: Window, tile: tuple[int, int]) -> None:
    rows, cols = window.local_grid(tile)
    expected = tuple(w.shape[:-2]) + (rows.stop - rows.start, cols.stop - cols.start)
    if tuple(grid.shape) != expected:
        raise ValueError(f"local scale grid {tuple(grid.shape)} does not match {expected} for {window}")
    if grid.dtype != torch.float32:
        raise ValueError(f"scales must be float32 dequantization multipliers, got {grid.dtype}")


def quantize_window_(
    out_fp8: torch.Tensor,
    w_local: torch.Tensor,
    local_scale_grid: torch.Tensor,
    window: Window,
    tile: tuple[int, int],
    compiled: bool = False,
    scales_cover_amax: bool = False,
) -> torch.Tensor:
    """Write `clamp(w / scale, +-max).to(fp8)` into `out_fp8` in place (its storage is kept); returns it.

    `compiled=True` runs inductor-compiled code on CPU windows of COMPILED_MIN_ELEMENTS or more
    (bitwise the same codes, up to 2x faster after a first compile of seconds); smaller windows and
    other devices run eager code either way.
    `scales_cover_amax=True` is the caller's promise that the scales came from `scale_from_amax`
    of amaxes at least the tiles' (as in `quantize`): the clamp is then provably a no-op and the
    eager code skips it (`_quantize_piece_unclamped`).
    """
    _check(w_local, window, tile, "weight")
    if out_fp8.shape != w_local.shape:
        raise ValueError(f"output shape {tuple(out_fp8.shape)} != weight shape {tuple(w_local.shape)}")
    _check_local_grid(local_scale_grid, w_local, window, tile)
    fmax = Fp8Format(out_fp8.dtype).max
    if torch.promote_types(w_local.dtype, torch.float32) != torch.float32:
        w_local = w_local.float()  # the formula divides in float32, never in float64
    base = (window.row0 // tile[0], window.col0 // tile[1])
    compiled = compiled and w_local.device.type == "cpu" and w_local.numel() >= COMPILED_MIN_ELEMENTS
    if compiled:
        quantize_piece = torch.compile(_quantize_piece, dynamic=True)
    else:
        quantize_piece = _quantize_piece_unclamped if scales_cover_amax else _quantize_piece
    for offset, sub in _chunks(window, _chunk_rows(w_local, window, compiled)):
        src = w_local[..., offset : offset + sub.rows, :]
        dst = out_fp8[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            quantize_piece(_view(src, piece), _scale_view(local_scale_grid, piece, base), _view(dst, piece), fmax)
    return out_fp8


def dequantize_window(
    q: torch.Tensor, local_scale_grid: torch.Tensor, window: Window, tile: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`q.float() * scale` per tile, cast to `dtype` (a new tensor shaped like `q`)."""
    _check(q, window, tile, "codes")
    _check_local_grid(local_scale_grid, q, window, tile)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    base = (window.row0 // tile[0], window.col0 // tile[1])
    for offset, sub in _chunks(window, _chunk_rows(q, window, False)):
        src = q[..., offset : offset + sub.rows, :]
        dst = out[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            values = fp8_to_float32(_view(src, piece))
            _view(dst, piece).copy_(values.mul_(_scale_view(local_scale_grid, piece, base)))
    return out


def _whole(w: torch.Tensor, granularity: Granularity) -> tuple[Window, tuple[int, int]]:
    if w.dim() < 2:
        raise ValueError(f"need a weight with at least 2 dims, got shape {tuple(w.shape)}")
    rows, cols = w.shape[-2:]
    return Window(0, 0, rows, cols), tile_shape(granularity, (rows, cols))


def compute_scales(w: torch.Tensor, granularity: Granularity, fmt: Fp8Format = E4M3FN) -> torch.Tensor:
    """The float32 scale grid [..., grid_rows, grid_cols] of a whole (unsharded) weight."""
    window, tile = _whole(w, granularity)
    return scale_from_amax(window_amax(w, window, tile), fmt)


def quantize(
    w: torch.Tensor, granularity: Granularity, fmt: Fp8Format = E4M3FN, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 codes shaped like `w`, float32 scale grid) of a whole weight."""
    window, tile = _whole(w, granularity)
    scales = scale_from_amax(window_amax(w, window, tile), fmt)
    q = torch.empty(w.shape, dtype=fmt.dtype, device=w.device)
    return quantize_window_(q, w, scales, window, tile, compiled, scales_cover_amax=True), scales


def dequantize(
    q: torch.Tensor, scale_grid: torch.Tensor, granularity: Granularity, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize` up to rounding: `q.float() * scale` per tile, in `dtype`."""
    window, tile = _whole(q, granularity)
    return dequantize_window(q, scale_grid, window, tile, dtype)
