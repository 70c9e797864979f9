// Tile geometry and per-row spans shared by streamquant's native kernels (`cpu_kernels.cpp`): dtype
// kinds, the [B, R, C] layout with its column segments (one tile each), the parallel row loop, and
// the per-span amax / quantize / dequantize loops over `vec16.h`'s element math.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace sq {

enum Code : int64_t { kE4M3FN = 0, kE4M3FNUZ = 1, kInteger = 2 };
enum Op : int64_t { kDivide = 0, kMultiply = 1, kDivideRounded = 2 };
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int64_t kGrainElements = 1 << 16;  // elements per parallel task, at least

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float half_to_float(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return static_cast<float>(x); }

inline int dtype_kind(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, what, " takes bf16, fp16 or fp32");
  return dtype == at::kFloat ? kF32 : (dtype == at::kBFloat16 ? kBF16 : kF16);
}

// A [B, R, C] view with its tile grid: base pointers, byte strides, and the column segments (one
// tile each) every row is cut into.
struct Layout {
  int64_t batch, rows, cols, r_off, tile_r;
  std::vector<std::pair<int64_t, int64_t>> segments;
};

inline Layout layout(const at::Tensor& t, const at::Tensor& grid, int64_t r_off, int64_t c_off, int64_t tile_r,
              int64_t tile_c) {
  TORCH_CHECK(t.dim() == 3 && t.device().is_cpu(), "native kernels take CPU [B, R, C] views");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "the last dim must be contiguous");
  TORCH_CHECK(tile_r > 0 && tile_c > 0 && r_off >= 0 && r_off < tile_r && c_off >= 0 && c_off < tile_c,
              "bad tile geometry");
  const int64_t rows = t.size(1), cols = t.size(2);
  TORCH_CHECK(grid.dim() == 3 && grid.scalar_type() == at::kFloat, "the tile grid must be float32 [B, GR, GC]");
  TORCH_CHECK(grid.size(0) == t.size(0) && grid.size(1) == (rows + r_off + tile_r - 1) / tile_r &&
                  grid.size(2) == (cols + c_off + tile_c - 1) / tile_c,
              "tile grid ", grid.sizes(), " does not cover a ", rows, "x", cols, " window");
  Layout out{t.size(0), rows, cols, r_off, tile_r, {}};
  for (int64_t start = 0; start < cols;) {
    int64_t stop = std::min(cols, start + tile_c - (start + c_off) % tile_c);
    out.segments.emplace_back(start, stop);
    start = stop;
  }
  return out;
}

// Run fn(row index k in [0, B*R), batch b, row i) over every row, split over torch's threads.
template <typename Fn>
void for_rows(const Layout& l, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, l.cols));
  at::parallel_for(0, l.batch * l.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) fn(k, k / l.rows, k % l.rows);
  });
}

// fn(b, i, start, stop, value): every tile span [start, stop) of every row i of batch b, with the value
// of its tile's cell in `grid` (a factor or a scale), rows split over torch's threads.
template <typename Fn>
void for_spans(const Layout& l, const at::Tensor& grid, const Fn& fn) {
  const float* g = grid.data_ptr<float>();
  const int64_t gb = grid.stride(0), gr = grid.stride(1), gc = grid.stride(2);
  for_rows(l, [&](int64_t, int64_t b, int64_t i) {
    const float* cell = g + b * gb + ((i + l.r_off) / l.tile_r) * gr;
    for (size_t s = 0; s < l.segments.size(); ++s) fn(b, i, l.segments[s].first, l.segments[s].second, cell[s * gc]);
  });
}

template <typename Bits>
inline Bits max_magnitude(const Bits* p, int64_t n, Bits mask) {
  Bits m = 0;
  for (int64_t j = 0; j < n; ++j) {
    Bits v = p[j] & mask;
    m = v > m ? v : m;
  }
  return m;
}

// The amax as float32; a NaN tile gives a NaN (all ones, as torch.maximum's vectorized path; torch's
// payload varies with the tensor's size, and only its NaN-ness is read).
inline float magnitude_to_float(uint32_t m, int kind) {
  float f = kind == kBF16 ? float_of(m << 16) : (kind == kF16 ? half_to_float(static_cast<uint16_t>(m)) : float_of(m));
  return f != f ? float_of(0xFFFFFFFFu) : f;
}

// max |x| bits of each tile segment of one row, max-ed into cell[0..segments).
inline void row_amax(const char* row, int64_t item, const Layout& l, uint32_t* cell) {
  for (size_t s = 0; s < l.segments.size(); ++s) {
    const auto [start, stop] = l.segments[s];
    uint32_t m = item == 4 ? max_magnitude(reinterpret_cast<const uint32_t*>(row) + start, stop - start, 0x7FFFFFFFu)
                           : max_magnitude(reinterpret_cast<const uint16_t*>(row) + start, stop - start,
                                           static_cast<uint16_t>(0x7FFF));
    cell[s] = std::max(cell[s], m);
  }
}

template <int kIn>
inline f32x16 load_lanes(const char* p) {
  if constexpr (kIn == kF32) return load_f32(p);
  else if constexpr (kIn == kBF16) return load_bf16(p);
  else return load_f16(p);
}

template <int kIn, int kCode, int kOp>
inline u32x16 quantize_lanes(f32x16 v, float factor, float fmax) {
  if constexpr (kOp == kMultiply) v = v * factor;
  else v = v / factor;
  if constexpr (kOp == kDivideRounded && kIn == kBF16) v = round_to_bf16(v);
  if constexpr (kOp == kDivideRounded && kIn == kF16) v = round_to_f16(v);
  if constexpr (kCode == kE4M3FN) return encode_e4m3<false>(v, fmax);
  else if constexpr (kCode == kE4M3FNUZ) return encode_e4m3<true>(v, fmax);
  else return encode_int(v, fmax);
}

// n elements of one tile row: whole vectors, then the tail through a zero-padded copy (same code).
template <int kIn, int kCode, int kOp>
inline void quantize_span(const char* in, uint8_t* q, int64_t n, float factor, float fmax) {
  constexpr int64_t item = kIn == kF32 ? 4 : 2;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    store_codes(q + j, quantize_lanes<kIn, kCode, kOp>(load_lanes<kIn>(in + j * item), factor, fmax));
  if (j < n) {
    alignas(64) char pad[kLanes * item] = {};
    alignas(16) uint8_t out[kLanes];
    std::memcpy(pad, in + j * item, (n - j) * item);
    store_codes(out, quantize_lanes<kIn, kCode, kOp>(load_lanes<kIn>(pad), factor, fmax));
    std::memcpy(q + j, out, n - j);
  }
}

template <int kCode>
inline f32x16 decode_lanes(u32x16 c) {
  if constexpr (kCode == kE4M3FN) return decode_e4m3<false>(c);
  else if constexpr (kCode == kE4M3FNUZ) return decode_e4m3<true>(c);
  else return decode_int8(c);
}

template <int kOut>
inline void store_lanes(char* p, f32x16 v) {
  if constexpr (kOut == kF32) store_f32(p, v);
  else if constexpr (kOut == kBF16) store_bf16(p, v);
  else store_f16(p, v);
}

template <int kCode, int kOut>
inline void dequantize_span(const uint8_t* q, char* out, int64_t n, float scale) {
  constexpr int64_t item = kOut == kF32 ? 4 : 2;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    store_lanes<kOut>(out + j * item, decode_lanes<kCode>(load_codes(q + j)) * scale);
  if (j < n) {
    alignas(16) uint8_t pad[kLanes] = {};
    alignas(64) char values[kLanes * item];
    std::memcpy(pad, q + j, n - j);
    store_lanes<kOut>(values, decode_lanes<kCode>(load_codes(pad)) * scale);
    std::memcpy(out + j * item, values, (n - j) * item);
  }
}

}  // namespace sq
