"""torch's CPU int4 weight-only kernel (W4A16): its weight layout, derived from int4 codes, and the matmul.

torch (checked on 2.13) multiplies by int4 weights on the CPU with
`aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`:
  - `packed`: uint8 [N, K / 2], made by `aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)` from
    int32 nibbles [N, K] holding unsigned 0..15 (the `innerKTiles` argument changes nothing on the
    CPU). The layout is the kernel's own (blocks of 64 output rows, two rows per byte); it may
    depend on the CPU capability torch dispatches to and on the torch version, so it is only ever
    derived in memory: never stored, sent or hashed. Rows cut at multiples of `KERNEL_ROW_BLOCK`
    convert to the same bytes as the whole (tested), so the conversion runs over row chunks and
    its temporaries stay small.
  - `scales_and_zeros`: [K / group_size, N, 2] in x's dtype, (scale, zero) per group and output row.
  - the product: `W[n, k] = (nibble - 8) * scale + zero`, `y = x @ W.T` accumulated in float32 and
    rounded once to x's dtype. A row's result does not depend on the other rows or on the thread
    count (tested): the output is batch invariant.
  - refused by torch: N not a multiple of 16, a group size other than 32, 64, 128 or 256, K not a
    multiple of the group size; x must be 2-D and contiguous (`int4_kernel_linear` reshapes).
  - x may be bf16, fp16 or float32 (scales in the same dtype), but only bf16 is fast: on the 2-core
    AMD EPYC test machine (AVX-512 BF16), 4096x4096 at 1 row took 0.44-0.49 ms in bf16 (a bf16
    `F.linear`: 1.3-1.9 ms; dequantize-then-`F.linear`: 75-86 ms), 14.5 ms in float32, 25.6 ms in
    fp16. So it is used with bf16 only. Its cost grows with the rows (~0.19 ms per row there, bf16
    GEMM ~0.08): past ~600 rows dequantize-then-GEMM would be faster (`benchmarks/int4_decode.py`).

streamquant's int4 codes (`int4_pack.py`) store the nibble `code + 8`, which is exactly the kernel's
unsigned value, so the nibbles go over unchanged and:
  - symmetric: zero 0, `(nibble - 8) * scale = code * scale`;
  - asymmetric (`int4.py`): zero = -zero_point * scale, `code * scale - zero_point * scale`, the value
    of `(code - zero_point) * scale`.
Rounding: the kernel takes the scale and zero rounded to bf16, one rounding shared by the group's
elements; dequantize-then-`F.linear` rounds each weight `(code - zero_point) * scale` to bf16 on its
own. Measured through the layers (a [80, 1024] weight, 16 rows, groups 32 / 128 / 256), relative
error against the float64 product of the exact weights: zero-mean activations, kernel 2.3-2.5e-3,
dequantize 2.2-2.4e-3; all-positive activations (where a group's shared rounding adds up), kernel
1.7-2.0e-3, dequantize 1.6-1.7e-3, the largest gap asymmetric at group 256 (2.0 vs 1.7e-3); the bf16
rounding of the exact output alone is 1.6-1.7e-3. Dequantize is the closer of the two everywhere,
by 0-18%, and both are two orders of magnitude below the int4 quantization error itself, so the
kernel serves asymmetric weights too. `tests/quant/math/test_int4_matmul.py` states the bounds.
"""

from __future__ import annotations

import torch

from streamquant.quant.math.int4_pack import PACK_FACTOR, unpack_nibbles

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_ROW_MULTIPLE = 16  # torch refuses other N
KERNEL_ROW_BLOCK = 64  # the packed layout's row block: chunks of whole blocks convert independently
CONVERT_CHUNK_ELEMENTS = 1 << 20  # int32 nibbles per conversion chunk: 4 MB of temporaries


def cpu_int4_kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel (torch 2.6+)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def kernel_refusal(rows: int, cols: int, group_size: int) -> str | None:
    """Why the kernel cannot take an [rows, cols] weight in groups of `group_size`; None when it can."""
    if not cpu_int4_kernel_available():
        return f"torch {torch.__version__} has no CPU int4 kernel"
    if group_size not in KERNEL_GROUP_SIZES:
        return f"group size {group_size} is not one of {KERNEL_GROUP_SIZES}"
    if cols % group_size:
        return f"input size {cols} is not a multiple of the group size {group_size}"
    if rows % KERNEL_ROW_MULTIPLE:
        return f"output size {rows} is not a multiple of {KERNEL_ROW_MULTIPLE}"
    return None


def kernel_buffers(rows: int, cols: int, group_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (packed uint8 [rows, cols / 2], scales_and_zeros [cols / group_size, rows, 2]), filled with
    sentinels (0xFF bytes, NaN) so that an element the conversion never wrote shows."""
    packed = torch.full((rows, cols // 2), 0xFF, dtype=torch.uint8, device=device)
    scales_and_zeros = torch.full((cols // group_size, rows, 2), float("nan"), dtype=dtype, device=device)
    return packed, scales_and_zeros


@torch.no_grad()
def to_kernel_layout_(packed: torch.Tensor, scales_and_zeros: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                      zero_points: torch.Tensor | None = None) -> None:
    """Write the kernel layout of packed int4 `codes` (int32 [N, K / 8]), float32 `scales` [N, K / g] and
    int8 `zero_points` [N, K / g] (None: symmetric) into `packed` and `scales_and_zeros` (`kernel_buffers`)."""
    rows, cols = codes.shape[0], codes.shape[1] * PACK_FACTOR
    if packed.shape != (rows, cols // 2) or scales_and_zeros.shape != (scales.shape[1], rows, 2):
        raise ValueError(f"kernel buffers {list(packed.shape)} / {list(scales_and_zeros.shape)} do not fit codes of "
                         f"an [{rows}, {cols}] weight with scales {list(scales.shape)}")
    step = max(1, CONVERT_CHUNK_ELEMENTS // (cols * KERNEL_ROW_BLOCK)) * KERNEL_ROW_BLOCK
    for start in range(0, rows, step):
        nibbles = unpack_nibbles(codes[start:start + step])
        packed[start:start + step].copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
    scales_and_zeros[..., 0].copy_(scales.t())
    if zero_points is None:
        scales_and_zeros[..., 1].zero_()
    else:
        scales_and_zeros[..., 1].copy_(zero_points.float().mul(scales).neg_().t())


def int4_kernel_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T (+ bias)` for x [..., K] in `scales_and_zeros`' dtype and the kernel-layout weight W (see the
    module doc). The kernel has no bias: it is added to the rounded product (one more rounding)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), packed, group_size,
                                                   scales_and_zeros)
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.reshape(*x.shape[:-1], y.shape[-1])
