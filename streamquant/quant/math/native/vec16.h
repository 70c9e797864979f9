// The element math of streamquant's native kernels on 16 lanes at a time (GCC / Clang vector
// extensions: one source, lowered to AVX-512, AVX2 or SSE, whatever the build's -march offers).
//
// Every function is exact and equals the torch op it names, bit for bit (tests compare all bf16
// and fp16 values): loads are exact widenings, `divide` is IEEE division (correctly rounded; see
// its comment for the fast route), the fp8 / int8 encoders round to nearest even like torch 2.13's
// casts of values already clamped to +-fmax (c10's fp8e4m3fn / fp8e4m3fnuz_from_fp32_value, and
// `round_()` then the int8 cast), decoders are exact, the bf16 store is torch's vectorized
// round-to-nearest-even with NaN -> 0xFFFF.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace sq {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

constexpr int kLanes = 16;

inline f32x16 as_f32(u32x16 u) { return reinterpret_cast<f32x16&>(u); }
inline u32x16 as_u32(f32x16 f) { return reinterpret_cast<u32x16&>(f); }
inline f32x16 splat(float f) { return f32x16{} + f; }
inline u32x16 splat_u(uint32_t u) { return u32x16{} + u; }
inline u32x16 select(i32x16 mask, u32x16 a, u32x16 b) { return mask ? a : b; }
inline f32x16 select(i32x16 mask, f32x16 a, f32x16 b) { return mask ? a : b; }

// --- loads (exact) and stores --------------------------------------------------------------
inline f32x16 load_f32(const void* p) { f32x16 v; std::memcpy(&v, p, sizeof v); return v; }
inline f32x16 load_bf16(const void* p) {
#ifdef __AVX512F__  // one vpmovzxwd from memory (GCC splits the generic widening in two halves)
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return as_f32(reinterpret_cast<u32x16&>(u) << 16);
#else
  u16x16 h; std::memcpy(&h, p, sizeof h);
  return as_f32(__builtin_convertvector(h, u32x16) << 16);
#endif
}
inline f32x16 load_f16(const void* p) { f16x16 h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, f32x16); }

inline void store_f32(void* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
inline u16x16 bf16_bits(f32x16 v) {  // torch's vectorized float -> bf16
  u32x16 u = as_u32(v);
  u32x16 rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  return __builtin_convertvector(select(v != v, splat_u(0xFFFFu), rounded), u16x16);
}
inline void store_bf16(void* p, f32x16 v) {
#ifdef __AVX512F__  // one vpmovdw
  u32x16 u = as_u32(v);
  u32x16 rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  u32x16 bits = select(v != v, splat_u(0xFFFFu), rounded);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(reinterpret_cast<__m512i&>(bits)));
#else
  u16x16 h = bf16_bits(v); std::memcpy(p, &h, sizeof h);
#endif
}
inline void store_f16(void* p, f32x16 v) { f16x16 h = __builtin_convertvector(v, f16x16); std::memcpy(p, &h, sizeof h); }
inline f32x16 round_to_bf16(f32x16 v) { return as_f32(__builtin_convertvector(bf16_bits(v), u32x16) << 16); }
inline f32x16 round_to_f16(f32x16 v) { return __builtin_convertvector(__builtin_convertvector(v, f16x16), f32x16); }
inline void store_codes(void* p, u32x16 c) { u8x16 b = __builtin_convertvector(c, u8x16); std::memcpy(p, &b, sizeof b); }
inline u32x16 load_codes(const void* p) {  // zero-extended bytes
#ifdef __AVX512F__  // one vpmovzxbd (GCC scalarizes the generic widening of bytes)
  __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return reinterpret_cast<u32x16&>(u);
#else
  u8x16 b; std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, u32x16);
#endif
}

// --- arithmetic ------------------------------------------------------------------------------
// torch.clamp(v, -fmax, fmax): NaN stays NaN.
inline f32x16 clamp(f32x16 v, float fmax) {
  v = select(v < -fmax, splat(-fmax), v);
  return select(v > fmax, splat(fmax), v);
}

// Round |v| <= 2^22 to an integer (nearest even): (|v| + 1.5 * 2^23) - 1.5 * 2^23, sign kept.
inline f32x16 round_even(f32x16 v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// min(limit, a) where a NaN stays NaN (x86's min returns its second operand when one is NaN).
inline f32x16 min_keep_nan(f32x16 limit, f32x16 a) {
#ifdef __AVX512F__
  __m512 m = _mm512_min_ps(reinterpret_cast<__m512&>(limit), reinterpret_cast<__m512&>(a));
  return reinterpret_cast<f32x16&>(m);
#else
  return limit < a ? limit : a;
#endif
}

// e4m3 codes of v clamped to +-fmax: bias 7 (e4m3fn) or 8 (e4m3fnuz); NaN gives the NaN code.
//
// With a = min(fmax, |v|) and E its biased float32 exponent, raised to the smallest normal's
// (Emin: 121 for e4m3fn, 120 for e4m3fnuz), the sum s = a + 2^(E + 20) keeps k = a / 2^(E - 3)
// rounded to nearest even in its low mantissa bits (the float addition does the rounding; k <= 16).
// The code is then ((E - Emin) << 3) + k: for a normal a, k = 8 + its 3 mantissa bits (a carry to
// 16 moves to the next exponent by itself); below the smallest normal, k is the subnormal code.
template <bool kFnuz>
inline u32x16 encode_e4m3(f32x16 v, float fmax) {
  constexpr uint32_t min_normal_exp = kFnuz ? 120u : 121u;
  u32x16 sign = (as_u32(v) >> 24) & 0x80u;
  f32x16 a = min_keep_nan(splat(fmax), as_f32(as_u32(v) & 0x7FFFFFFFu));
  u32x16 e = as_u32(a) & 0x7F800000u;
  const u32x16 floor = splat_u(min_normal_exp << 23);
  e = e > floor ? e : floor;
  f32x16 sum = a + as_f32(e + (20u << 23));
  u32x16 code = ((e >> 20) - (min_normal_exp << 3)) + (as_u32(sum) & 0x1Fu);
  if constexpr (kFnuz) {  // no negative zero; NaN is 0x80
    code = select(code == 0u, code, code | sign);
    return select(a != a, splat_u(0x80u), code);
  } else {
    return select(a != a, splat_u(0x7Fu), code) | sign;
  }
}

// int8 codes of v clamped to +-fmax (<= 127): round half to even, NaN -> 0.
inline u32x16 encode_int(f32x16 v, float fmax) {
  v = clamp(v, fmax);
  i32x16 i = __builtin_convertvector(select(v != v, splat(0.0f), round_even(v)), i32x16);
  return reinterpret_cast<u32x16&>(i) & 0xFFu;
}

// float32 value of e4m3 codes (exact). NaN codes give fp8_convert's NaNs: the code placed in float16
// bits with 0x7E00 or-ed in, widened: 0x7FF00000 (e4m3fn, with the code's sign), 0xFFC00000 (e4m3fnuz).
template <bool kFnuz>
inline f32x16 decode_e4m3(u32x16 c) {
  constexpr uint32_t min_normal_exp = kFnuz ? 120u : 121u;
  constexpr float subnormal_step = kFnuz ? 1.0f / 1024.0f : 1.0f / 512.0f;
  u32x16 mag = c & 0x7Fu, sign = (c & 0x80u) << 24;
  f32x16 normal = as_f32((mag << 20) + ((min_normal_exp - 1u) << 23));
  f32x16 sub = __builtin_convertvector(mag, f32x16) * subnormal_step;
  f32x16 v = select(mag < 8u, sub, normal);
  if constexpr (kFnuz) return as_f32(select(c == 0x80u, splat_u(0xFFC00000u), as_u32(v) | sign));
  else return as_f32(select(mag == 0x7Fu, splat_u(0x7FF00000u), as_u32(v)) | sign);
}

inline f32x16 decode_int8(u32x16 c) {  // c: zero-extended bytes; sign-extend bit 7
  i32x16 i = reinterpret_cast<i32x16&>(c) - (reinterpret_cast<i32x16&>(c) & 0x80) * 2;
  return __builtin_convertvector(i, f32x16);
}

}  // namespace sq
