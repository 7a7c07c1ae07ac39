// Batch-norm microkernels, written once over xsimd and compiled per
// instruction set by the arch_*.cpp files.
//
// Each works on one region (kernel_table.hpp) on one thread. The order of
// every floating-point operation depends only on the region's shape, never on
// its address: loads are unaligned, lanes are assigned from the start of each
// row, so results are bitwise reproducible for any pointer and any thread
// split (the operators fix the regions from the tensor's shape alone).
//
// NCHW regions hold one channel; they reduce over everything. NHWC regions
// hold up to `cols` channels side by side; they reduce down the columns,
// which keeps every lane a channel and needs no horizontal sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernel_table.hpp"
#include "simd.hpp"

namespace bnorm {
namespace kernels_for {

using simd::bit_writer;
using simd::from_bits;
using simd::load_bits;
using simd::madd;
using simd::madd1;
using simd::to_bits;

// ---------------------------------------------------------------------------
// Statistics.
//
// A region's moments come from a two-pass algorithm on data that is in L1:
// pass 1 sums x - x0 (x0 the region's first value, so data far from zero
// loses nothing: x - x0 is exact when x and x0 are within a factor of two)
// to get a provisional mean m; pass 2 sums d = x - m and d^2. Then
//   mean = m + sum(d)/n,   M2 = sum(d^2) - sum(d)^2/n
// (the corrected two-pass formula, Chan, Golub & LeVeque 1983), in double.
// A constant region gives d == 0 everywhere: mean exact, M2 exactly 0.
// Float accumulation is fine for one region (at most a few thousand values
// per lane group); if anything overflowed or the data holds inf/NaN, the
// region is recomputed in double, which is exact in the sense that matters
// (finite data up to 1e18 cannot overflow it) and propagates NaN.

template <class A>
moments moments_double(const float* x, region r) {
  double sum = 0.0;
  for (int64_t i = 0; i < r.rows; ++i)
    for (int64_t j = 0; j < r.cols; ++j) sum += x[i * r.stride + j];
  const double count = static_cast<double>(r.rows * r.cols);
  const double mean = sum / count;
  double m2 = 0.0;
  for (int64_t i = 0; i < r.rows; ++i)
    for (int64_t j = 0; j < r.cols; ++j) {
      const double d = x[i * r.stride + j] - mean;
      m2 += d * d;
    }
  return {mean, m2};
}

template <class A>
moments moments_nchw(const float* x, region r) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const double count = static_cast<double>(r.rows * r.cols);
  const int64_t tail = r.cols % W, body = r.cols - tail;

  // Pass 1. Four accumulators: FP adds have a latency of about four cycles
  // and we want the loop limited by loads, not by one dependency chain. The
  // row's tail goes through a masked vector (inactive lanes add 0).
  const float x0 = x[0];
  const V vx0(x0);
  V s[4] = {V(0.f), V(0.f), V(0.f), V(0.f)};
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + 4 * W <= body; j += 4 * W) {
      s[0] += V::load_unaligned(row + j) - vx0;
      s[1] += V::load_unaligned(row + j + W) - vx0;
      s[2] += V::load_unaligned(row + j + 2 * W) - vx0;
      s[3] += V::load_unaligned(row + j + 3 * W) - vx0;
    }
    for (; j < body; j += W) s[1] += V::load_unaligned(row + j) - vx0;
    if (tail) s[2] += simd::keep_first<A>(simd::load_first<A>(row + j, tail) - vx0, tail);
  }
  const float sum0 = xsimd::hadd((s[0] + s[1]) + (s[2] + s[3]));
  const float m = static_cast<float>(x0 + sum0 / count);

  // Pass 2.
  const V vm(m);
  V d1[2] = {V(0.f), V(0.f)};
  V d2[2] = {V(0.f), V(0.f)};
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + 2 * W <= body; j += 2 * W) {
      const V a = V::load_unaligned(row + j) - vm;
      const V b = V::load_unaligned(row + j + W) - vm;
      d1[0] += a;
      d1[1] += b;
      d2[0] = madd(a, a, d2[0]);
      d2[1] = madd(b, b, d2[1]);
    }
    if (j < body) {
      const V a = V::load_unaligned(row + j) - vm;
      d1[0] += a;
      d2[0] = madd(a, a, d2[0]);
      j += W;
    }
    if (tail) {
      const V a = simd::keep_first<A>(simd::load_first<A>(row + j, tail) - vm, tail);
      d1[1] += a;
      d2[1] = madd(a, a, d2[1]);
    }
  }
  const double sum1 = static_cast<double>(xsimd::hadd(d1[0] + d1[1]));
  const double sum2 = static_cast<double>(xsimd::hadd(d2[0] + d2[1]));
  if (!std::isfinite(sum1) || !std::isfinite(sum2)) return moments_double<A>(x, r);
  return {m + sum1 / count, std::max(0.0, sum2 - sum1 * sum1 / count)};
}

// NHWC: the same two passes, down the columns, with rows read whole in
// memory order and one accumulator per channel kept in `work` (4 * cols
// floats, in L1/L2). Each channel sees exactly the operations of one vector
// lane, whether it falls in a vector or in the scalar tail.
template <class A>
void moments_nhwc(const float* x, region r, moments* out, float* work) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  float* s = work;
  float* m = work + r.cols;
  float* d1 = work + 2 * r.cols;
  float* d2 = work + 3 * r.cols;
  const float n = static_cast<float>(r.rows);
  std::fill(s, s + r.cols, 0.f);
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + W <= r.cols; j += W)
      (V::load_unaligned(s + j) + (V::load_unaligned(row + j) - V::load_unaligned(x + j)))
          .store_unaligned(s + j);
    for (; j < r.cols; ++j) s[j] += row[j] - x[j];
  }
  for (int64_t j = 0; j < r.cols; ++j) {
    m[j] = x[j] + s[j] / n;
    d1[j] = d2[j] = 0.f;
  }
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + W <= r.cols; j += W) {
      const V d = V::load_unaligned(row + j) - V::load_unaligned(m + j);
      (V::load_unaligned(d1 + j) + d).store_unaligned(d1 + j);
      madd(d, d, V::load_unaligned(d2 + j)).store_unaligned(d2 + j);
    }
    for (; j < r.cols; ++j) {
      const float d = row[j] - m[j];
      d1[j] += d;
      d2[j] = madd1<A>(d, d, d2[j]);
    }
  }
  const double count = static_cast<double>(r.rows);
  for (int64_t j = 0; j < r.cols; ++j) {
    if (std::isfinite(d1[j]) && std::isfinite(d2[j])) {
      out[j] = {m[j] + d1[j] / count,
                std::max(0.0, d2[j] - static_cast<double>(d1[j]) * d1[j] / count)};
    } else {
      out[j] = moments_double<A>(x + j, {r.rows, 1, r.stride});
    }
  }
}

// ---------------------------------------------------------------------------
// Normalize: y = (x - mean) * scale + shift. Subtracting first (rather than
// x * scale + (shift - mean * scale)) keeps y exact where x == mean, so a
// constant channel gives exactly `shift`, and costs nothing in a loop that
// waits for memory. ReLU keeps NaN (select on y <= 0, false for NaN).

template <class A>
inline simd::vfloat<A> relu_vec(simd::vfloat<A> y) {
  using V = simd::vfloat<A>;
  return xsimd::select(y <= V(0.f), V(0.f), y);
}
inline float relu1(float y) { return y <= 0.f ? 0.f : y; }

// Scalar elements before y + j is vector-aligned (for streaming stores).
template <class A>
int64_t head_to_align(const float* y, int64_t cols) {
  constexpr uintptr_t bytes = sizeof(simd::vfloat<A>);
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(y) % bytes;
  const int64_t head = misalign ? static_cast<int64_t>((bytes - misalign) / sizeof(float)) : 0;
  return std::min(head, cols);
}

// The row loop, compiled once per (ReLU, streaming) pair so that the
// vector loop tests neither.
template <class A, bool Relu, bool Stream>
void normalize_nchw_rows(const float* x, float* y, region r, float mean, float scale, float shift,
                         relu_bits relu_out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V vm(mean), vs(scale), vb(shift);
  auto compute = [&](V v) {
    const V out = madd(v - vm, vs, vb);
    if constexpr (Relu) return relu_vec<A>(out);
    return out;
  };
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* xr = x + i * r.stride;
    float* yr = y + i * r.stride;
    bit_writer bits(Relu ? relu_out.bits : nullptr, relu_out.index + i * r.stride);
    int64_t j = Stream ? head_to_align<A>(yr, r.cols) : 0;
    if (Stream && j > 0) {  // up to the first aligned vector; j < W
      const V v = compute(simd::load_first<A>(xr, j));
      if (Relu) bits.push(to_bits<A>(v > V(0.f)) & ((1u << j) - 1u), static_cast<unsigned>(j));
      simd::store_first<A>(yr, v, j);
    }
    for (; j + W <= r.cols; j += W) {
      const V v = compute(V::load_unaligned(xr + j));
      if (Relu) bits.push(to_bits<A>(v > V(0.f)), W);
      simd::store<A>(yr + j, v, Stream);
    }
    if (j < r.cols) {
      const int64_t n = r.cols - j;
      const V v = compute(simd::load_first<A>(xr + j, n));
      if (Relu) bits.push(to_bits<A>(v > V(0.f)) & ((1u << n) - 1u), static_cast<unsigned>(n));
      simd::store_first<A>(yr + j, v, n);
    }
    bits.finish();
  }
  if (Stream) _mm_sfence();
}

template <class A>
void normalize_nchw(const float* x, float* y, region r, float mean, float scale, float shift,
                    relu_bits relu_out, bool stream) {
  auto rows = relu_out.relu ? (stream ? normalize_nchw_rows<A, true, true>
                                      : normalize_nchw_rows<A, true, false>)
                            : (stream ? normalize_nchw_rows<A, false, true>
                                      : normalize_nchw_rows<A, false, false>);
  rows(x, y, r, mean, scale, shift, relu_out);
}

// NHWC rows are normalized whole, in memory order: one stream in, one out;
// the per-channel coefficients are re-read from L1 for every row.
template <class A>
void normalize_nhwc(const float* x, float* y, region r, const float* mean, const float* scale,
                    const float* shift, relu_bits relu_out, bool stream) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const bool relu = relu_out.relu;
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* xr = x + i * r.stride;
    float* yr = y + i * r.stride;
    const bool nt = stream && simd::is_aligned<A>(yr);
    bit_writer bits(relu ? relu_out.bits : nullptr, relu_out.index + i * r.stride);
    int64_t j = 0;
    for (; j + W <= r.cols; j += W) {
      V v = madd(V::load_unaligned(xr + j) - V::load_unaligned(mean + j),
                 V::load_unaligned(scale + j), V::load_unaligned(shift + j));
      if (relu) {
        v = relu_vec<A>(v);
        bits.push(to_bits<A>(v > V(0.f)), W);
      }
      simd::store<A>(yr + j, v, nt);
    }
    for (; j < r.cols; ++j) {
      const float v = madd1<A>(xr[j] - mean[j], scale[j], shift[j]);
      yr[j] = relu ? relu1(v) : v;
      bits.push(yr[j] > 0.f, 1);
    }
    bits.finish();
  }
  if (stream) _mm_sfence();
}

// ---------------------------------------------------------------------------
// Backward. reduce: sum(dy) and sum(dy * (x - mean)) in float per region,
// returned in double (recomputed in double if anything overflowed).
// apply: dx = a * dy + ((x - mean) * b + c), the per-channel coefficients
// of dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)) (batchnorm.cpp).

inline float masked1(const float* dy, int64_t j, const uint8_t* bits, int64_t index) {
  return (!bits || ((bits[index >> 3] >> (index & 7)) & 1u)) ? dy[j] : 0.f;
}

template <class A>
void backward_reduce_double(const float* x, const float* dy, region r, double mean,
                            relu_bits_in relu_in, double* sum_dy, double* sum_dy_xmu) {
  double s0 = 0.0, s1 = 0.0;
  for (int64_t i = 0; i < r.rows; ++i)
    for (int64_t j = 0; j < r.cols; ++j) {
      const double g = masked1(dy + i * r.stride, j, relu_in.bits, relu_in.index + i * r.stride + j);
      s0 += g;
      s1 += g * (x[i * r.stride + j] - mean);
    }
  *sum_dy = s0;
  *sum_dy_xmu = s1;
}

// dy in the first n lanes (all W if n == W), zeroed where the ReLU bit is
// clear; 0 in the other lanes.
template <class A>
inline simd::vfloat<A> load_dy(const float* dy, int64_t n, relu_bits_in relu_in, int64_t index) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V g = n == W ? V::load_unaligned(dy) : simd::load_first<A>(dy, n);
  if (!relu_in.bits) return g;
  return xsimd::select(from_bits<A>(load_bits(relu_in.bits, index, static_cast<int>(n))), g, V(0.f));
}

template <class A>
void backward_reduce_nchw(const float* x, const float* dy, region r, float mean,
                          relu_bits_in relu_in, double* sum_dy, double* sum_dy_xmu) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V vm(mean), zero(0.f);
  V s0[2] = {zero, zero}, s1[2] = {zero, zero};
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* xr = x + i * r.stride;
    const float* gr = dy + i * r.stride;
    const int64_t index = relu_in.index + i * r.stride;
    int64_t j = 0;
    for (; j + W <= r.cols; j += W) {
      const V g = load_dy<A>(gr + j, W, relu_in, index + j);
      const int k = static_cast<int>((j / W) & 1);
      s0[k] += g;
      s1[k] = madd(g, V::load_unaligned(xr + j) - vm, s1[k]);
    }
    if (j < r.cols) {  // masked tail: inactive lanes add 0
      const int64_t n = r.cols - j;
      const V g = load_dy<A>(gr + j, n, relu_in, index + j);
      s0[1] += g;
      s1[1] = madd(g, simd::keep_first<A>(simd::load_first<A>(xr + j, n) - vm, n), s1[1]);
    }
  }
  *sum_dy = static_cast<double>(xsimd::hadd(s0[0] + s0[1]));
  *sum_dy_xmu = static_cast<double>(xsimd::hadd(s1[0] + s1[1]));
  if (!std::isfinite(*sum_dy) || !std::isfinite(*sum_dy_xmu))
    backward_reduce_double<A>(x, dy, r, mean, relu_in, sum_dy, sum_dy_xmu);
}

// NHWC: rows whole, in memory order; per-channel float sums in `work`
// (2 * cols floats), returned in double.
template <class A>
void backward_reduce_nhwc(const float* x, const float* dy, region r, const float* mean,
                          relu_bits_in relu_in, double* sum_dy, double* sum_dy_xmu, float* work) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V zero(0.f);
  float* s0 = work;
  float* s1 = work + r.cols;
  std::fill(work, work + 2 * r.cols, 0.f);
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t at = i * r.stride;
    int64_t j = 0;
    for (; j + W <= r.cols; j += W) {
      V g = V::load_unaligned(dy + at + j);
      if (relu_in.bits)
        g = xsimd::select(from_bits<A>(load_bits(relu_in.bits, relu_in.index + at + j, W)), g, zero);
      (V::load_unaligned(s0 + j) + g).store_unaligned(s0 + j);
      madd(g, V::load_unaligned(x + at + j) - V::load_unaligned(mean + j), V::load_unaligned(s1 + j))
          .store_unaligned(s1 + j);
    }
    for (; j < r.cols; ++j) {
      const float g = masked1(dy + at, j, relu_in.bits, relu_in.index + at + j);
      s0[j] += g;
      s1[j] = madd1<A>(g, x[at + j] - mean[j], s1[j]);
    }
  }
  for (int64_t j = 0; j < r.cols; ++j) {
    sum_dy[j] = s0[j];
    sum_dy_xmu[j] = s1[j];
    if (!std::isfinite(s0[j]) || !std::isfinite(s1[j]))
      backward_reduce_double<A>(x + j, dy + j, {r.rows, 1, r.stride}, mean[j],
                                {relu_in.bits, relu_in.index + j}, sum_dy + j, sum_dy_xmu + j);
  }
}

template <class A>
void backward_apply_nchw(const float* x, const float* dy, float* dx, region r, float mean,
                         float a, float b, float c, relu_bits_in relu_in, bool stream) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V vm(mean), va(a), vb(b), vc(c), zero(0.f);
  // n lanes of dx from position j of row `at` (n == W: a full vector).
  auto compute = [&](int64_t at, int64_t j, int64_t n) {
    const V g = load_dy<A>(dy + at + j, n, relu_in, relu_in.index + at + j);
    if (!x) return va * g;
    const V xv = n == W ? V::load_unaligned(x + at + j) : simd::load_first<A>(x + at + j, n);
    return madd(va, g, madd(xv - vm, vb, vc));
  };
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t at = i * r.stride;
    int64_t j = stream ? head_to_align<A>(dx + at, r.cols) : 0;
    if (j > 0) simd::store_first<A>(dx + at, compute(at, 0, j), j);
    for (; j + W <= r.cols; j += W) simd::store<A>(dx + at + j, compute(at, j, W), stream);
    if (j < r.cols) simd::store_first<A>(dx + at + j, compute(at, j, r.cols - j), r.cols - j);
  }
  if (stream) _mm_sfence();
}

template <class A>
void backward_apply_nhwc(const float* x, const float* dy, float* dx, region r, const float* mean,
                         const float* a, const float* b, const float* c, relu_bits_in relu_in,
                         bool stream) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V zero(0.f);
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t at = i * r.stride;
    const bool nt = stream && simd::is_aligned<A>(dx + at);
    int64_t j = 0;
    for (; j + W <= r.cols; j += W) {
      V g = V::load_unaligned(dy + at + j);
      if (relu_in.bits)
        g = xsimd::select(from_bits<A>(load_bits(relu_in.bits, relu_in.index + at + j, W)), g, zero);
      const V rest = x ? madd(V::load_unaligned(x + at + j) - V::load_unaligned(mean + j),
                              V::load_unaligned(b + j), V::load_unaligned(c + j))
                       : zero;
      simd::store<A>(dx + at + j, madd(V::load_unaligned(a + j), g, rest), nt);
    }
    for (; j < r.cols; ++j) {
      const float g = masked1(dy + at, j, relu_in.bits, relu_in.index + at + j);
      const float rest = x ? madd1<A>(x[at + j] - mean[j], b[j], c[j]) : 0.f;
      dx[at + j] = madd1<A>(a[j], g, rest);
    }
  }
  if (stream) _mm_sfence();
}

}  // namespace kernels_for

// The table of microkernels compiled for instruction set A.
template <class A>
kernel_table make_kernel_table(const char* isa) {
  using namespace kernels_for;
  return {isa,
          moments_nchw<A>,
          moments_nhwc<A>,
          normalize_nchw<A>,
          normalize_nhwc<A>,
          backward_reduce_nchw<A>,
          backward_reduce_nhwc<A>,
          backward_apply_nchw<A>,
          backward_apply_nhwc<A>};
}

}  // namespace bnorm
