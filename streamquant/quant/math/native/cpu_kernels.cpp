// streamquant's native CPU quantization kernels: per-tile amax, quantize into codes, dequantize.
//
// Built at first use by `streamquant/quant/native/build.py` (torch.utils.cpp_extension, -O3
// -march=native, no fast-math, no FMA contraction) and called through `native/__init__.py`, which
// states the contract. Every function reproduces, bit for bit, the pure-torch kernels of
// `quant/math/torch_kernels.py` (the fallback and the reference in the tests): the same IEEE float32
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
#include <vector>

#include "tiles.h"

using namespace sq;

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
  const int64_t sb = job.src.stride(0) * item, sr = job.src.stride(1) * item;
  const int64_t db = job.dst.stride(0), dr = job.dst.stride(1);
  for_spans(job.l, job.factors, [&](int64_t b, int64_t i, int64_t start, int64_t stop, float factor) {
    quantize_span<kIn, kCode, kOp>(in + b * sb + i * sr + start * item, out + b * db + i * dr + start, stop - start,
                                   factor, job.fmax);
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

// The scale of a tile amax: the streamquant rule max(amax / fmax, min_scale) (float32 division), or
// MX's power of two 2^clamp(exponent(amax) - 8, -127, 127) from the float bits (`code_format.mx_scales`).
inline float tile_scale(float amax, float fmax, float min_scale, bool mx) {
  if (mx) {
    int32_t biased = static_cast<int32_t>(bits_of(amax)) >> 23;
    int32_t shared = std::clamp(biased > 0 ? biased - 127 - 8 : -127, -127, 127);
    return float_of(shared > -127 ? static_cast<uint32_t>(shared + 127) << 23 : 0x00400000u);
  }
  float s = amax / fmax;
  return s < min_scale ? min_scale : s;
}

struct FusedJob {
  const at::Tensor& src;
  at::Tensor& dst;
  at::Tensor& scales;
  at::Tensor& amaxes;
  const Layout& l;
  float fmax, min_scale;
  bool mx;
};

// One tile at a time: its amax over its rows, its scale, then its codes while it is in cache.
template <int kIn, int kCode>
void quantize_tiles_rows(const FusedJob& job) {
  constexpr int64_t item = kIn == kF32 ? 4 : 2;
  const Layout& l = job.l;
  const char* in = static_cast<const char*>(job.src.data_ptr());
  uint8_t* out = static_cast<uint8_t*>(job.dst.data_ptr());
  const int64_t sb = job.src.stride(0) * item, sr = job.src.stride(1) * item, db = job.dst.stride(0), dr = job.dst.stride(1);
  auto scale_acc = job.scales.accessor<float, 3>();
  auto amax_acc = job.amaxes.accessor<float, 3>();
  const int64_t gr = job.scales.size(1), band_elements = std::max<int64_t>(1, std::min(l.rows, l.tile_r) * l.cols);
  const int kind = kIn;
  at::parallel_for(0, l.batch * gr, std::max<int64_t>(1, kGrainElements / band_elements), [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t b = band / gr, r = band % gr;
      const int64_t first = r * l.tile_r, last = std::min(l.rows, first + l.tile_r);
      for (size_t s = 0; s < l.segments.size(); ++s) {
        const auto [start, stop] = l.segments[s];
        uint32_t m = 0;
        for (int64_t i = first; i < last; ++i) {
          const char* row = in + b * sb + i * sr + start * item;
          m = std::max(m, item == 4 ? max_magnitude(reinterpret_cast<const uint32_t*>(row), stop - start, 0x7FFFFFFFu)
                                    : static_cast<uint32_t>(max_magnitude(reinterpret_cast<const uint16_t*>(row),
                                                                          stop - start, static_cast<uint16_t>(0x7FFF))));
        }
        const float amax = magnitude_to_float(m, kind), scale = tile_scale(amax, job.fmax, job.min_scale, job.mx);
        amax_acc[b][r][s] = amax;
        scale_acc[b][r][s] = scale;
        for (int64_t i = first; i < last; ++i)
          quantize_span<kIn, kCode, kDivide>(in + b * sb + i * sr + start * item, out + b * db + i * dr + start,
                                             stop - start, scale, job.fmax);
      }
    }
  });
}

template <int kIn>
void quantize_tiles_code(const FusedJob& job, int64_t code) {
  if (code == kE4M3FN) quantize_tiles_rows<kIn, kE4M3FN>(job);
  else if (code == kE4M3FNUZ) quantize_tiles_rows<kIn, kE4M3FNUZ>(job);
  else quantize_tiles_rows<kIn, kInteger>(job);
}

}  // namespace

// For tile-local scales (every tile of the window whole in it): per tile, amax -> scale (streamquant
// rule or MX) -> codes in one read of the weight; amaxes and scales [B, GR, GC] written too.
void quantize_tiles(const at::Tensor& src, at::Tensor& dst, at::Tensor& scales, at::Tensor& amaxes, int64_t tile_r,
                    int64_t tile_c, int64_t code, double fmax, double min_scale, bool mx) {
  const Layout l = layout(src, scales, 0, 0, tile_r, tile_c);
  TORCH_CHECK(amaxes.sizes() == scales.sizes() && amaxes.scalar_type() == at::kFloat, "amaxes must be float32 like the scales");
  TORCH_CHECK(dst.sizes() == src.sizes() && dst.element_size() == 1 && (dst.size(2) <= 1 || dst.stride(2) == 1),
              "codes must be a 1-byte tensor shaped like the weight, last dim contiguous");
  TORCH_CHECK(code >= kE4M3FN && code <= kInteger, "bad code");
  const FusedJob job{src, dst, scales, amaxes, l, static_cast<float>(fmax), static_cast<float>(min_scale), mx};
  const int kind = dtype_kind(src.scalar_type(), "quantize_tiles");
  if (kind == kF32) quantize_tiles_code<kF32>(job, code);
  else if (kind == kBF16) quantize_tiles_code<kBF16>(job, code);
  else quantize_tiles_code<kF16>(job, code);
}

namespace {

template <int kCode, int kOut>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, const Layout& l) {
  constexpr int64_t item = kOut == kF32 ? 4 : 2;
  const uint8_t* in = static_cast<const uint8_t*>(codes.data_ptr());
  char* y = static_cast<char*>(out.data_ptr());
  const int64_t ob = out.stride(0) * item, orow = out.stride(1) * item, cb = codes.stride(0), cr = codes.stride(1);
  for_spans(l, scales, [&](int64_t b, int64_t i, int64_t start, int64_t stop, float scale) {
    dequantize_span<kCode, kOut>(in + b * cb + i * cr + start, y + b * ob + i * orow + start * item, stop - start, scale);
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
  m.def("quantize_tiles", &quantize_tiles, "per tile: amax, scale, codes, in one read", release());
  m.def("dequantize", &dequantize, "per-tile decode(codes) * scale", release());
}
