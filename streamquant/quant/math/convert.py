"""fp8 codes to float32, bitwise `q.float()`, at memory speed on CPU.

torch 2.13's CPU cast from an fp8 dtype runs one element at a time (~0.6 G elements/s on the
2-core machine the benchmarks use: `q.float()` of a 1M-element code block takes ~1.7 ms), which
made dequantization (the fp8 matmul fallback, the quantization-error measurement) the slowest pass
over a weight. `fp8_to_float32` gets the same values through vectorized integer ops and the
float16 cast instead (~7x faster there):

    an e4m3 code  s eeee mmm  placed as the float16 bits  s 0eeee mmm0000000
    is the same number scaled by 2^(15 - bias): fp16 has 5 exponent bits (bias 15), e4m3fn bias 7,
    e4m3fnuz bias 8. Subnormal codes (eeee = 0) land on fp16 subnormals with the same factor.

Every finite code is exact (a power-of-two rescale); the NaN codes (e4m3fn s1111111, e4m3fnuz
10000000) become NaN, so the result equals `q.float()` for all 256 codes of both formats (tested
exhaustively). Accelerators take the plain cast, which is already vectorized there.
"""

from __future__ import annotations

import torch

# dtype -> the power-of-two factor from the float16 placement back to the code's value
_FACTOR = {torch.float8_e4m3fn: 2.0 ** 8, torch.float8_e4m3fnuz: 2.0 ** 7}
_FP16_NAN_BITS = 0x7E00  # OR-ed in: all-ones exponent, non-zero mantissa


def _nan_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0x7E00 where the int16 code is a NaN, else 0, without a comparison (int16 compares run
    several times slower than arithmetic on CPU): e4m3fn NaN is magnitude 0x7F, e4m3fnuz NaN is 0x80."""
    if dtype == torch.float8_e4m3fn:
        flag = bits & 0x7F
        flag += 1
        flag >>= 7  # 1 only for magnitude 0x7F
        flag.neg_()
    else:
        flag = bits ^ 0x80
        flag -= 1
        flag >>= 15  # -1 only for 0x80 ^ 0x80 = 0
    flag &= _FP16_NAN_BITS
    return flag


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """`q.float()` for an e4m3fn / e4m3fnuz tensor (a new contiguous float32 tensor); other dtypes: `q.float()`."""
    if q.device.type != "cpu" or q.dtype not in _FACTOR:
        return q.float()
    bits = q.contiguous().view(torch.uint8).to(torch.int16)
    nan = _nan_bits(bits, q.dtype)
    sign = bits & 0x80
    sign <<= 8
    bits &= 0x7F
    bits <<= 7
    bits |= sign
    bits |= nan
    return bits.view(torch.float16).float().mul_(_FACTOR[q.dtype])
