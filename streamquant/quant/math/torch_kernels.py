"""How the fp8 formula (`math.quantize`) runs over a window in pure torch: chunks of rows, tile-uniform pieces,
scratch buffers, and the per-piece kernels. No state; `math.quantize` is the public face.

These are the reference and the fallback: on CPU, `math.quantize` runs the native kernels of
`quant/math/native` when they are built (bitwise the same codes, several times faster: torch's fp8 cast
runs one element at a time there), and these everywhere else (accelerators, float64 weights, a
machine without a compiler, `STREAMQUANT_CPU_KERNELS=torch`).

A window is processed in chunks of about CHUNK_ELEMENTS elements (rows at a time), each cut into the
at most 9 rectangular pieces of `granularity.window_pieces`, each viewed as [row tiles, tile rows,
col tiles, tile cols] so that per-tile work is a reduction or a broadcast, never a copy. One scratch
buffer per call holds every chunk's temporaries.
"""

from __future__ import annotations

import torch

from streamquant.quant.math.granularity import Piece, Window

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
FLOAT_BITS_AS_INT = ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                      (torch.float32, torch.int32), (torch.float64, torch.int64))


def view(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """`t`'s piece as [..., row tiles, tile rows, col tiles, tile cols] (a view, never a copy)."""
    r, c = piece
    part = t[..., r.start : r.stop, c.start : c.stop]
    return part.unflatten(-2, (r.n, r.length)).unflatten(-1, (c.n, c.length))


def grid_part(grid: torch.Tensor, piece: Piece, base: tuple[int, int]) -> torch.Tensor:
    """The piece's tiles [..., row tiles, col tiles] of a grid whose first tile is global tile `base`."""
    r, c = piece
    return grid[..., r.tile0 - base[0] : r.tile0 - base[0] + r.n, c.tile0 - base[1] : c.tile0 - base[1] + c.n]


def scale_view(grid: torch.Tensor, piece: Piece, base: tuple[int, int]) -> torch.Tensor:
    """The piece's scales shaped [..., row tiles, 1, col tiles, 1] to broadcast over `view`."""
    return grid_part(grid, piece, base).unsqueeze(-2).unsqueeze(-1)


def chunk_rows(w: torch.Tensor, window: Window, whole: bool) -> int:
    """Rows per chunk: the whole window when `whole` (compiled code needs no temporaries), else about
    CHUNK_ELEMENTS (CPU) or DEVICE_CHUNK_ELEMENTS (accelerators) elements, batch elements included."""
    if whole:
        return max(1, window.rows)
    target = CHUNK_ELEMENTS if w.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, min(window.rows, target // max(1, w[..., :1, :1].numel() * window.cols)))


def chunks(window: Window, step: int) -> list[tuple[int, Window]]:
    """(local row offset, sub-window of `step` rows or fewer) covering the window."""
    return [(i, window.sub(i, min(i + step, window.rows))) for i in range(0, window.rows, step)]


def scratch(rows_elements: int, itemsize: int, device: torch.device) -> torch.Tensor:
    """One flat byte buffer for a chunk's temporaries, reused by every chunk of a call: torch's
    mixed-dtype kernels would otherwise allocate (and glibc retain) float32 temporaries per chunk
    (measured: two 4 MiB temporaries per 2^20-element `torch.div(bf16, f32, out=fp8)`, +3% peak RSS
    over a whole load)."""
    return torch.empty(rows_elements * max(4, itemsize), dtype=torch.uint8, device=device)


def _like(scratch: torch.Tensor, view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous `dtype` tensor shaped like `view`, over the start of `scratch`."""
    return scratch.view(dtype)[: view.numel()].view(view.shape)


def abs_max(view: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """max |x| over the tile dims of a piece view, as float32.

    Works on the bits with the sign cleared: for IEEE floats the order of non-negative values is
    the order of their bit patterns as integers, so this is exactly max |x| (NaN stays NaN), and
    integer max reductions run several times faster than bf16 ones on CPU. Rows are reduced first
    (elementwise across rows, the vectorizable direction).
    """
    int_dtype = dict(FLOAT_BITS_AS_INT)[view.dtype]
    magnitude = torch.bitwise_and(view.view(int_dtype), torch.iinfo(int_dtype).max,
                                  out=_like(scratch, view, int_dtype))
    if magnitude.shape[-3] > 1:
        magnitude = magnitude.amax(-3, keepdim=True)
    return magnitude.amax(dim=(-3, -1)).view(view.dtype).float()


def _store(values: torch.Tensor, dst: torch.Tensor) -> None:
    """dst <- values: the fp8 cast (round to nearest even), or for integer codes `round` (half to
    even) in place, then the exact cast (a float -> int cast alone would truncate toward zero)."""
    dst.copy_(values if dst.dtype.is_floating_point else values.round_())


def quantize_piece_unclamped(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float,
                              scratch: torch.Tensor) -> None:
    """dst <- (src / scale) cast to fp8: division in float32 (in `scratch`), then the cast.

    Bitwise `quantize_piece` when every |src| / scale <= fmax * (1 + 2^-23), which holds when the
    scales come from `scale_from_amax` of an amax at least the tile's: scale = fl(amax / fmax)
    is at most one rounding below amax / fmax, and values up to halfway to the next fp8 step
    (464 for e4m3fn, 248 for e4m3fnuz, 127.5 for int8) round to fmax exactly as the clamped value
    does. Saves the clamp pass. Not for MX scales (`CodeFormat.scales_cover_amax` is false there).
    """
    values = _like(scratch, src, torch.float32)
    values.copy_(src).div_(scale)
    _store(values, dst)


def quantize_piece_eager(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float,
                          scratch: torch.Tensor) -> None:
    """`quantize_piece` with its float32 temporary in `scratch`."""
    values = _like(scratch, src, torch.float32)
    values.copy_(src).div_(scale).clamp_(-fmax, fmax)
    _store(values, dst)


def quantize_piece(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float) -> None:
    """dst <- clamp(src / scale, +-fmax) cast to dst's fp8 dtype (division in float32).

    `quantize_window_(compiled=True)` runs this through inductor on CPU only: its C++ output was
    verified bitwise against eager (IEEE division, the same fp8 rounding); its GPU output was not,
    and eager GPU code is memory bound anyway. Re-wrapping it in `torch.compile` on every call is
    cheap: dynamo caches the compiled code on the function's code object. The amax pass is never
    compiled: the eager bit trick in `abs_max` is faster than inductor's reduction.
    """
    values = torch.div(src, scale).clamp_(-fmax, fmax)
    dst.copy_(values if dst.dtype.is_floating_point else values.round_())


def quantize_piece_rounded(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, fmax: float,
                            scratch: torch.Tensor, fmin: float | None = None) -> None:
    """dst <- clamp(src / scale computed in src's dtype, fmin (default -fmax), fmax) cast to fp8, or for
    integer codes rounded (half to even) then cast: compressed-tensors' order.

    The division runs in the weight's own dtype with the scale in that dtype, exactly as that library's
    `x / scale` on a bf16 model: torch computes a bf16 / bf16 quotient in float32 and rounds it to
    bf16 once, so the codes are double-rounded (float32 -> bf16 -> code). The scale grid holds values
    exact in that dtype (`formula.tile_scales`). A float32 weight divides in float32.
    """
    dtype = src.dtype if src.dtype in (torch.bfloat16, torch.float16) else torch.float32
    values = scratch.view(dtype)[: src.numel()].view(src.shape)
    torch.div(src, scale.to(dtype), out=values)
    values.clamp_(-fmax if fmin is None else fmin, fmax)
    dst.copy_(values if dst.dtype.is_floating_point else values.round_())


def quantize_piece_multiplied(src: torch.Tensor, factor: torch.Tensor, dst: torch.Tensor, fmax: float,
                               scratch: torch.Tensor) -> None:
    """dst <- clamp(src.float() * factor, +-fmax) cast to fp8 (transformers' FineGrainedFP8 order)."""
    values = _like(scratch, src, torch.float32)
    values.copy_(src).mul_(factor).clamp_(-fmax, fmax)
    dst.copy_(values)
