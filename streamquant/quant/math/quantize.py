"""Pure quantization math of the scaled-code schemes: amax, scales, quantize into a given output, dequantize.

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

The same code serves int8 codes (`code_format.INT8`: max 127, and `round` half to even before the
cast) and MXFP8 (`code_format.MXFP8`: 1x32 tiles, power-of-two scales, the clamp always applied):
`code_format.py` states both.

Tensor parallelism: tiles live on the GLOBAL weight (see `granularity.py`). A rank computes
`window_amax` (its elements' amax on the global grid, 0 elsewhere), the ranks all-reduce it with
MAX, `scale_from_amax` turns it into scales, `local_scales` cuts out the tiles the rank touches,
and `quantize_window_` writes the rank's codes in place. Concatenating the ranks' codes is bitwise
the single-piece quantization of the global weight.

Kernels: on CPU the native C++ kernels (`quant/math/native`: one vectorized pass for the amax, one for
the codes, one for dequantization) when they are built, else the pure-torch ones (`torch_kernels`);
the two write the same bits (tests/quant/math/test_native.py), so callers never choose.

Leading dimensions of a weight (experts) are batch dimensions: each batch element is its own weight.
Limitations: NaN / Inf weights propagate into NaN scales; the layer methods refuse them from the amax
grids (`quant/scaled/weights.py`), which read every element anyway.
"""

from __future__ import annotations

import functools

import torch

from streamquant.quant.math.code_format import E4M3FN, CodeFormat, mx_scales
from streamquant.quant.math import native, torch_kernels
from streamquant.quant.math.convert import fp8_to_float32
from streamquant.quant.math.formula import Formula, TileScales, code_bounds, formula_of, tile_scales
from streamquant.quant.math.granularity import (
    Granularity,
    Window,
    check_tile,
    grid_shape,
    tile_shape,
    window_pieces,
)


def _check(w: torch.Tensor, window: Window, tile: tuple[int, int], what: str) -> None:
    check_tile(tile)
    if what == "weight" and w.dtype not in dict(torch_kernels.FLOAT_BITS_AS_INT):
        raise ValueError(f"can only quantize a bf16, fp16, fp32 or fp64 weight, got {w.dtype}")
    if w.dim() < 2 or tuple(w.shape[-2:]) != window.shape:
        raise ValueError(f"{what} of shape {tuple(w.shape)} does not match window {window.shape}: {window}")


def window_amax(w_local: torch.Tensor, window: Window, tile: tuple[int, int]) -> torch.Tensor:
    """max |w| of this rank's elements per tile of the GLOBAL grid, float32 [..., grid_rows, grid_cols].

    Tiles the rank holds nothing of are 0. Reduce across ranks with MAX, then `scale_from_amax`.
    """
    _check(w_local, window, tile, "weight")
    batch = tuple(w_local.shape[:-2])
    grid = torch.zeros(batch + grid_shape(tile, window.global_shape), dtype=torch.float32, device=w_local.device)
    rows, cols = window.local_grid(tile)
    if native.amax_(grid[..., rows, cols], w_local, window, tile):
        return grid
    step = torch_kernels.chunk_rows(w_local, window, False)
    scratch = torch_kernels.scratch(w_local[..., :step, :].numel(), w_local.element_size(), w_local.device)
    for offset, sub in torch_kernels.chunks(window, step):
        rows = w_local[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            target = torch_kernels.grid_part(grid, piece, (0, 0))
            torch.maximum(target, torch_kernels.abs_max(torch_kernels.view(rows, piece), scratch), out=target)
    return grid


def scale_from_amax(amax: torch.Tensor, fmt: CodeFormat = E4M3FN) -> torch.Tensor:
    """float32 scales of `fmt`'s rule from tile amaxes, elementwise, a new tensor: `max(amax / fmt.max,
    fmt.min_scale)`, or for an MX format the power of two of `code_format.mx_scales`."""
    return formula_scales(amax, fmt, Formula.STREAMQUANT, torch.float32).scales


def formula_scales(amax: torch.Tensor, fmt: CodeFormat, formula: Formula, weight_dtype: torch.dtype) -> TileScales:
    """(dequantization scales, kernel factors) of `formula` (`formula.py`) from float32 tile amaxes;
    an MX format has one rule of its own (the streamquant formula only)."""
    if fmt.mx:
        if formula_of(formula) is not Formula.STREAMQUANT:
            raise ValueError(f"MX scales have one formula (OCP E8M0), not {formula!r}")
        scales = mx_scales(amax)
        return TileScales(scales, scales)
    return tile_scales(amax, fmt.max, fmt.min_scale, formula, weight_dtype, fmt.integer)


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
    out_codes: torch.Tensor,
    w_local: torch.Tensor,
    local_scale_grid: torch.Tensor,
    window: Window,
    tile: tuple[int, int],
    compiled: bool = False,
    scales_cover_amax: bool = False,
    formula: Formula = Formula.STREAMQUANT,
    local_factors: torch.Tensor | None = None,
    fmt: CodeFormat | None = None,
) -> torch.Tensor:
    """Write `clamp(w / scale, +-max).to(fp8)` into `out_codes` in place (its storage is kept); returns it.
    An int8 `out_codes` gets `round(clamp(w / scale, +-max))` (half to even), then the exact cast; `max`
    is `fmt.max` (default: the format of `out_codes`'s dtype; int4 codes pass `code_format.INT4`).

    `formula` other than STREAMQUANT runs that library's arithmetic (`formula.py`) with
    `local_factors` (default: the scales) as the kernel's divisor or multiplier, always clamped.
    Integer codes take STREAMQUANT or COMPRESSED_TENSORS; the latter clamps to the library's range
    [-(max + 1), max] (`formula.code_bounds`) in pure torch (the native kernels clamp symmetrically).

    On CPU the native kernels run when built (module doc). Otherwise `compiled=True` runs
    inductor-compiled code on CPU windows of `torch_kernels.COMPILED_MIN_ELEMENTS` or more (bitwise the
    same codes, up to 2x faster than eager torch after a first compile of seconds); smaller windows and
    other devices run eager code either way.
    `scales_cover_amax=True` is the caller's promise that the scales came from `scale_from_amax`
    of amaxes at least the tiles' (as in `quantize`): the clamp is then provably a no-op and the
    eager code skips it (`torch_kernels.quantize_piece_unclamped`).
    """
    _check(w_local, window, tile, "weight")
    if out_codes.shape != w_local.shape:
        raise ValueError(f"output shape {tuple(out_codes.shape)} != weight shape {tuple(w_local.shape)}")
    _check_local_grid(local_scale_grid, w_local, window, tile)
    fmax = (fmt or CodeFormat(out_codes.dtype)).max
    if torch.promote_types(w_local.dtype, torch.float32) != torch.float32:
        w_local = w_local.float()  # the formula divides in float32, never in float64
    base = (window.row0 // tile[0], window.col0 // tile[1])
    factors = local_scale_grid if local_factors is None else local_factors
    if factors.shape != local_scale_grid.shape or factors.dtype != torch.float32:
        raise ValueError(f"local_factors {factors.dtype} {tuple(factors.shape)} must be float32 shaped like the "
                         f"scales {tuple(local_scale_grid.shape)}")
    formula = formula_of(formula)
    streamquant = formula is Formula.STREAMQUANT
    integer = not out_codes.dtype.is_floating_point
    if integer and formula is Formula.TRANSFORMERS:
        raise ValueError(f"formula {formula.value!r} writes fp8 codes; {out_codes.dtype} codes take the streamquant "
                         "or the compressed-tensors formula")
    lowest = code_bounds(fmax, integer, formula)[0]
    op = {Formula.STREAMQUANT: native.DIVIDE, Formula.TRANSFORMERS: native.MULTIPLY}.get(formula, native.DIVIDE_ROUNDED)
    if op == native.DIVIDE_ROUNDED and w_local.dtype in (torch.bfloat16, torch.float16):
        factors = factors.to(w_local.dtype).float()  # the divisor in the weight's dtype, as `torch_kernels.quantize_piece_rounded`
    if lowest == -fmax and native.quantize_(out_codes, w_local, factors, window, tile, fmax, op):
        return out_codes
    compiled = (compiled and streamquant and w_local.device.type == "cpu"
                and w_local.numel() >= torch_kernels.COMPILED_MIN_ELEMENTS)
    step = torch_kernels.chunk_rows(w_local, window, compiled)
    if compiled:
        kernel, scratch = torch.compile(torch_kernels.quantize_piece, dynamic=True), ()
    else:
        kernel = {Formula.COMPRESSED_TENSORS: functools.partial(torch_kernels.quantize_piece_rounded, fmin=lowest),
                  Formula.TRANSFORMERS: torch_kernels.quantize_piece_multiplied}.get(formula)
        kernel = kernel or (torch_kernels.quantize_piece_unclamped if scales_cover_amax else torch_kernels.quantize_piece_eager)
        scratch = (torch_kernels.scratch(w_local[..., :step, :].numel(), 4 if streamquant else 8, w_local.device),)
    for offset, sub in torch_kernels.chunks(window, step):
        src = w_local[..., offset : offset + sub.rows, :]
        dst = out_codes[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            kernel(torch_kernels.view(src, piece), torch_kernels.scale_view(factors, piece, base), torch_kernels.view(dst, piece), fmax, *scratch)
    return out_codes


def quantize_local_tiles_(out: torch.Tensor, w_local: torch.Tensor, local_scales_out: torch.Tensor, window: Window,
                          tile: tuple[int, int], fmt: CodeFormat) -> torch.Tensor | None:
    """`window_amax`, `formula_scales` (streamquant formula) and `quantize_window_` in one read of the
    weight, where every tile the window touches is wholly inside it (TP=1, or shards cut on tile
    edges) and the native CPU kernels run. Writes the codes into `out` and the local scales into
    `local_scales_out`; returns the GLOBAL amax grid (0 outside the window, as `window_amax`), or None
    (nothing written) where it does not apply: then run the three steps."""
    _check(w_local, window, tile, "weight")
    _check_local_grid(local_scales_out, w_local, window, tile)
    if out.shape != w_local.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != weight shape {tuple(w_local.shape)}")
    grid = torch.zeros(tuple(w_local.shape[:-2]) + grid_shape(tile, window.global_shape), dtype=torch.float32,
                       device=w_local.device)
    rows, cols = window.local_grid(tile)
    min_scale = float(torch.tensor(fmt.min_scale, dtype=torch.float32))  # the floor as the float32 torch uses
    if not native.quantize_tiles_(out, w_local, local_scales_out, grid[..., rows, cols], window, tile, fmt.max,
                                  min_scale, fmt.mx):
        return None
    return grid


def dequantize_window(
    q: torch.Tensor, local_scale_grid: torch.Tensor, window: Window, tile: tuple[int, int], dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`q.float() * scale` per tile (fp8 or int8 codes), cast to `dtype`: a new tensor shaped like `q`, or
    written into `out` (that dtype and shape) and returned."""
    _check(q, window, tile, "codes")
    _check_local_grid(local_scale_grid, q, window, tile)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != dtype:
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} must be {dtype} shaped like the codes {tuple(q.shape)}")
    if native.dequantize_(out, q, local_scale_grid, window, tile):
        return out
    base = (window.row0 // tile[0], window.col0 // tile[1])
    for offset, sub in torch_kernels.chunks(window, torch_kernels.chunk_rows(q, window, False)):
        src = q[..., offset : offset + sub.rows, :]
        dst = out[..., offset : offset + sub.rows, :]
        for piece in window_pieces(sub, tile):
            values = fp8_to_float32(torch_kernels.view(src, piece))
            torch_kernels.view(dst, piece).copy_(values.mul_(torch_kernels.scale_view(local_scale_grid, piece, base)))
    return out


def _whole(w: torch.Tensor, granularity: Granularity) -> tuple[Window, tuple[int, int]]:
    if w.dim() < 2:
        raise ValueError(f"need a weight with at least 2 dims, got shape {tuple(w.shape)}")
    rows, cols = w.shape[-2:]
    return Window(0, 0, rows, cols), tile_shape(granularity, (rows, cols))


def compute_scales(w: torch.Tensor, granularity: Granularity, fmt: CodeFormat = E4M3FN,
                   formula: Formula = Formula.STREAMQUANT) -> torch.Tensor:
    """The float32 scale grid [..., grid_rows, grid_cols] of a whole (unsharded) weight."""
    window, tile = _whole(w, granularity)
    return formula_scales(window_amax(w, window, tile), fmt, formula, w.dtype).scales


def quantize(
    w: torch.Tensor, granularity: Granularity, fmt: CodeFormat = E4M3FN, compiled: bool = False,
    formula: Formula = Formula.STREAMQUANT, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes shaped like `w`, float32 scale grid) of a whole weight; codes into `out` when given.
    Asymmetric int4 (zero points) is `int4.quantize_asymmetric`."""
    if fmt.zero_point:
        raise ValueError("quantize() writes symmetric codes; asymmetric int4 is int4.quantize_asymmetric")
    window, tile = _whole(w, granularity)
    scales, factors = formula_scales(window_amax(w, window, tile), fmt, formula, w.dtype)
    q = torch.empty(w.shape, dtype=fmt.dtype, device=w.device) if out is None else out
    quantize_window_(q, w, scales, window, tile, compiled, scales_cover_amax=fmt.scales_cover_amax, formula=formula,
                     local_factors=factors, fmt=fmt)
    return q, scales


def dequantize(
    q: torch.Tensor, scale_grid: torch.Tensor, granularity: Granularity, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize` up to rounding: `q.float() * scale` per tile, in `dtype`."""
    window, tile = _whole(q, granularity)
    return dequantize_window(q, scale_grid, window, tile, dtype)
