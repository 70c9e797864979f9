// streamquant's native CPU quantization kernels: per-tile amax, quantize into codes, dequantize.
//
// Built at first use by `streamquant/quant/native/build.py` (torch.utils.cpp_extension, -O3
// -march=native, no fast-math, no FMA contraction) and called through `native/__init__.py`, which
// states the contract. Every function reproduces, bit for bit, the pure-torch kernels of
// `quant/fp8_kernels.py` (the fallback and the reference in the tests): the same IEEE float32
// division or multiplication, the same clamp, and torch 2.13's own conversions
// (c10's fp8e4m3fn / fp8e4m3fnuz_from_fp32_value, round-half-to-even for integer codes, the
// vectorized float -> bf16 conversion with its NaN = 0xFFFF); `vec16.h` holds that element math,
// 16 lanes at a time. This file is the tensor plumbing: checks, tile geometry, parallel rows.
//
// Tensors arrive as [B, R, C] views (the last dim contiguous; batch and row strides free); a tile
// grid [B, GR, GC] (float32, any strides) holds one value per tile of `tile_r` x `tile_c`
// elements, the window's local row i and column j falling in grid cell
// ((i + r_off) / tile_r, (j + c_off) / tile_c). Work is split over rows with at::parallel_for,
// so it runs on the threads torch is allowed to use.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace {

enum Code : int64_t { kE4M3FN = 0, kE4M3FNUZ = 1, kInteger = 2 };
enum Op : int64_t { kDivide = 0, kMultiply = 1, kDivideRounded = 2 };
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int64_t kGrainElements = 1 << 16;  // elements per parallel task, at least

inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float half_to_float(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return static_cast<float>(x); }

int dtype_kind(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, what, " takes bf16, fp16 or fp32");
  return dtype == at::kFloat ? kF32 : (dtype == at::kBFloat16 ? kBF16 : kF16);
}

// A [B, R, C] view with its tile grid: base pointers, byte strides, and the column segments (one
// tile each) every row is cut into.
struct Layout {
  int64_t batch, rows, cols, r_off, tile_r;
  std::vector<std::pair<int64_t, int64_t>> segments;
};

Layout layout(const at::Tensor& t, const at::Tensor& grid, int64_t r_off, int64_t c_off, int64_t tile_r,
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

}  // namespace

namespace {

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

}  // namespace

// grid[b, gr, gc] <- max |src| over the tile (NaN wins: the max is taken over sign-cleared bits).
// With enough tile rows, each thread takes whole tile rows (bands) and writes their cells; with few
// (per tensor, a handful of blocks) threads split the rows and keep partial maxima, merged at the end.
void amax(const at::Tensor& src, at::Tensor& grid, int64_t r_off, int64_t c_off, int64_t tile_r, int64_t tile_c) {
  const Layout l = layout(src, grid, r_off, c_off, tile_r, tile_c);
  const int kind = dtype_kind(src.scalar_type(), "amax");
  const int64_t gr = grid.size(1), gc = grid.size(2), cells = l.batch * gr * gc, threads = at::get_num_threads();
  const char* base = static_cast<const char*>(src.data_ptr());
  const int64_t item = src.element_size(), sb = src.stride(0) * item, sr = src.stride(1) * item;
  auto acc = grid.accessor<float, 3>();
  if (l.batch * gr >= 4 * threads) {
    const int64_t band_elements = std::max<int64_t>(1, std::min(l.rows, tile_r) * l.cols);
    at::parallel_for(0, l.batch * gr, std::max<int64_t>(1, kGrainElements / band_elements), [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> cell(gc);
      for (int64_t band = begin; band < end; ++band) {
        const int64_t b = band / gr, r = band % gr;
        std::fill(cell.begin(), cell.end(), 0u);
        const int64_t first = std::max<int64_t>(0, r * tile_r - r_off), last = std::min(l.rows, (r + 1) * tile_r - r_off);
        for (int64_t i = first; i < last; ++i) row_amax(base + b * sb + i * sr, item, l, cell.data());
        for (int64_t c = 0; c < gc; ++c) acc[b][r][c] = magnitude_to_float(cell[c], kind);
      }
    });
    return;
  }
  std::vector<uint32_t> partial(static_cast<size_t>(threads * cells), 0u);
  for_rows(l, [&](int64_t, int64_t b, int64_t i) {
    uint32_t* cell = partial.data() + at::get_thread_num() * cells + (b * gr + (i + l.r_off) / l.tile_r) * gc;
    row_amax(base + b * sb + i * sr, item, l, cell);
  });
  for (int64_t b = 0; b < l.batch; ++b)
    for (int64_t r = 0; r < gr; ++r)
      for (int64_t c = 0; c < gc; ++c) {
        uint32_t m = 0;
        for (int64_t t = 0; t < threads; ++t) m = std::max(m, partial[t * cells + (b * gr + r) * gc + c]);
        acc[b][r][c] = magnitude_to_float(m, kind);
      }
}

namespace {

template <int kIn>
inline sq::f32x16 load_lanes(const char* p) {
  if constexpr (kIn == kF32) return sq::load_f32(p);
  else if constexpr (kIn == kBF16) return sq::load_bf16(p);
  else return sq::load_f16(p);
}

template <int kIn, int kCode, int kOp>
inline sq::u32x16 quantize_lanes(sq::f32x16 v, float factor, float fmax) {
  if constexpr (kOp == kMultiply) v = v * factor;
  else v = v / factor;
  if constexpr (kOp == kDivideRounded && kIn == kBF16) v = sq::round_to_bf16(v);
  if constexpr (kOp == kDivideRounded && kIn == kF16) v = sq::round_to_f16(v);
  if constexpr (kCode == kE4M3FN) return sq::encode_e4m3<false>(v, fmax);
  else if constexpr (kCode == kE4M3FNUZ) return sq::encode_e4m3<true>(v, fmax);
  else return sq::encode_int(v, fmax);
}

// n elements of one tile row: whole vectors, then the tail through a zero-padded copy (same code).
template <int kIn, int kCode, int kOp>
inline void quantize_span(const char* in, uint8_t* q, int64_t n, float factor, float fmax) {
  constexpr int64_t item = kIn == kF32 ? 4 : 2;
  int64_t j = 0;
  for (; j + sq::kLanes <= n; j += sq::kLanes)
    sq::store_codes(q + j, quantize_lanes<kIn, kCode, kOp>(load_lanes<kIn>(in + j * item), factor, fmax));
  if (j < n) {
    alignas(64) char pad[sq::kLanes * item] = {};
    alignas(16) uint8_t out[sq::kLanes];
    std::memcpy(pad, in + j * item, (n - j) * item);
    sq::store_codes(out, quantize_lanes<kIn, kCode, kOp>(load_lanes<kIn>(pad), factor, fmax));
    std::memcpy(q + j, out, n - j);
  }
}

struct QuantizeJob {
  const at::Tensor& src;
  const at::Tensor& factors;
  at::Tensor& dst;
  const Layout& l;
  float fmax;
};

template <int kIn, int kCode, int kOp>
void quantize_rows(const QuantizeJob& job) {
  constexpr int64_t item = kIn == kF32 ? 4 : 2;
  const char* in = static_cast<const char*>(job.src.data_ptr());
  uint8_t* out = static_cast<uint8_t*>(job.dst.data_ptr());
  const float* f = job.factors.data_ptr<float>();
  const int64_t sb = job.src.stride(0) * item, sr = job.src.stride(1) * item;
  const int64_t db = job.dst.stride(0), dr = job.dst.stride(1);
  const int64_t fb = job.factors.stride(0), fr = job.factors.stride(1), fc = job.factors.stride(2);
  const Layout& l = job.l;
  for_rows(l, [&](int64_t, int64_t b, int64_t i) {
    const char* row = in + b * sb + i * sr;
    uint8_t* codes = out + b * db + i * dr;
    const float* cell = f + b * fb + ((i + l.r_off) / l.tile_r) * fr;
    for (size_t s = 0; s < l.segments.size(); ++s) {
      const auto [start, stop] = l.segments[s];
      quantize_span<kIn, kCode, kOp>(row + start * item, codes + start, stop - start, cell[s * fc], job.fmax);
    }
  });
}

template <int kIn, int kCode>
void quantize_op(const QuantizeJob& job, int64_t op) {
  if (op == kMultiply) quantize_rows<kIn, kCode, kMultiply>(job);
  else if (op == kDivideRounded) quantize_rows<kIn, kCode, kDivideRounded>(job);
  else quantize_rows<kIn, kCode, kDivide>(job);
}

template <int kIn>
void quantize_code(const QuantizeJob& job, int64_t code, int64_t op) {
  if (code == kE4M3FN) quantize_op<kIn, kE4M3FN>(job, op);
  else if (code == kE4M3FNUZ) quantize_op<kIn, kE4M3FNUZ>(job, op);
  else quantize_op<kIn, kInteger>(job, op);
}

}  // namespace

// dst <- code(clamp(src / factor (or * factor), +-fmax)) per tile; see the file comment.
void quantize(const at::Tensor& src, const at::Tensor& factors, at::Tensor& dst, int64_t r_off, int64_t c_off,
              int64_t tile_r, int64_t tile_c, int64_t code, double fmax, int64_t op) {
  const Layout l = layout(src, factors, r_off, c_off, tile_r, tile_c);
  TORCH_CHECK(dst.sizes() == src.sizes() && dst.element_size() == 1 && (dst.size(2) <= 1 || dst.stride(2) == 1),
              "codes must be a 1-byte tensor shaped like the weight, last dim contiguous");
  TORCH_CHECK(code >= kE4M3FN && code <= kInteger && op >= kDivide && op <= kDivideRounded, "bad code or op");
  const QuantizeJob job{src, factors, dst, l, static_cast<float>(fmax)};
  const int kind = dtype_kind(src.scalar_type(), "quantize");
  if (kind == kF32) quantize_code<kF32>(job, code, op);
  else if (kind == kBF16) quantize_code<kBF16>(job, code, op);
  else quantize_code<kF16>(job, code, op);
}

namespace {

template <int kCode>
inline sq::f32x16 decode_lanes(sq::u32x16 c) {
  if constexpr (kCode == kE4M3FN) return sq::decode_e4m3<false>(c);
  else if constexpr (kCode == kE4M3FNUZ) return sq::decode_e4m3<true>(c);
  else return sq::decode_int8(c);
}

template <int kOut>
inline void store_lanes(char* p, sq::f32x16 v) {
  if constexpr (kOut == kF32) sq::store_f32(p, v);
  else if constexpr (kOut == kBF16) sq::store_bf16(p, v);
  else sq::store_f16(p, v);
}

template <int kCode, int kOut>
inline void dequantize_span(const uint8_t* q, char* out, int64_t n, float scale) {
  constexpr int64_t item = kOut == kF32 ? 4 : 2;
  int64_t j = 0;
  for (; j + sq::kLanes <= n; j += sq::kLanes)
    store_lanes<kOut>(out + j * item, decode_lanes<kCode>(sq::load_codes(q + j)) * scale);
  if (j < n) {
    alignas(16) uint8_t pad[sq::kLanes] = {};
    alignas(64) char values[sq::kLanes * item];
    std::memcpy(pad, q + j, n - j);
    store_lanes<kOut>(values, decode_lanes<kCode>(sq::load_codes(pad)) * scale);
    std::memcpy(out + j * item, values, (n - j) * item);
  }
}

template <int kCode, int kOut>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, const Layout& l) {
  constexpr int64_t item = kOut == kF32 ? 4 : 2;
  const uint8_t* in = static_cast<const uint8_t*>(codes.data_ptr());
  char* y = static_cast<char*>(out.data_ptr());
  const float* s = scales.data_ptr<float>();
  const int64_t ob = out.stride(0) * item, orow = out.stride(1) * item, cb = codes.stride(0), cr = codes.stride(1);
  const int64_t sb = scales.stride(0), sr = scales.stride(1), sc = scales.stride(2);
  for_rows(l, [&](int64_t, int64_t b, int64_t i) {
    const uint8_t* row = in + b * cb + i * cr;
    char* dst = y + b * ob + i * orow;
    const float* cell = s + b * sb + ((i + l.r_off) / l.tile_r) * sr;
    for (size_t seg = 0; seg < l.segments.size(); ++seg) {
      const auto [start, stop] = l.segments[seg];
      dequantize_span<kCode, kOut>(row + start, dst + start * item, stop - start, cell[seg * sc]);
    }
  });
}

template <int kOut>
void dequantize_code(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, const Layout& l, int64_t code) {
  if (code == kE4M3FN) dequantize_rows<kE4M3FN, kOut>(codes, scales, out, l);
  else if (code == kE4M3FNUZ) dequantize_rows<kE4M3FNUZ, kOut>(codes, scales, out, l);
  else dequantize_rows<kInteger, kOut>(codes, scales, out, l);
}

}  // namespace

// out <- cast(decode(codes) * scale) per tile, out in float32, bf16 or fp16.
void dequantize(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, int64_t r_off, int64_t c_off,
                int64_t tile_r, int64_t tile_c, int64_t code) {
  const Layout l = layout(codes, scales, r_off, c_off, tile_r, tile_c);
  TORCH_CHECK(codes.element_size() == 1, "codes are 1-byte");
  TORCH_CHECK(out.sizes() == codes.sizes() && (out.size(2) <= 1 || out.stride(2) == 1), "out must be shaped like the codes");
  TORCH_CHECK(code >= kE4M3FN && code <= kInteger, "bad code");
  const int kind = dtype_kind(out.scalar_type(), "dequantize");
  if (kind == kF32) dequantize_code<kF32>(codes, scales, out, l, code);
  else if (kind == kBF16) dequantize_code<kBF16>(codes, scales, out, l, code);
  else dequantize_code<kF16>(codes, scales, out, l, code);
}

// The GIL is released while a kernel runs: other Python threads (a reload's reader, a sync receiver) go on.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("amax", &amax, "per-tile max |x| into a float32 grid", release());
  m.def("quantize", &quantize, "per-tile codes of clamp(x / factor) (or x * factor)", release());
  m.def("dequantize", &dequantize, "per-tile decode(codes) * scale", release());
}
