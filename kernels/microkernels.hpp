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
#include <limits>

#include "kernel_table.hpp"
#include "simd.hpp"

namespace bnorm {
namespace kernels_for {
// Internal linkage: every arch_*.cpp compiles its own copy of each function
// here with its own -m flags. Shared (inline, external) definitions would let
// the linker keep one copy, possibly the AVX-512 one, for the SSE2 kernels too.
namespace {

using simd::bit_writer;
using simd::from_bits;
using simd::load_bits;
using simd::madd;
using simd::madd1;
using simd::opaque;
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

// Calls add(v, q) for v = f(the values of one channel's region r), a vector
// at a time: per row, groups of N vectors to accumulators 0..N-1, the
// vectors left over to 0, 1, 2, and the row's tail, a masked vector (zero in
// the inactive lanes), to N - 1 (fixed indices, so that the accumulators
// stay in registers). With N = 4 the loop also asks for the data
// kSumsAhead floats ahead.
//
// Chunks of long rows take N = 4: with two accumulators the loop waited on
// their adds and multiply-adds (4 cycles each on Zen 3), and the NCHW moments
// read L3 at 0.6-0.7 of a bare read; NCHW forward training 8x64x56x56
// -30%, 8x256x28x28 -10..-30%, 1x64x112x112 -8%, 32x64x56x56 -4..-7%
// (bnorm_ab both orders, session 21). The prefetch adds -5..-10% on tensors
// just beyond the L3 (32x64x56x56, 8x64x112x112) and nothing elsewhere.
// The W-channel groups (moments_nchw_group) keep N = 2: with 2 W vectors of
// partial sums live they spilled, and NCHW 32x2048x7x7 training took 25%
// longer with four.
constexpr int64_t kSumsAhead = 512;

template <class A, int N, class F, class Add>
inline void for_each_vector(const float* x, region r, F f, Add add) {
  static_assert(N == 2 || N == 4, "two or four accumulators");
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const int64_t tail = r.cols % W, body = r.cols - tail;
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + N * W <= body; j += N * W) {
      if (N == 4)
        for (int64_t b = 0; b < N * W; b += 16) __builtin_prefetch(row + j + kSumsAhead + b, 0, 3);
      add(f(V::load_unaligned(row + j)), 0);
      add(f(V::load_unaligned(row + j + W)), 1);
      if (N == 4) {
        add(f(V::load_unaligned(row + j + 2 * W)), 2);
        add(f(V::load_unaligned(row + j + 3 * W)), 3);
      }
    }
    if (j < body) add(f(V::load_unaligned(row + j)), 0);
    if (N == 4 && j + W < body) add(f(V::load_unaligned(row + j + W)), 1);
    if (N == 4 && j + 2 * W < body) add(f(V::load_unaligned(row + j + 2 * W)), 2);
    if (tail) add(simd::keep_first<A>(f(simd::load_first<A>(row + body, tail)), tail), N - 1);
  }
}

// Sums of d = x - k and of d^2 over one channel's region r (N accumulators
// each, see for_each_vector), into *d1 and *d2.
template <class A, int N = 4>
inline void deviation_sums(const float* x, region r, simd::vfloat<A> k, simd::vfloat<A>* d1,
                           simd::vfloat<A>* d2) {
  using V = simd::vfloat<A>;
  V s1[N], s2[N];
  for (int q = 0; q < N; ++q) s1[q] = s2[q] = V(0.f);
  for_each_vector<A, N>(
      x, r, [&](V v) { return v - k; },
      [&](V d, int q) {
        s1[q] += d;
        s2[q] = madd(d, d, s2[q]);
      });
  *d1 = N == 4 ? (s1[0] + s1[1]) + (s1[2] + s1[3]) : s1[0] + s1[1];
  *d2 = N == 4 ? (s2[0] + s2[1]) + (s2[2] + s2[3]) : s2[0] + s2[1];
}

// With a shift (the previous chunk's mean; NaN: none), one pass first, as
// for NHWC below (moments_columns_shifted, which explains the test); the two
// passes only if the shift is too far from the chunk's mean.
template <class A>
bool moments_nchw_shifted(const float* x, region r, float shift, moments* out) {
  using V = simd::vfloat<A>;
  V d1, d2;
  deviation_sums<A>(x, r, V(shift), &d1, &d2);
  const float sum1 = xsimd::hadd(d1);
  const float sum2 = xsimd::hadd(d2);
  const double count = static_cast<double>(r.rows * r.cols);
  // Finite sums (no inf or NaN in the data, no overflow) with the shift
  // within sigma/sqrt(7) of the mean; false for NaN.
  if (!(sum2 <= std::numeric_limits<float>::max() &&
        8.0 * sum1 * sum1 <= count * static_cast<double>(sum2)))
    return false;
  *out = {shift + sum1 / count, std::max(0.0, sum2 - static_cast<double>(sum1) * sum1 / count)};
  return true;
}

// Pass 1 of the two-pass algorithm: x0 + sum(x - x0)/n, x0 the region's
// first value. Four accumulators: FP adds have a latency of about four
// cycles and we want the loop limited by loads, not by one dependency chain.
// The row's tail goes through a masked vector (inactive lanes add 0).
template <class A>
float provisional_mean(const float* x, region r) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const int64_t tail = r.cols % W, body = r.cols - tail;
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
  return static_cast<float>(x0 + sum0 / static_cast<double>(r.rows * r.cols));
}

// The two passes over region r.
template <class A>
moments moments_two_pass(const float* x, region r) {
  using V = simd::vfloat<A>;
  const double count = static_cast<double>(r.rows * r.cols);
  const float m = provisional_mean<A>(x, r);
  V d1, d2;
  deviation_sums<A>(x, r, V(m), &d1, &d2);
  const double sum1 = static_cast<double>(xsimd::hadd(d1));
  const double sum2 = static_cast<double>(xsimd::hadd(d2));
  if (!std::isfinite(sum1) || !std::isfinite(sum2)) return moments_double<A>(x, r);
  return {m + sum1 / count, std::max(0.0, sum2 - sum1 * sum1 / count)};
}

// Without a shift (a slice's first chunk), a region is first reduced in one
// pass around a provisional mean from part of it; the two passes follow only
// if that is too far from the region's mean. The part: every 8th vector of
// every row (an eighth of the region, spread over all of it) when rows hold
// at least kSampleRowValues values, else the first rows (NCHW: images'
// planes of the channel) that hold at least kShiftValues values, when the
// region has more rows than that (shift_rows): their mean, were the values
// independent, lies within sigma/11 of the region's, well inside the
// sigma/sqrt(7) the test allows. Otherwise (a region of one row, or of too
// few) the two passes. 7x7 planes take three rows (147 values); with one
// row of 49 the test failed and three passes followed, and until session 10
// they took the two passes: NCHW 7x7 moments took twice as long as the same
// tensor's in NHWC.
constexpr int64_t kShiftValues = 128;
constexpr int64_t kSampleRowValues = 256;

// The first rows of r that hold at least kShiftValues values; 0 rows when r
// has no more rows than that.
inline region shift_rows(region r) {
  const int64_t rows = (kShiftValues + r.cols - 1) / r.cols;
  return {rows < r.rows ? rows : 0, r.cols, r.stride};
}

// Values that sampled_mean reads.
inline int64_t sampled_values(region r, int64_t width) {
  return r.rows * ((r.cols / width + 7) / 8) * width;
}

// The mean of every 8th vector of every row of r (r.cols >= 8 W).
template <class A>
float sampled_mean(const float* x, region r) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const float x0 = x[0];
  const V vx0(x0);
  V s0(0.f), s1(0.f);
  for (int64_t i = 0; i < r.rows; ++i) {
    const float* row = x + i * r.stride;
    int64_t j = 0;
    for (; j + 16 * W <= r.cols; j += 16 * W) {
      s0 += V::load_unaligned(row + j) - vx0;
      s1 += V::load_unaligned(row + j + 8 * W) - vx0;
    }
    if (j + W <= r.cols) s0 += V::load_unaligned(row + j) - vx0;
    if (j + 9 * W <= r.cols) s1 += V::load_unaligned(row + j + 8 * W) - vx0;
  }
  return static_cast<float>(x0 + xsimd::hadd(s0 + s1) / static_cast<double>(sampled_values(r, W)));
}

template <class A>
moments moments_nchw(const float* x, region r, float shift) {
  if (std::isnan(shift)) {
    if (r.cols >= kSampleRowValues && sampled_values(r, simd::vfloat<A>::size) >= kShiftValues)
      shift = sampled_mean<A>(x, r);
    else if (const region head = shift_rows(r); head.rows > 0)
      shift = provisional_mean<A>(x, head);
  }
  moments shifted;
  if (!std::isnan(shift) && moments_nchw_shifted<A>(x, r, shift, &shifted)) return shifted;
  return moments_two_pass<A>(x, r);
}

// NCHW channels with few values (a channel is one chunk of at most
// kGroupValues, e.g. 7x7 at small batches): W channels at once, so that the
// fixed costs of a reduction (horizontal sums, the double arithmetic) are
// paid once per W channels. Channel j of the group is region r at
// x + j * channel_stride; out[j] for j < channels <= W. Per channel, as
// moments_nchw without a shift: pass 1 over the first rows (shift_rows; the
// whole region if none), pass 2 over the region, each with two accumulators
// (alternating vectors); a channel whose first rows' mean is too far from
// its own gets the two passes (moments_two_pass). haddp sums
// the W channels' vectors into one vector, lane j holding channel j. The
// group is always channels [gW, gW + W) of the tensor, so a channel's
// arithmetic depends only on the shape.

template <class A>
void moments_nchw_group(const float* x, region r, int64_t channels, int64_t channel_stride,
                        moments* out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const double count = static_cast<double>(r.rows * r.cols), inv = 1.0 / count;
  const region head = shift_rows(r);
  const bool one_pass = head.rows > 0;
  const region first = one_pass ? head : r;
  alignas(64) float x0[W], m[W], s1[W], s2[W];
  V part[W], part2[W];
  for (int64_t j = 0; j < W; ++j) {
    part[j] = V(0.f);
    x0[j] = j < channels ? x[j * channel_stride] : 0.f;
    if (j >= channels) continue;
    const V vx0(x0[j]);
    V s0(0.f), s1(0.f);
    for_each_vector<A, 2>(
        x + j * channel_stride, first, [&](V v) { return v - vx0; },
        [&](V d, int k) { (k ? s1 : s0) += d; });
    part[j] = s0 + s1;
  }
  (V::load_aligned(x0) + simd::haddp<A>(part) / V(static_cast<float>(first.rows * first.cols))).store_aligned(m);
  for (int64_t j = 0; j < W; ++j) {
    part[j] = part2[j] = V(0.f);
    if (j >= channels) continue;
    deviation_sums<A, 2>(x + j * channel_stride, r, V(m[j]), &part[j], &part2[j]);
  }
  simd::haddp<A>(part).store_aligned(s1);
  simd::haddp<A>(part2).store_aligned(s2);
  for (int64_t j = 0; j < channels; ++j) {
    const double d1 = s1[j], d2 = s2[j];
    if (one_pass && !(d2 <= std::numeric_limits<float>::max() && 8.0 * d1 * d1 <= count * d2)) {
      out[j] = moments_two_pass<A>(x + j * channel_stride, r);  // as moments_nchw_shifted's test
    } else if (std::isfinite(d1) && std::isfinite(d2)) {
      out[j] = {m[j] + d1 * inv, std::max(0.0, d2 - d1 * d1 * inv)};  // see two_pass_moments
    } else {
      out[j] = moments_double<A>(x + j * channel_stride, r);
    }
  }
}

// NHWC rows of many channels are far apart (2 KiB and more from C = 512),
// and the hardware prefetchers, which follow streams within a 4 KiB page,
// fetch little of the 256 bytes per row that a column group reads. So the
// NHWC reductions, on each row of a column group, ask for the next group's
// part of that row (Q vectors further on) to be brought into L2: the next
// group then arrives while this one is reduced.
constexpr int64_t kPrefetchGroupsFrom = 512;  // row stride in floats

// Calls pass(std::true_type) if the group at column j0 should prefetch the
// next one, else pass(std::false_type): two loops, no test per row.
template <class A, int Q, class Pass>
inline void with_prefetch(region r, int64_t j0, Pass pass) {
  constexpr int64_t W = simd::vfloat<A>::size;
  if (r.stride >= kPrefetchGroupsFrom && j0 + 2 * Q * W <= r.cols) {
    pass(std::true_type{});
  } else {
    pass(std::false_type{});
  }
}

// The next group's part of the row whose group starts at `at`.
template <class A, int Q>
inline void prefetch_group(const float* at) {
  constexpr int64_t W = simd::vfloat<A>::size;
  for (int64_t b = 0; b < Q * W; b += 16) __builtin_prefetch(at + Q * W + b, 0, 2);
}

// Lanes whose value is neither infinite nor NaN.
template <class A>
inline xsimd::batch_bool<double, A> finite(simd::vdouble<A> v) {
  return (v - v) == simd::vdouble<A>(0.0);  // inf - inf and NaN - NaN are NaN
}

// The moments of vdouble<A>::size channels from their float sums s1 of
// d = x - c and s2 of d^2 over n values (inv = 1 / n), in double:
// {c + s1 * inv, max(0, s2 - s1^2 * inv)}, lane by lane the operations of
// finished() below (no fused multiply-add: -ffp-contract=off), so the same
// bits. Writes nothing and returns false if a lane's sums are not finite.
// The scalar loop held 2048 channels of one row (NHWC 1x2048x7x7) for 2.5
// us, a fifth of the moments on one thread (session 18).
template <class A>
inline bool finish_lanes(const float* c, const float* s1, const float* s2, double inv,
                         moments* out) {
  using D = simd::vdouble<A>;
  const D a = simd::load_widened<A>(s1), b = simd::load_widened<A>(s2), k(inv);
  if (!xsimd::all(finite<A>(a) && finite<A>(b))) return false;
  const D m2 = b - a * a * k;
  simd::store_pairs<A>(reinterpret_cast<double*>(out), simd::load_widened<A>(c) + a * k,
                       xsimd::select(D(0.0) < m2, m2, D(0.0)));
  return true;
}

// The same for one channel, in scalar code.
inline moments finished(float c, float s1, float s2, double inv) {
  return {c + s1 * inv, std::max(0.0, s2 - static_cast<double>(s1) * s1 * inv)};
}

// NHWC: the same two passes, down the columns, Q vectors of adjacent
// channels at a time with their accumulators in registers: each channel is
// one vector lane (or, in the tail, the same operations in scalar), so its
// result does not depend on which group it falls in. The region is a chunk
// of whole rows; every group prefetches the next group (above).
//
// With a shift per channel (the previous chunk's means), one pass first:
// sums of d = x - shift and d^2 give mean = shift + sum(d)/n and
// M2 = sum(d^2) - sum(d)^2/n. That is the two-pass result with the shift
// for a provisional mean, and it is as accurate when the shift is close to
// the mean: if sum(d)^2/n <= sum(d^2)/8 in every lane (the shift within
// sigma/sqrt(7) of the chunk's mean), the correction is at most a seventh
// of M2 and adds at most that fraction of the sums' own rounding error.
// Otherwise the group is done again with the two passes from its first row.
// A single pass keeps the core asking memory for data instead of
// re-reading L1 while the bus idles.
// The moments of Q vectors of channels from j0 on, from the sums d1 of
// d = x - shift and d2 of d^2 over `rows` rows, for the lanes that pass the
// test above. Returns whether all did; if not, keep[j] tells which did. Each lane
// is tested alone, so that a channel's result does not depend on its
// neighbours' data (a NaN in one channel of the group kept the others'
// one-pass results until session 17, and changed their bits).
template <class A, int Q>
bool shifted_moments(int64_t rows, int64_t j0, const float* shift, const simd::vfloat<A>* d1,
                     const simd::vfloat<A>* d2, moments* out, bool* keep) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V n(static_cast<float>(rows));
  // Finite sums (no inf or NaN in the data, no overflow) with the shift
  // within sigma/sqrt(7) of the mean; false for NaN.
  const V largest(std::numeric_limits<float>::max());
  auto passes = [&](int q) {
    return (V(8.f) * (d1[q] * d1[q]) <= n * d2[q]) && (d2[q] <= largest);
  };
  alignas(64) float s1[Q * W], s2[Q * W], pass[Q * W];
  bool all = true;
  for (int q = 0; q < Q; ++q) {
    all = all && xsimd::all(passes(q));
    d1[q].store_aligned(s1 + q * W);
    d2[q].store_aligned(s2 + q * W);
  }
  if (!all)
    for (int q = 0; q < Q; ++q)
      xsimd::select(passes(q), V(1.f), V(0.f)).store_aligned(pass + q * W);
  const double inv = 1.0 / static_cast<double>(rows);  // no division per channel (see two_pass_moments)
  if (all) {
    constexpr int64_t N = simd::vdouble<A>::size;
    for (int64_t j = 0; j < Q * W; j += N)
      // Finite: a lane passes only with d2 <= FLT_MAX and 8 d1^2 <= n d2.
      finish_lanes<A>(shift + j0 + j, s1 + j, s2 + j, inv, out + j0 + j);
    return true;
  }
  for (int64_t j = 0; j < Q * W; ++j) {
    keep[j] = pass[j] != 0.f;
    if (keep[j]) out[j0 + j] = finished(shift[j0 + j], s1[j], s2[j], inv);
  }
  return false;
}

template <class A, int Q>
bool moments_columns_shifted(const float* x, region r, int64_t j0, const float* shift, moments* out,
                             bool* keep) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  V k[Q], d1[Q], d2[Q];
  for (int q = 0; q < Q; ++q) {
    k[q] = V::load_unaligned(shift + j0 + q * W);
    d1[q] = d2[q] = V(0.f);
  }
  with_prefetch<A, Q>(r, j0, [&](auto ahead) {
    for (int64_t i = 0; i < r.rows; ++i) {
      if (ahead) prefetch_group<A, Q>(x + i * r.stride + j0);
      for (int q = 0; q < Q; ++q) {
        const V d = V::load_unaligned(x + i * r.stride + j0 + q * W) - k[q];
        d1[q] += d;
        d2[q] = madd(d, d, d2[q]);
      }
    }
  });
  return shifted_moments<A, Q>(r.rows, j0, shift, d1, d2, out, keep);
}

// The moments of the `cols` channels from j0 on, from their second pass:
// mean m, the sums s1 of d = x - m and s2 of d^2 (inf or NaN: again in double).
template <class A>
void two_pass_moments(const float* x, region r, int64_t j0, int64_t cols, const float* m,
                      const float* s1, const float* s2, moments* out, const bool* keep = nullptr) {
  // Times the inverse count, not divided by the count: two double divisions
  // a channel held bnorm_moments of 512 channels of one row at 3.1 us, 2.4
  // without (forward training 1x512x7x7 NHWC -3..-5%, session 8); the result
  // moves by at most an ulp of a double.
  const double inv = 1.0 / static_cast<double>(r.rows);
  constexpr int64_t N = simd::vdouble<A>::size;
  auto lanes = [&](int64_t k, int64_t end) {
    for (; k < end; ++k) {
      if (keep && keep[k]) continue;  // the lane's one-pass result stands
      if (std::isfinite(s1[k]) && std::isfinite(s2[k])) {
        out[j0 + k] = finished(m[k], s1[k], s2[k], inv);
      } else {
        out[j0 + k] = moments_double<A>(x + j0 + k, {r.rows, 1, r.stride});
      }
    }
  };
  int64_t k = 0;
  if (!keep)
    for (; k + N <= cols; k += N)
      if (!finish_lanes<A>(m + k, s1 + k, s2 + k, inv, out + j0 + k)) lanes(k, k + N);
  lanes(k, cols);
}

// The two passes over Q vectors of channels from j0 on; with a shift, one
// pass first, and the two passes only for the lanes that fail its test.
// keep (if not null): the lanes whose result is already in out.
template <class A, int Q>
void moments_columns(const float* x, region r, int64_t j0, const float* shift, moments* out,
                     const bool* keep = nullptr) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  bool kept[Q * W];
  if (shift) {
    if (moments_columns_shifted<A, Q>(x, r, j0, shift, out, kept)) return;
    keep = kept;
  }
  const V n(static_cast<float>(r.rows));
  V x0[Q], s[Q], m[Q], d1[Q], d2[Q];
  for (int q = 0; q < Q; ++q) {
    x0[q] = V::load_unaligned(x + j0 + q * W);
    s[q] = d1[q] = d2[q] = V(0.f);
  }
  with_prefetch<A, Q>(r, j0, [&](auto ahead) {
    for (int64_t i = 0; i < r.rows; ++i) {
      if (ahead) prefetch_group<A, Q>(x + i * r.stride + j0);
      for (int q = 0; q < Q; ++q) s[q] += V::load_unaligned(x + i * r.stride + j0 + q * W) - x0[q];
    }
  });
  for (int q = 0; q < Q; ++q) m[q] = x0[q] + s[q] / n;
  for (int64_t i = 0; i < r.rows; ++i)
    for (int q = 0; q < Q; ++q) {
      const V d = V::load_unaligned(x + i * r.stride + j0 + q * W) - m[q];
      d1[q] += d;
      d2[q] = madd(d, d, d2[q]);
    }
  alignas(64) float mv[Q * W], s1[Q * W], s2[Q * W];
  for (int q = 0; q < Q; ++q) {
    m[q].store_aligned(mv + q * W);
    d1[q].store_aligned(s1 + q * W);
    d2[q].store_aligned(s2 + q * W);
  }
  two_pass_moments<A>(x, r, j0, Q * W, mv, s1, s2, out, keep);
}

// NHWC rows of kStreamRowsVectors vectors or more (two column groups or
// more) are reduced in memory order instead: a block of up to kWideBlock
// channels, a whole row for every ResNet shape, keeps its accumulators in
// L1 (on the stack) and takes the rows four at a time, so memory sees whole
// rows, as in a copy. A column group's 256 bytes per row 8 KiB apart
// (C = 2048) ran at a third of a read's speed even from L3, and from the L3
// the column groups of C = 64 on AVX2 (each row's 256 bytes in two walks of
// 128 bytes) took half as long again as the NCHW moments of the same bytes.
// Each channel gets the same operations in the same order as in a column
// group, so the results are bitwise the same. In rows (Zen 3, session 23):
// one thread, bnorm_moments 8x64x56x56 183 -> 149 us, 8x128x28x28 107 ->
// 83, 8x256x14x14 59 -> 43; forward training on two threads (bnorm_ab, both
// orders) 8x64x56x56 -12%, 1x64x56x56 -8%, 1x128x28x28 -16%, 8x256x14x14
// -8..-11%, 4096x256 -5..-8%, 32x128x28x28 even; beyond the cache
// 32x64x56x56 -9..-12%, 32x64x112x112 -11%. C = 32, one column group,
// measured +2..+10%. With SSE2 (W = 4) beyond the cache, C = 64 and 96 in
// rows instead of column groups: moments -37..-45%, forward training
// -23..-32% (session 24).
//
// Until session 24 the blocks were of kStreamBlock channels, so that wider
// rows (C = 1024, 2048) went through a chunk's rows once a block, a
// 2 KiB piece of every 4-8 KiB row each time. Whole rows, four at a time
// (each row its own run of pages, four runs that the prefetchers follow),
// bnorm_ab both orders: moments 8x1024x14x14 -17%, 32x2048x7x7 -9..-16%,
// 4096x1024 -17..-19%, 128x1024x14x14 -12..-19%, 128x2048x7x7 -22..-24%,
// 65536x1024 -10..-13%; forward training 128x2048x7x7 -13..-17%,
// 128x1024x14x14 -7..-10%, 4096x1024 -6..-10%, 8x1024x14x14 -4..-8%. Rows
// wider than kWideBlock keep blocks of kStreamBlock: in blocks of 2048 their
// few rows in cache took longer (forward training 8x65536 +4..+5%,
// 128x4096 +2..+4%; the sums and centres of 2048 channels fill most of L1).
constexpr int64_t kStreamRowsVectors = 8;
constexpr int64_t kStreamBlock = 512;
constexpr int64_t kWideBlock = 2048;
// Rows of kOneRowFrom to kStreamBlock channels go one row at a time in
// memory order, with the sums in L1: in the moments for tensors beyond the
// cache (moments_nhwc's `far`), always in the backward sums
// (backward_reduce_rows). A bare loop on this Zen 3 read such rows one at a
// time at 88-97% of a plain sum's rate, two or four at a time at 60-75%
// (the four rows share pages and are read out of order within them); wider
// rows, each its own pages, read fastest four at a time. From 128 channels
// (512-byte rows) since session 24: beyond the cache C = 128 had taken the
// column groups (four rows at a time measured +12..+14% there, session 23);
// one row at a time, moments 32x128x56x56 -8..-18%, 128x128x28x28 -10..-16%,
// forward training -3..-10%. C = 64 one row at a time: +0..+23%.
constexpr int64_t kOneRowFrom = 128;

// Whole rows of 8 vectors when there are 32 vector registers (AVX-512: C =
// 128) go as one column group instead, in memory order, its sums in
// registers: the moments (moments_nhwc) and the backward sums
// (backward_reduce_nhwc). On Zen 5 (session 29, bnorm_ab both orders twice)
// the moments in one group against rows four at a time in cache and against
// one row at a time, or two chunks in step (moments_nhwc_pair), beyond it:
// bnorm_moments 1x128x28x28 -13..-16%, 128x128x28x28 -27..-30%; forward
// training 1x128x28x28 -5..-8%, 32x128x28x28 -3..-14%, 128x128x28x28
// -14..-17%, 32x128x56x56 -14..-16%, 65536x128 -14..-19%. Groups of 8
// vectors as parts of wider rows (C = 256, 512) measured even or slower.
template <class A>
bool one_group_rows(region r) {
  return simd::vfloat<A>::size == 16 && r.cols == 8 * 16 && r.stride == r.cols;
}

// The backward sums of rows in memory order (backward_reduce_rows) keep
// per-channel sums in L1 while the rows stream past, and store them on
// every row. A load whose address shares its low 12 bits with an older
// store still in flight waits for that store ("4K aliasing"), so where the
// sums lie relative to the rows matters. Beyond the cache, with the sums
// wherever the stack had put them, the NHWC backward sums of 32x512x28x28
// took 1.4 times as long as a bare loop of the same operations with its
// sums elsewhere (session 13); there the sum of column j now sits at the
// offset within a 4 KiB page of the rows' column j (rounded down to a line):
// a load meets only the sum of its own column, stored a row or more
// before, and the arrays of n floats follow each other, so that rows of 2
// KiB (C = 512) meet the second as the first. In cache that placement, and
// the others tried, took 3-14% more time than arrays on the stack, which
// stay there.
template <int Arrays>
class row_sums {
 public:
  // column: the rows' first column; n <= kWideBlock floats per array.
  row_sums(const float* column, int64_t n)
      : base_(buf_ + reinterpret_cast<uintptr_t>(column) % 4096 / 64 * 16), n_(n) {}
  row_sums(const row_sums&) = delete;  // base_ points into buf_
  float* operator[](int k) { return base_ + k * n_; }

 private:
  alignas(4096) float buf_[1024 + Arrays * kWideBlock];
  float* base_;
  int64_t n_;
};

// Calls add(i, j, u) for the vectors at columns j (a multiple of W in
// [c0, c1)) of rows i..i+u-1, u <= U, in row order for every j.
template <class A, int U = 4, class Add>
inline void stream_rows(region r, int64_t c0, int64_t c1, Add add) {
  constexpr int64_t W = simd::vfloat<A>::size;
  int64_t i = 0;
  for (; i + U <= r.rows; i += U)
    for (int64_t j = c0; j < c1; j += W) add(i, j, std::integral_constant<int, U>{});
  for (; i < r.rows; ++i)
    for (int64_t j = c0; j < c1; j += W) add(i, j, std::integral_constant<int, 1>{});
}

// The sums s1 of d = x - center and s2 of d^2 for the channels [c0, c1), rows
// in memory order; center, s1 and s2 are indexed from c0.
template <class A, int U = 4>
void deviation_rows(const float* x, region r, int64_t c0, int64_t c1, const float* center,
                    float* s1, float* s2) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  for (int64_t j = 0; j < c1 - c0; j += W) {
    V(0.f).store_aligned(s1 + j);
    V(0.f).store_aligned(s2 + j);
  }
  stream_rows<A, U>(r, c0, c1, [&](int64_t i, int64_t j, auto rows) {
    const V k = V::load_unaligned(center + (j - c0));
    V d1 = V::load_aligned(s1 + (j - c0)), d2 = V::load_aligned(s2 + (j - c0));
    for (int u = 0; u < decltype(rows)::value; ++u) {
      const V d = V::load_unaligned(x + (i + u) * r.stride + j) - k;
      d1 += d;
      d2 = madd(d, d, d2);
    }
    d1.store_aligned(s1 + (j - c0));
    d2.store_aligned(s2 + (j - c0));
  });
}

// The moments of the groups of 4 W channels in [c0, c1) from their sums s1,
// s2 (indexed from c0) of deviations from `shift`; a group whose shift is
// too far off gets the two passes.
template <class A>
void shifted_groups(const float* x, region r, int64_t c0, int64_t c1, const float* shift,
                    const float* s1, const float* s2, moments* out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  for (int64_t j0 = c0; j0 < c1; j0 += 4 * W) {
    V d1[4], d2[4];
    for (int q = 0; q < 4; ++q) {
      d1[q] = V::load_aligned(s1 + (j0 - c0) + q * W);
      d2[q] = V::load_aligned(s2 + (j0 - c0) + q * W);
    }
    bool keep[4 * W];
    if (!shifted_moments<A, 4>(r.rows, j0, shift, d1, d2, out, keep))
      moments_columns<A, 4>(x, r, j0, nullptr, out, keep);
  }
}

// moments_columns_shifted for the groups of 4 W channels in [c0, c1), c1 - c0
// <= kWideBlock, rows in memory order; a group whose shift is too far off
// gets the two passes.
template <class A, int U = 4>
void moments_rows_shifted(const float* x, region r, int64_t c0, int64_t c1, const float* shift,
                          moments* out) {
  alignas(64) float s1[kWideBlock], s2[kWideBlock];
  deviation_rows<A, U>(x, r, c0, c1, shift + c0, s1, s2);
  shifted_groups<A>(x, r, c0, c1, shift, s1, s2, out);
}

// The first pass of the two for the channels [c0, c1), c1 - c0 <=
// kWideBlock a multiple of W, rows in memory order: m[j - c0] = x0 + s / n,
// x0 the first row's value and s the sum of x - x0 over the n rows, a lane
// per channel in row order; s: kWideBlock floats of scratch.
template <class A, int U = 4>
void row_means(const float* x, region r, int64_t c0, int64_t c1, float* s, float* m) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V n(static_cast<float>(r.rows));
  for (int64_t j = 0; j < c1 - c0; j += W) V(0.f).store_aligned(s + j);
  stream_rows<A, U>(r, c0, c1, [&](int64_t i, int64_t j, auto rows) {
    const V x0 = V::load_unaligned(x + j);
    V t = V::load_aligned(s + (j - c0));
    for (int u = 0; u < decltype(rows)::value; ++u)
      t += V::load_unaligned(x + (i + u) * r.stride + j) - x0;
    t.store_aligned(s + (j - c0));
  });
  for (int64_t j = 0; j < c1 - c0; j += W)
    (V::load_unaligned(x + c0 + j) + V::load_aligned(s + j) / n).store_unaligned(m + j);
}

// moments_columns (two passes) for the channels [c0, c1), c1 - c0 <= kWideBlock a
// multiple of W, rows in memory order.
template <class A, int U = 4>
void moments_rows(const float* x, region r, int64_t c0, int64_t c1, moments* out) {
  alignas(64) float m[kWideBlock], s1[kWideBlock], s2[kWideBlock];
  row_means<A, U>(x, r, c0, c1, s1, m);
  deviation_rows<A, U>(x, r, c0, c1, m, s1, s2);
  two_pass_moments<A>(x, r, c0, c1 - c0, m, s1, s2, out);
}

// row_means of column j alone, in scalar: the same operations as its lane.
inline float lane_mean(const float* x, region r, int64_t j) {
  float s = 0.f;
  for (int64_t i = 0; i < r.rows; ++i) s += x[i * r.stride + j] - x[j];
  return x[j] + s / static_cast<float>(r.rows);
}

// kernel_table::nhwc_means: row_means for every channel of r, the tail
// channels (C % W) by lane_mean.
template <class A>
void nhwc_means(const float* x, region r, float* mean) {
  constexpr int64_t W = simd::vfloat<A>::size;
  const int64_t end = r.cols / W * W;
  alignas(64) float s[kWideBlock];
  for (int64_t c0 = 0; c0 < end; c0 += kWideBlock)
    row_means<A>(x, r, c0, std::min(end, c0 + kWideBlock), s, mean + c0);
  for (int64_t j = end; j < r.cols; ++j) mean[j] = lane_mean(x, r, j);
}

// kernel_table::plane_deviations: deviation_rows, four rows at a time.
template <class A>
void plane_deviations(const float* x, region r, const float* center, float* s1, float* s2) {
  deviation_rows<A, 4>(x, r, 0, r.cols, center, s1, s2);
}

template <class A>
void moments_nhwc(const float* x, region r, const float* shift, bool far, moments* out) {
  constexpr int64_t W = simd::vfloat<A>::size;
  if (one_group_rows<A>(r)) {
    if constexpr (W == 16) moments_columns<A, 8>(x, r, 0, shift, out);
    return;
  }
  int64_t j = 0;
  // Rows of kOneRowFrom to kStreamBlock channels of tensors larger than the
  // cache: one row after the other, as the backward sums do
  // (backward_reduce_rows): forward training 32x256x56x56 -11%, 8x256x56x56
  // -7..-10%, 65536x256 -6..-19%; in cache (32x256x14x14) +19%, hence `far`.
  // C = 512 beyond the cache took 14-24% less time than four rows at a
  // time (the moments of 32x512x28x28 2.4 -> 1.8 ms; forward training
  // 128x512x28x28 -8%, session 9); wider rows one at a time measured slower
  // (1024: +60%, in blocks of 512 channels).
  auto in_rows = [&](auto rows_per_step) {
    constexpr int U = decltype(rows_per_step)::value;
    const int64_t end = r.cols / (4 * W) * (4 * W);
    // Whole rows up to kWideBlock channels; wider rows in blocks of
    // kStreamBlock, whose sums stay in L1 (see kWideBlock).
    const int64_t block = r.stride <= kWideBlock ? kWideBlock : kStreamBlock;
    for (; j < end; j += block) {
      const int64_t c1 = std::min(end, j + block);
      if (shift)
        moments_rows_shifted<A, U>(x, r, j, c1, shift, out);
      else
        moments_rows<A, U>(x, r, j, c1, out);
    }
    j = end;
  };
  if (far && r.stride >= kOneRowFrom && r.stride <= kStreamBlock)
    in_rows(std::integral_constant<int, 1>{});
  else if (r.stride >= kStreamRowsVectors * W)
    in_rows(std::integral_constant<int, 4>{});
  for (; j + 4 * W <= r.cols; j += 4 * W) moments_columns<A, 4>(x, r, j, shift, out);
  for (; j + W <= r.cols; j += W) moments_columns<A, 1>(x, r, j, shift, out);
  // Tail channels: the same operations as one vector lane, in scalar.
  for (; j < r.cols; ++j) {
    const float m = lane_mean(x, r, j);
    float d1 = 0.f, d2 = 0.f;
    for (int64_t i = 0; i < r.rows; ++i) {
      const float d = x[i * r.stride + j] - m;
      d1 += d;
      d2 = madd1<A>(d, d, d2);
    }
    const double count = static_cast<double>(r.rows);
    if (std::isfinite(d1) && std::isfinite(d2)) {
      out[j] = {m + d1 / count, std::max(0.0, d2 - static_cast<double>(d1) * d1 / count)};
    } else {
      out[j] = moments_double<A>(x + j, {r.rows, 1, r.stride});
    }
  }
}

// kernel_table::moments_nhwc_pair: the chunks a and b, each reduced as
// moments_nhwc reduces it alone: the same operations in the same order, so
// the same bits. Beyond the cache, whole rows of kStreamRowsVectors vectors
// to kStreamBlock channels (not one_group_rows), both chunks around a shift: one row of a, then
// one of b, so that a thread reads two streams of memory, which this Zen
// 3's prefetchers serve faster than one (a bare loop of these sums on two
// threads, C = 128-512: 24-25 GB/s in one stream, 27-30 in two, 24-27 in
// four). bnorm_ab both orders (session 24), against one chunk at a time:
// moments 128x128x28x28 -16..-24%, 32x512x28x28 -7..-15%, 32x256x56x56
// -11..-14%, 8x256x56x56 -17..-19%, 65536x256 -14..-21%; C = 64, whose
// chunks alone take four rows at a time, 32x64x56x56 -23..-25%,
// 128x64x56x56 -29..-30%, 32x64x112x112 -16..-23%. Forward training
// -4..-15% on these (C = 64: -9..-17%).
template <class A>
void moments_nhwc_pair(const float* xa, region ra, const float* shift_a, moments* out_a,
                       const float* xb, region rb, const float* shift_b, moments* out_b, bool far) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const int64_t c = ra.cols;
  if (!far || !shift_a || !shift_b || c < kStreamRowsVectors * W || c > kStreamBlock ||
      c % (4 * W) != 0 || ra.stride != c || rb.stride != c || rb.cols != c ||
      one_group_rows<A>(ra)) {
    moments_nhwc<A>(xa, ra, shift_a, far, out_a);
    moments_nhwc<A>(xb, rb, shift_b, far, out_b);
    return;
  }
  alignas(64) float sa1[kStreamBlock], sa2[kStreamBlock], sb1[kStreamBlock], sb2[kStreamBlock];
  for (int64_t j = 0; j < c; j += W) {
    for (float* a : {sa1, sa2, sb1, sb2}) V(0.f).store_aligned(a + j);
  }
  // deviation_rows<A, 1> on one row (calling its loop on one-row regions
  // took 6% more instructions: callgrind, NHWC moments 4x512x28x28)
  auto row = [&](const float* x, const float* shift, float* s1, float* s2) {
    for (int64_t j = 0; j < c; j += W) {
      const V d = V::load_unaligned(x + j) - V::load_unaligned(shift + j);
      (V::load_aligned(s1 + j) + d).store_aligned(s1 + j);
      madd(d, d, V::load_aligned(s2 + j)).store_aligned(s2 + j);
    }
  };
  const int64_t both = std::min(ra.rows, rb.rows);
  for (int64_t i = 0; i < both; ++i) {
    row(xa + i * c, shift_a, sa1, sa2);
    row(xb + i * c, shift_b, sb1, sb2);
  }
  for (int64_t i = both; i < ra.rows; ++i) row(xa + i * c, shift_a, sa1, sa2);
  for (int64_t i = both; i < rb.rows; ++i) row(xb + i * c, shift_b, sb1, sb2);
  shifted_groups<A>(xa, ra, 0, c, shift_a, sa1, sa2, out_a);
  shifted_groups<A>(xb, rb, 0, c, shift_b, sb1, sb2, out_b);
}

// ---------------------------------------------------------------------------
// Normalize: y = (x - mean) * scale + shift. Subtracting first (rather than
// x * scale + (shift - mean * scale)) keeps y exact where x == mean, so a
// constant channel gives exactly `shift`, and costs nothing in a loop that
// waits for memory. ReLU keeps NaN (zero where y <= 0, false for NaN).

template <class A>
inline simd::vfloat<A> relu_vec(simd::vfloat<A> y) {
  using V = simd::vfloat<A>;
  return simd::zero_where<A>(y <= V(0.f), y);
}
inline float relu1(float y) { return y <= 0.f ? 0.f : y; }

// Elements before y + j is vector-aligned.
template <class A>
int64_t head_to_align(const float* y, int64_t cols) {
  constexpr uintptr_t bytes = sizeof(simd::vfloat<A>);
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(y) % bytes;
  const int64_t head = misalign ? static_cast<int64_t>((bytes - misalign) / sizeof(float)) : 0;
  return std::min(head, cols);
}

// The head of a walk (walk_vectors, walk_rows): to the output's next vector
// boundary when streaming (streaming stores must be aligned), without a
// mask, or when that keeps the mask in whole bytes per vector; else, in
// cache, to the next whole mask byte (the stores then cross vector
// boundaries, which in cache costs less than the mask bit by bit). Vectors
// of fewer than 8 lanes (SSE2) never hold whole mask bytes: vector head.
template <class A>
int64_t walk_head(const float* out, int64_t count, int64_t mask_index, bool mask, bool stream) {
  const int64_t head = head_to_align<A>(out, count);
  if (stream || !mask || (mask_index + head) % 8 == 0 || simd::vfloat<A>::size % 8 != 0)
    return head;
  return std::min((8 - mask_index % 8) % 8, count);
}

// The mask bits of whole vectors go straight to their bytes when every
// vector starts on a byte (no chain from vector to vector through the
// bit_writer: with it, 256x1024 took 1.5x as long with ReLU as without);
// the head, the tail and other runs go through a bit_writer.
template <class A>
bool whole_mask_bytes(int64_t mask_index, int64_t head) {
  return simd::vfloat<A>::size % 8 == 0 && (mask_index + head) % 8 == 0;
}

// How a walk treats ReLU: none; clamp without a mask (inference); the mask
// bit by bit (bit_writer, load_bits); whole vectors' bits straight to or
// from their bytes.
enum class relu_mode { none, clamp, bits, bytes };

template <class A>
relu_mode relu_mode_for(bool relu, const uint8_t* mask, int64_t mask_index, int64_t head) {
  if (!relu) return relu_mode::none;
  if (!mask) return relu_mode::clamp;
  return whole_mask_bytes<A>(mask_index, head) ? relu_mode::bytes : relu_mode::bits;
}

// Writes the mask bits of a walk's steps, in order, in the walk's mode.
template <class A, relu_mode Mode>
class mask_writer {
 public:
  mask_writer(uint8_t* mask, int64_t index)
      : mask_(mask), index_(index), bits_(Mode == relu_mode::bits ? mask : nullptr, index) {}

  // The bits of the walk's values [j, j + n).
  void put(int64_t j, int64_t n, uint32_t positive) {
    if constexpr (Mode == relu_mode::bits) {
      bits_.push(positive, static_cast<unsigned>(n));
    } else if constexpr (Mode == relu_mode::bytes) {
      if (n == simd::vfloat<A>::size)  // little-endian: element j in bit 0
        std::memcpy(mask_ + ((index_ + j) >> 3), &positive, simd::vfloat<A>::size / 8);
      else
        put_part(mask_, index_ + j, n, positive);
    }
  }
  // The bits of four whole vectors from j (bytes mode, W = 8: simd::to_bits4).
  void put4(int64_t j, simd::quad_bits<A> positive) {
    static_assert(Mode == relu_mode::bytes && sizeof positive == simd::vfloat<A>::size / 2,
                  "the bits of four vectors");
    std::memcpy(mask_ + ((index_ + j) >> 3), &positive, sizeof positive);
  }
  void finish() { bits_.finish(); }

 private:
  // The head or the tail, out of line: inlined, it kept the walk's step
  // out of line (a call per vector).
  __attribute__((noinline)) static void put_part(uint8_t* mask, int64_t index, int64_t n,
                                                 uint32_t positive) {
    bit_writer part(mask, index);
    part.push(positive, static_cast<unsigned>(n));
    part.finish();
  }

  uint8_t* mask_;
  int64_t index_;
  bit_writer bits_;
};

// g in the lanes whose mask bits (elements [index, index + n)) are set, 0
// in the others; the bits read as a walk of mode Mode reads them (in bytes
// mode a whole vector's index is a multiple of 8: walk_head).
template <class A, relu_mode Mode = relu_mode::bits>
inline simd::vfloat<A> masked(simd::vfloat<A> g, const uint8_t* mask, int64_t index, int64_t n) {
  using V = simd::vfloat<A>;
  uint32_t bits = 0;
  constexpr int W = static_cast<int>(V::size);
  if constexpr (W % 8 != 0) {  // SSE2: never bytes mode (whole_mask_bytes)
    bits = load_bits(mask, index, static_cast<int>(n));
  } else if constexpr (W == 8 && Mode == relu_mode::bytes) {
    if (n == W) {
      opaque(g);
      return simd::keep_where<A>(simd::lanes_of_byte<A>(mask + (index >> 3)), g);
    }
    bits = load_bits(mask, index, static_cast<int>(n));
  } else {
    if (n != W)
      bits = load_bits(mask, index, static_cast<int>(n));
    else if (Mode == relu_mode::bytes)
      std::memcpy(&bits, mask + (index >> 3), W / 8);
    else
      bits = simd::load_vector_bits<W>(mask, index);
  }
  // g whole in a register first: else GCC folds its load and the select
  // into a masked load (vmovups with {k}{z}), and on Zen 5 a stream of
  // masked loads from memory runs at half the rate of plain ones (NHWC
  // backward sums with ReLU, 128x64x56x56: 9.7 ms against 5.7, session 16).
  opaque(g);
  return simd::keep_where<A>(from_bits<A>(bits), g);
}

// The ReLU bits of a row's whole vectors on AVX2 (W = 8), for rows whose
// vectors all start at the same bit of a byte (the vector at the row's
// value k, a multiple of 8, has its bits in the row's bytes k / 8 and
// k / 8 + 1, under one shifted lane pattern for the row): one 16-bit load
// and an integer compare per vector, where masked() assembles each
// vector's bits byte by byte and shifts them into place (NCHW backward
// with ReLU of 8x2048x7x7, 49-value rows on arbitrary bits: the sums' loop
// took 38 instructions a vector against 15 without ReLU). The load reads
// the byte after the vector's bits, which a later row's bits follow: not
// for a region's last row. A row's tail (n < 8 values from k) reads the
// same way; its other lanes' bits belong to other values.
template <class A>
class row_bits {
  using vint = xsimd::batch<int32_t, A>;

 public:
  static_assert(simd::vfloat<A>::size == 8, "AVX2");
  row_bits(const uint8_t* bits, int64_t index)
      : p_(bits + (index >> 3)), lanes_(vint::load_aligned(simd::kLaneBit) << (index & 7)) {}

  // g where the bits of the row's values [k, k + 8) are set, 0 elsewhere.
  simd::vfloat<A> keep(simd::vfloat<A> g, int64_t k) const {
    uint16_t word;
    std::memcpy(&word, p_ + k / 8, sizeof word);
    return simd::keep_where<A>(simd::lanes_with_bits<A>(word, lanes_), g);
  }

 private:
  const uint8_t* p_;
  vint lanes_;
};

// The ReLU mode of a reduction over the rows of r, whole vectors from
// column j0 on (j0 + a multiple of W): bytes when every vector's bits start
// a mask byte (rows of a multiple of 8 values from a byte boundary), else
// bits. In bytes mode a vector's bits are one load, where bits mode
// assembles them byte by byte and shifts them into place (NHWC backward
// sums with ReLU of 8x2048x7x7 on AVX2: 13.2M -> 7.8M instructions,
// callgrind; bnorm_ab backward with ReLU 32x512x7x7 -14%, 1x256x14x14 -8%,
// 8x2048x7x7 -7%).
template <class A>
relu_mode rows_relu_mode(relu_bits_in relu_in, region r, int64_t j0) {
  if (!relu_in.bits) return relu_mode::none;
  const bool bytes = simd::vfloat<A>::size % 8 == 0 && (relu_in.index + j0) % 8 == 0 &&
                     (r.rows == 1 || r.stride % 8 == 0);
  return bytes ? relu_mode::bytes : relu_mode::bits;
}

// Calls f(mode) with mode (none, bits or bytes) as a compile-time constant.
template <class F>
void with_relu_mode(relu_mode mode, F f) {
  if (mode == relu_mode::bytes)
    f(std::integral_constant<relu_mode, relu_mode::bytes>{});
  else if (mode == relu_mode::bits)
    f(std::integral_constant<relu_mode, relu_mode::bits>{});
  else
    f(std::integral_constant<relu_mode, relu_mode::none>{});
}

// Calls f(mode, stream) with both as compile-time constants
// (std::integral_constant), so that a kernel is compiled once per pair and
// its loop tests neither.
template <class F>
void with_modes(relu_mode mode, bool stream, F f) {
  auto with_stream = [&](auto m) {
    if (stream)
      f(m, std::true_type{});
    else
      f(m, std::false_type{});
  };
  if (mode == relu_mode::clamp)
    with_stream(std::integral_constant<relu_mode, relu_mode::clamp>{});
  else
    with_relu_mode(mode, with_stream);
}

// NCHW elementwise kernels walk a flat_run in memory order, a vector at a
// time. Most vectors lie within one row and take one channel's coefficients
// as broadcasts; a vector that crosses into the next row(s) takes, lane by
// lane, the coefficients of the channel each lane belongs to. Every element
// gets the same operations whichever lane it is in, so results do not
// depend on where a run starts.
template <class A, int K>
class channel_walker {
  using V = simd::vfloat<A>;

 public:
  // coef[k][c]: coefficient k of channel c.
  channel_walker(const float* const* coef, flat_run f)
      : coef_(coef), col_(f.col), channel_(f.row % f.channels), spatial_(f.spatial),
        channels_(f.channels) {
    load();
  }

  // How many values, from the current one, belong to the current channel.
  int64_t left() const { return spatial_ - col_; }
  int64_t spatial() const { return spatial_; }

  // The current channel's coefficients, and a move past m <= left() values.
  void current(V* out) const {
    for (int k = 0; k < K; ++k) out[k] = current_[k];
  }
  void skip(int64_t m) {
    col_ += m;
    if (col_ == spatial_) {
      col_ = 0;
      channel_ = channel_ + 1 == channels_ ? 0 : channel_ + 1;
      load();
    }
  }

  // The coefficients of a full vector that runs from the current channel
  // into the next (0 < left() < W <= spatial()), and a move past it: the
  // next() of one crossing, which keeps the next channel's broadcasts.
  void cross(V* out) {
    const int64_t lane = left();
    const auto later = iota() >= V(static_cast<float>(lane));
    col_ = V::size - lane;
    channel_ = channel_ + 1 == channels_ ? 0 : channel_ + 1;
    for (int k = 0; k < K; ++k) {
      const V next(coef_[k][channel_]);
      out[k] = xsimd::select(later, next, current_[k]);
      current_[k] = next;
    }
  }

  // The coefficients of the next n <= W lanes; then moves past them.
  void next(int64_t n, V* out) {
    for (int k = 0; k < K; ++k) out[k] = current_[k];
    int64_t c = channel_;
    for (int64_t lane = spatial_ - col_; lane < n; lane += spatial_) {
      c = c + 1 == channels_ ? 0 : c + 1;
      const auto later = iota() >= V(static_cast<float>(lane));
      for (int k = 0; k < K; ++k) out[k] = xsimd::select(later, V(coef_[k][c]), out[k]);
    }
    col_ += n;
    if (col_ >= spatial_) {
      do {  // once when rows are at least a vector long
        col_ -= spatial_;
        channel_ = channel_ + 1 == channels_ ? 0 : channel_ + 1;
      } while (col_ >= spatial_);
      load();
    }
  }

 private:
  static V iota() { return simd::lane_index<A>(); }
  void load() {
    for (int k = 0; k < K; ++k) current_[k] = V(coef_[k][channel_]);
  }

  const float* const* coef_;
  int64_t col_, channel_, spatial_, channels_;
  V current_[K];
};

// Calls step(j, n, k) for the run's values [j, j + n), n <= W, in order, k
// holding each lane's coefficients (or, given a quad, quad(j, k) for four
// full vectors of one channel from j, where a channel has them): a first step of `head` < W values
// (if any; walk_head: so that the full vectors' stores are aligned, streaming stores must be, or
// their mask bits in whole bytes), full vectors, and a shorter last one. Vectors within one channel
// take its coefficients from a tight loop; a vector that crosses into the next channel takes
// cross() on rows of at least W values (it crosses once), next() on shorter rows. (With next() for
// every crossing vector, whose loops kept the coefficients on the stack, bnorm_ab on Zen 3, both
// orders: NCHW inference 8x512x7x7 -29..-35%, 32x2048x7x7 -24%, 1x2048x7x7 -31%, 8x256x14x14 -11%;
// backward 8x512x7x7 -20%, 32x2048x7x7 -15%, 128x512x7x7 with ReLU -16%; training with ReLU
// 8x512x7x7 -11%. Rows of W to 4 W values took next() for every vector until session 20: inference
// 32x512x5x5 -34%, 32x512x4x4 -24%, 32x256x3x3 -41%, backward -1..-22%;
// the path of 7x7 on AVX-512 where walk_channels is not taken, not measured
// there.) Inlined into its caller, and the step into it (always_inline on
// the callers' lambdas: GCC 12 otherwise called some steps once per
// vector), so that the walker and the step's state stay in registers.
template <class A, int K, class Step, class Quad = std::nullptr_t>
__attribute__((always_inline)) inline void walk_vectors(channel_walker<A, K>& walk, int64_t count,
                                                        int64_t head, Step step,
                                                        Quad quad = nullptr) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  V k[K];
  int64_t j = head;
  if (j > 0) {
    walk.next(j, k);
    step(0, j, k);
  }
  if (walk.spatial() < W) {  // shorter rows than a vector: it may cross several
    for (; j + W <= count; j += W) {
      V lane_k[K];  // not k: GCC then kept k in memory (7x7 backward 15% slower)
      walk.next(W, lane_k);
      step(j, W, lane_k);
    }
  }
  while (j + W <= count) {
    const int64_t same = std::min(walk.left(), count - j) / W * W;
    if (same > 0) {
      walk.current(k);
      const int64_t end = j + same;
      if constexpr (!std::is_null_pointer_v<Quad>)
        for (; j + 4 * W <= end; j += 4 * W) quad(j, k);
      for (; j < end; j += W) step(j, W, k);
      walk.skip(same);
    } else {  // rows here are at least W long: one crossing
      walk.cross(k);
      step(j, W, k);
      j += W;
    }
  }
  if (j < count) {
    walk.next(count - j, k);
    step(j, count - j, k);
  }
}

// In cache, rows of at least W values that are not whole vectors (7x7,
// 14x14): channel by channel, so that every vector takes one channel's
// coefficients as broadcasts, no lane-by-lane blend. A run's part in one
// channel goes in full vectors, the last of which ends where the part ends
// and may overlap the one before: it computes the overlapped values again,
// the same bits, so the output must not alias an input; a part shorter
// than W (a run's first or last) goes in one masked vector. Stores are
// unaligned; no ReLU mask is written (its bits go in order) nor read (at
// any bit, it costs more than the blends save) this way. Calls step(j, n,
// k) as walk_vectors does. Against walk_vectors (bnorm_ab, Zen 3, session
// 20): NCHW inference 8x512x7x7 -22%, 8x256x14x14 -25%, 1x2048x7x7 -20%
// (the same with ReLU), training 8x512x7x7 -17%, 8x256x14x14 -16%,
// backward -6..-13%; the normalize's instructions -38% (8x512x7x7). It
// keeps its own channel and column rather than a channel_walker's: through
// the walker (current(), skip()) the normalize took 11% more instructions
// and inference 3-5% longer (8x512x7x7, 1x2048x7x7).
template <class A, int K, class Step>
__attribute__((always_inline)) inline void walk_channels(const float* const* coef, flat_run f,
                                                         Step step) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  int64_t channel = f.row % f.channels, col = f.col;
  for (int64_t j = 0; j < f.count;) {
    const int64_t end = j + std::min(f.spatial - col, f.count - j);
    V k[K];
    for (int i = 0; i < K; ++i) k[i] = V(coef[i][channel]);
    if (end - j < W) {
      step(j, end - j, k);
    } else {
      for (; j + W < end; j += W) step(j, W, k);
      step(end - W, W, k);
    }
    j = end;
    col = 0;
    channel = channel + 1 == f.channels ? 0 : channel + 1;
  }
}

// Whether an elementwise NCHW run in cache (no streaming stores) takes
// walk_channels.
template <class A>
bool by_channel(int64_t spatial, bool aliased) {
  constexpr int64_t W = simd::vfloat<A>::size;
  return !aliased && spatial >= W && spatial % W != 0;
}

template <class A>
inline simd::vfloat<A> load_n(const float* p, int64_t n) {
  return n == simd::vfloat<A>::size ? simd::vfloat<A>::load_unaligned(p)
                                    : simd::load_first<A>(p, n);
}

template <class A>
inline void store_n(float* p, simd::vfloat<A> v, int64_t n, bool stream) {
  if (n == simd::vfloat<A>::size)
    simd::store<A>(p, v, stream);
  else
    simd::store_first<A>(p, v, n);
}

// Whether a walk that writes the ReLU mask in mode Relu stores the bits of
// four vectors at once (simd::to_bits4, in bytes mode): AVX2 (one 4-byte
// store) and, since session 30, AVX-512 (one 8-byte store instead of a
// 2-byte store a vector). On the Intel Xeon machine (bnorm_ab both orders
// twice) forward training with ReLU, NHWC: 1x256x14x14 -27..-31%,
// 8x256x14x14 -26..-32%, 1x512x7x7 -22..-25%; NCHW 8x256x14x14 -17..-20%;
// tensors beyond the cache even (32x256x56x56, 4096x256), and without ReLU
// even. Reading the mask four vectors at once (mask_quads) stays AVX2's.
template <class A, relu_mode Relu>
constexpr bool mask_quads_out = (Relu == relu_mode::bytes) &&
                                (simd::is_avx<A> || simd::is_avx512<A>);

// Whether a walk that reads the ReLU mask in bytes mode takes the lanes of
// four vectors from one load (simd::quad_lanes: AVX2).
template <class A, relu_mode Relu>
constexpr bool mask_quads = (Relu == relu_mode::bytes) && simd::is_avx<A>;

// The output vectors of values [j, j + 4 W), value(u) the one from j + u W,
// and their ReLU mask bits in one store (mask_quads_out).
template <class A, bool Stream, class Writer, class Value>
__attribute__((always_inline)) inline void put_quad(float* y, int64_t j, Writer& bits,
                                                    Value value) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  V v[4];
  simd::vmask<A> positive[4];
  for (int u = 0; u < 4; ++u) {
    v[u] = value(u);
    positive[u] = v[u] > V(0.f);
  }
  bits.put4(j, simd::to_bits4<A>(positive));
  for (int u = 0; u < 4; ++u) simd::store<A>(y + j + u * W, v[u], Stream);
}

// The ReLU mask bits of the walk's values [j, end), read back from y (in
// L1), in bytes mode: (index + j) % 8 == 0, or end - j < W.
template <class A>
__attribute__((always_inline)) inline void put_bits_of(const float* y, int64_t j, int64_t end,
                                                       mask_writer<A, relu_mode::bytes>& bits) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  if constexpr (mask_quads_out<A, relu_mode::bytes>) {
    for (; j + 4 * W <= end; j += 4 * W) {
      simd::vmask<A> positive[4];
      for (int u = 0; u < 4; ++u) positive[u] = V::load_unaligned(y + j + u * W) > V(0.f);
      bits.put4(j, simd::to_bits4<A>(positive));
    }
  }
  for (; j + W <= end; j += W) bits.put(j, W, to_bits<A>(V::load_unaligned(y + j) > V(0.f)));
  if (j < end) {
    const int64_t n = end - j;
    bits.put(j, n, to_bits<A>(load_n<A>(y + j, n) > V(0.f)) & ((1u << n) - 1u));
  }
}

// With the mask in cache (bytes mode), rows of fewer than 8 vectors go by
// channel too, piece by piece: a piece's y channel by channel, then its
// mask bits read back from y in L1, in memory order (whole bytes). The
// walk itself cannot put them: its last vector of a channel overlaps the
// one before, and a channel's bits start anywhere in a byte. x and y of a
// piece: 16 KiB. Against the channel_walker (bnorm_ab, Zen 3, AVX2, both
// orders twice; forward training with ReLU, NCHW): 8x4014x5x5 -24..-31%,
// 8x2787x6x6 -12..-15%, 8x2048x7x7 -2..-16%, 32x512x7x7 -9..-13%; 9x9
// -1..+5%, 11x11 +3..+10%, 14x14 +0..+20% (longer rows cross less, and the
// walker's quads put four vectors' bits in one store).
constexpr int64_t kMaskPieceValues = 2048;

template <class A>
bool by_channel_with_mask(int64_t spatial, bool aliased) {
  constexpr int64_t W = simd::vfloat<A>::size;
  return by_channel<A>(spatial, aliased) && spatial < 8 * W;
}

// Compiled once per (ReLU mode, streaming) pair so that the loop tests
// neither. (With the mask bit by bit, through one bit_writer's chain, the
// NCHW forward training with ReLU of 8x256x14x14 took 1.7 times as long as
// without.)
template <class A, relu_mode Relu, bool Stream>
__attribute__((noinline)) void normalize_run(const float* x, float* y, flat_run f, int64_t head,
                                             const float* mean, const float* scale,
                                             const float* shift, relu_bits relu_out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const float* const coef[3] = {mean, scale, shift};
  mask_writer<A, Relu> bits(relu_out.bits, relu_out.index);
  auto value = [&](int64_t j, int64_t n, const V* k) __attribute__((always_inline)) {
    const V v = madd(load_n<A>(x + j, n) - k[0], k[1], k[2]);
    return Relu == relu_mode::none ? v : relu_vec<A>(v);
  };
  auto step = [&](int64_t j, int64_t n, const V* k) __attribute__((always_inline)) {
    const V v = value(j, n, k);
    if constexpr (Relu != relu_mode::none)
      bits.put(j, n, to_bits<A>(v > V(0.f)) & ((1u << n) - 1u));
    store_n<A>(y + j, v, n, Stream);
  };
  if constexpr (!Stream && (Relu == relu_mode::none || Relu == relu_mode::clamp)) {
    if (by_channel<A>(f.spatial, x == y)) return walk_channels<A, 3>(coef, f, step);
  }
  if constexpr (!Stream && Relu == relu_mode::bytes) {
    if (by_channel_with_mask<A>(f.spatial, x == y)) {
      for (int64_t j = 0; j < f.count;) {
        const int64_t end = std::min(f.count, (j == 0 ? head : j) + kMaskPieceValues);
        const int64_t at = f.col + j;
        const flat_run piece{f.row + at / f.spatial, at % f.spatial, end - j, f.spatial,
                             f.channels};
        walk_channels<A, 3>(
            coef, piece, [&](int64_t i, int64_t n, const V* k) __attribute__((always_inline)) {
              store_n<A>(y + j + i, value(j + i, n, k), n, false);
            });
        if (j == 0) put_bits_of<A>(y, 0, head, bits);  // the head (< W values) first
        put_bits_of<A>(y, j == 0 ? head : j, end, bits);
        j = end;
      }
      return;
    }
  }
  channel_walker<A, 3> walk(coef, f);
  if constexpr (mask_quads_out<A, Relu>) {
    auto quad = [&](int64_t j, const V* k) __attribute__((always_inline)) {
      put_quad<A, Stream>(
          y, j, bits, [&](int u) __attribute__((always_inline)) { return value(j + u * W, W, k); });
    };
    walk_vectors<A>(walk, f.count, head, step, quad);
  } else {
    walk_vectors<A>(walk, f.count, head, step);
  }
  bits.finish();
}

template <class A>
void normalize_nchw(const float* x, float* y, flat_run f, const float* mean, const float* scale,
                    const float* shift, relu_bits relu_out, bool stream) {
  const bool mask = relu_out.relu && relu_out.bits;
  const int64_t head = walk_head<A>(y, f.count, relu_out.index, mask, stream);
  with_modes(relu_mode_for<A>(relu_out.relu, relu_out.bits, relu_out.index, head), stream,
             [&](auto m, auto nt) {
               normalize_run<A, decltype(m)::value, decltype(nt)::value>(x, y, f, head, mean, scale,
                                                                         shift, relu_out);
             });
}

// NHWC whole rows (a region with cols == stride, C >= W) are one run of
// rows * C values in memory order, walked a vector at a time like an NCHW
// run: a vector may hold the end of one row and the start of the next, and
// then takes the coefficients of its lanes from both ends of the arrays
// (simd::load_wrapped). So rows of any C cost nothing per row but that
// vector, and the walk can start with a shorter head that puts every later
// store on a vector boundary of the output, whatever the buffer's
// alignment (walk_head; with a mask in cache, it may put the mask bytes
// on boundaries instead): with streaming stores this is what lets a tensor from malloc
// (16 bytes past a vector boundary) stream at all (NHWC inference of
// 32x256x56x56 from such buffers took 1.5x as long when its rows were
// stored without), and in cache it keeps whole the loads and stores of
// tensors whose buffers share that offset. The per-column coefficients are
// re-read from L1 for every row (blocks of 512 channels down a chunk's rows,
// to keep the coefficients of C >= 1024 in L1, measured slower: 4096x1024
// inference 2.6 -> 5.5, 32x2048x49 +14%); only rows whose coefficients and
// data overflow L1 go in blocks of whole pages, in cache (l1_columns in
// batchnorm.cpp).
//
// Calls step(j, n, q, wrap) for the values [j, j + n), n <= W, in order: q
// the column of value j (C >= W columns), wrap (std::true_type) when the
// vector's lanes run past the last column; given a quad, quad(j, q) for
// four full vectors within one row from j, where a row has them. A head of `head` < W values (if
// any), full vectors, a shorter tail. Rows of whole vectors on vector
// boundaries go row by row with nothing per row but its start (short rows
// paid per-row work: 8x64x56x56, 4 vectors a row, inference -19% without).
template <class A, class Step, class Quad = std::nullptr_t>
__attribute__((always_inline)) inline void walk_rows(int64_t count, int64_t c, int64_t head,
                                                     Step step, Quad quad = nullptr) {
  constexpr int64_t W = simd::vfloat<A>::size;
  constexpr bool quads = !std::is_null_pointer_v<Quad>;
  const std::false_type within;
  const std::true_type wraps;
  if (head == 0 && c % W == 0) {
    for (int64_t row = 0; row < count; row += c) {
      int64_t q = 0;
      if constexpr (quads)
        for (; q + 4 * W <= c; q += 4 * W) quad(row + q, q);
      for (; q < c; q += W) step(row + q, W, q, within);
    }
    return;
  }
  int64_t j = std::min(head, count);
  if (j > 0) step(0, j, 0, within);
  int64_t q = j;
  while (j + W <= count) {
    // The vectors within this row, then the one that runs into the next.
    const int64_t vectors = std::min((c - q) / W, (count - j) / W);
    int64_t v = 0;
    if constexpr (quads)
      for (; v + 4 <= vectors; v += 4, j += 4 * W, q += 4 * W) quad(j, q);
    for (; v < vectors; ++v, j += W, q += W) step(j, W, q, within);
    if (q == c) {
      q = 0;
    } else if (j + W <= count) {
      step(j, W, q, wraps);
      j += W;
      q += W - c;
    }
  }
  if (j < count) {
    if (q + W <= c)
      step(j, count - j, q, within);
    else
      step(j, count - j, q, wraps);
  }
}

// The vector of per-column values for the lanes of a walk_rows step.
template <class A, class Wrap>
inline simd::vfloat<A> columns_at(const float* coef, int64_t q, int64_t c, Wrap) {
  if constexpr (Wrap::value)
    return simd::load_wrapped<A>(coef + q, c - q, coef);
  else
    return simd::vfloat<A>::load_unaligned(coef + q);
}

// Whether every row of a region takes the same head and ReLU mode as its
// first: whole rows are one run; the rows of a column block are when their
// stride keeps vectors (and mask bytes) on the same boundaries.
template <class A>
bool uniform_rows(region r, bool mask) {
  return r.cols == r.stride ||
         (r.stride % simd::vfloat<A>::size == 0 && (!mask || r.stride % 8 == 0));
}

// Whole rows walked as one run, or each row of a column block (cols <
// stride) as its own, all with the same head. Compiled once per (ReLU mode,
// streaming) pair, so that the loop tests neither.
template <class A, relu_mode Relu, bool Stream>
__attribute__((noinline)) void normalize_rows(const float* x, float* y, region r, int64_t head,
                                              const float* mean, const float* scale,
                                              const float* shift, relu_bits relu_out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const bool whole = r.cols == r.stride;
  const int64_t count = whole ? r.rows * r.cols : r.cols;
  for (int64_t i = 0; i < (whole ? 1 : r.rows); ++i) {
    const int64_t at = i * r.stride;
    mask_writer<A, Relu> bits(relu_out.bits, relu_out.index + at);
    auto value = [&](int64_t j, int64_t n, int64_t q, auto wrap) __attribute__((always_inline)) {
      const V v =
          madd(load_n<A>(x + at + j, n) - columns_at<A>(mean, q, r.cols, wrap),
               columns_at<A>(scale, q, r.cols, wrap), columns_at<A>(shift, q, r.cols, wrap));
      return Relu == relu_mode::none ? v : relu_vec<A>(v);
    };
    auto step = [&](int64_t j, int64_t n, int64_t q, auto wrap) __attribute__((always_inline)) {
      const V v = value(j, n, q, wrap);
      if constexpr (Relu != relu_mode::none)
        bits.put(j, n, to_bits<A>(v > V(0.f)) & ((1u << n) - 1u));
      store_n<A>(y + at + j, v, n, Stream);
    };
    if constexpr (mask_quads_out<A, Relu>) {
      auto quad = [&](int64_t j, int64_t q) __attribute__((always_inline)) {
        put_quad<A, Stream>(
            y + at, j, bits, [&](int u) __attribute__((always_inline)) {
              return value(j + u * W, W, q + u * W, std::false_type{});
            });
      };
      walk_rows<A>(count, r.cols, head, step, quad);
    } else {
      walk_rows<A>(count, r.cols, head, step);
    }
    bits.finish();
  }
}

// NHWC: whole rows as one run, column blocks (cols < stride) as one run per
// row, rows narrower than a vector (C < W) value by value.
template <class A>
void normalize_nhwc(const float* x, float* y, region r, const float* mean, const float* scale,
                    const float* shift, relu_bits relu_out, bool stream) {
  constexpr int64_t W = simd::vfloat<A>::size;
  const bool relu = relu_out.relu;
  if (r.cols < W) {
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t at = i * r.stride;
      bit_writer bits(relu ? relu_out.bits : nullptr, relu_out.index + at);
      for (int64_t j = 0; j < r.cols; ++j) {
        const float v = madd1<A>(x[at + j] - mean[j], scale[j], shift[j]);
        y[at + j] = relu ? relu1(v) : v;
        bits.push(y[at + j] > 0.f, 1);
      }
      bits.finish();
    }
    return;
  }
  const bool mask = relu && relu_out.bits;
  const bool uniform = uniform_rows<A>(r, mask);
  for (int64_t i = 0; i < (uniform ? 1 : r.rows); ++i) {
    const int64_t at = i * r.stride;
    const region part = uniform ? r : region{1, r.cols, r.stride};
    const relu_bits out{relu, relu_out.bits, relu_out.index + at};
    const int64_t count = part.cols == part.stride ? part.rows * part.cols : part.cols;
    const int64_t head = walk_head<A>(y + at, count, out.index, mask, stream);
    with_modes(relu_mode_for<A>(relu, out.bits, out.index, head), stream, [&](auto m, auto nt) {
      normalize_rows<A, decltype(m)::value, decltype(nt)::value>(x + at, y + at, part, head, mean,
                                                                 scale, shift, out);
    });
  }
}

template <class A>
void scale(const float* gamma, const float* var, float eps, int64_t n, float* out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V e(eps), one(1.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V g = gamma ? V::load_unaligned(gamma + j) : one;
    (g / xsimd::sqrt(V::load_unaligned(var + j) + e)).store_unaligned(out + j);
  }
  for (; j < n; ++j) out[j] = (gamma ? gamma[j] : 1.f) / std::sqrt(var[j] + eps);
}

template <class A>
void finish(const partial* a, int64_t n, float* mean, float* var) {
  using D = simd::vdouble<A>;
  constexpr int64_t N = D::size;
  const D nan(std::numeric_limits<double>::quiet_NaN());
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    D m, m2, count;
    simd::load_triples<A>(reinterpret_cast<const double*>(a + j), &m, &m2, &count);
    const D v = m2 / count;
    const auto ok = finite<A>(m) && finite<A>(v);
    simd::store_narrowed<A>(mean + j, xsimd::select(ok, m, nan));
    simd::store_narrowed<A>(var + j, xsimd::select(ok, v, nan));
  }
  for (; j < n; ++j) finish_moments(a[j], mean + j, var + j);
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
  const simd::vfloat<A> g = load_n<A>(dy, n);
  return relu_in.bits ? masked<A>(g, relu_in.bits, index, n) : g;
}

// sum(dy) and sum(dy * (x - mean)) of one NCHW channel's region, per lane.
template <class A>
struct lane_sums {
  simd::vfloat<A> dy, dy_xmu;
};

template <class A>
lane_sums<A> channel_sums(const float* x, const float* dy, region r, float mean,
                          relu_bits_in relu_in) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const int64_t tail = r.cols % W, body = r.cols - tail;
  const V vm(mean);
  V s0[2] = {V(0.f), V(0.f)}, s1[2] = {V(0.f), V(0.f)};
  // n values at x + at, dy + at into accumulator pair K (a constant, so
  // that the accumulators stay in registers).
  auto add = [&](auto K, int64_t at, int64_t n, V g) {
    const V xm = n == W ? V::load_unaligned(x + at) - vm
                        : simd::keep_first<A>(simd::load_first<A>(x + at, n) - vm, n);
    s0[K] += g;
    s1[K] = madd(g, xm, s1[K]);
  };
  const std::integral_constant<int, 0> first;
  const std::integral_constant<int, 1> second;
  // One row, dy's n values from c from dy_at(c, n) (n == W but in the tail).
  auto row = [&](int64_t at, auto dy_at, int64_t c = 0) {
    for (; c + 2 * W <= body; c += 2 * W) {
      add(first, at + c, W, dy_at(c, W));
      add(second, at + c + W, W, dy_at(c + W, W));
    }
    if (c < body) add(first, at + c, W, dy_at(c, W));
    if (tail) add(second, at + body, tail, dy_at(body, tail));  // masked: inactive lanes add 0
  };
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t at = i * r.stride;
    if constexpr (W % 8 == 0) {
      // A row from a mask byte (every row of planes of a multiple of 8
      // values, the last or only one too): a vector's bits are its bytes.
      if (relu_in.bits && (relu_in.index + at) % 8 == 0) {
        const uint8_t* bits = relu_in.bits + (relu_in.index + at) / 8;
        int64_t c = 0;
        if constexpr (mask_quads<A, relu_mode::bytes>) {
          for (; c + 4 * W <= body; c += 4 * W) {
            const simd::quad_lanes<A> kept(bits + c / 8);
            auto dy_at = [&](int u) {
              return simd::keep_where<A>(kept[u], V::load_unaligned(dy + at + c + u * W));
            };
            add(first, at + c, W, dy_at(0));
            add(second, at + c + W, W, dy_at(1));
            add(first, at + c + 2 * W, W, dy_at(2));
            add(second, at + c + 3 * W, W, dy_at(3));
          }
        }
        row(
            at,
            [&](int64_t c, int64_t n) {
              const int64_t index = relu_in.index + at + c;
              const V g = load_n<A>(dy + at + c, n);
              return n == W ? masked<A, relu_mode::bytes>(g, relu_in.bits, index, n)
                            : masked<A>(g, relu_in.bits, index, n);
            },
            c);
        continue;
      }
    }
    if constexpr (W == 8) {
      // Row i + 1 is in the mask and its last bit is at least 8 bits past
      // the first of every word read here (the tail's too, rows being at
      // least 8 values apart): both bytes of each word are the mask's.
      if (relu_in.bits && i + 1 < r.rows && r.stride >= W) {
        const row_bits<A> bits(relu_in.bits, relu_in.index + at);
        row(at, [&](int64_t c, int64_t n) { return bits.keep(load_n<A>(dy + at + c, n), c); });
        continue;
      }
    }
    row(at, [&](int64_t c, int64_t n) {
      return load_dy<A>(dy + at + c, n, relu_in, relu_in.index + at + c);
    });
  }
  return {s0[0] + s0[1], s1[0] + s1[1]};
}

template <class A>
void backward_reduce_nchw(const float* x, const float* dy, region r, float mean,
                          relu_bits_in relu_in, double* sum_dy, double* sum_dy_xmu) {
  const lane_sums<A> s = channel_sums<A>(x, dy, r, mean, relu_in);
  *sum_dy = static_cast<double>(xsimd::hadd(s.dy));
  *sum_dy_xmu = static_cast<double>(xsimd::hadd(s.dy_xmu));
  if (!std::isfinite(*sum_dy) || !std::isfinite(*sum_dy_xmu))
    backward_reduce_double<A>(x, dy, r, mean, relu_in, sum_dy, sum_dy_xmu);
}

// Calls f(q, at, n) for the vectors of values [at, at + n) (n == W but in
// a row's tail) of region r, at from its start, for Q channels q at a time:
// every row's vectors in order, each for q = 0 .. Q - 1. Inlined, f's
// tests of n == W fold away in the loop of whole vectors.
template <class A, int Q, class F>
__attribute__((always_inline)) inline void group_vectors(region r, F f) {
  constexpr int64_t W = simd::vfloat<A>::size;
  const int64_t tail = r.cols % W, body = r.cols - tail;
  for (int64_t i = 0; i < r.rows; ++i) {
    const int64_t at = i * r.stride;
    for (int64_t j = 0; j < body; j += W)
      for (int q = 0; q < Q; ++q) f(q, at + j, W);
    if (tail == 0) continue;
    for (int q = 0; q < Q; ++q) f(q, at + body, tail);
  }
}

// Calls pass(j, Q) for the channels [j, j + Q) of a group of `channels`:
// Q = 4 (std::integral_constant) while four are left, then Q = 1.
template <class Pass>
__attribute__((always_inline)) inline void in_channel_quads(int64_t channels, Pass pass) {
  int64_t j = 0;
  for (; j + 4 <= channels; j += 4) pass(j, std::integral_constant<int, 4>{});
  for (; j < channels; ++j) pass(j, std::integral_constant<int, 1>{});
}

// dy[0, n) where the mask bits from `index` are set, 0 elsewhere, to out: a
// head up to a mask byte, then whole vectors whose bits are whole bytes
// (SSE2: every vector's bits from any bit, masked()).
template <class A>
void keep_masked(const float* dy, const uint8_t* bits, int64_t index, int64_t n, float* out) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  int64_t j = 0;
  if constexpr (W % 8 == 0) {
    j = std::min(n, (8 - index % 8) % 8);
    if (j > 0) simd::store_first<A>(out, masked<A>(simd::load_first<A>(dy, j), bits, index, j), j);
  }
  if constexpr (mask_quads<A, relu_mode::bytes>) {
    for (; j + 4 * W <= n; j += 4 * W) {
      const simd::quad_lanes<A> kept(bits + (index + j) / 8);
      for (int u = 0; u < 4; ++u)
        simd::keep_where<A>(kept[u], V::load_unaligned(dy + j + u * W))
            .store_unaligned(out + j + u * W);
    }
  }
  for (; j < n; j += W) {
    const int64_t k = std::min(W, n - j);
    store_n<A>(out + j, masked<A, relu_mode::bytes>(load_n<A>(dy + j, k), bits, index + j, k), k,
               false);
  }
}

// NCHW channels with few values, W a call (as moments_nchw_group), summed
// four channels at a time (group_vectors), one pair of accumulators each:
// the loop's set-up once per four channels, where channel_sums took 173
// instructions a channel of 1x512x7x7 (callgrind; 100 this way). bnorm_ab,
// Zen 3, both orders twice: backward 1x512x7x7 -27..-31%, 1x2048x7x7
// -24..-29%, 8x512x7x7 -17..-20%, 8x2048x7x7 -17..-21%, 1x256x14x14
// -5..-13%, 8x256x14x14 -10..-16%; 1x128x28x28 and 1x512x28x28 -9..+4%.
// With the mask, image by image where the group's part of an image (W
// planes) fits kKeptValues: its dy kept where the bits are set first
// (keep_masked, in memory order from a mask byte on). (The moments' groups
// the same way: slower at 32x2048x7x7, performance-notes Session 27.)
constexpr int64_t kKeptValues = 2048;

template <class A>
void backward_reduce_nchw_group(const float* x, const float* dy, region r, int64_t channels,
                                int64_t channel_stride, const float* mean, relu_bits_in relu_in,
                                double* sum_dy, double* sum_dy_xmu) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  V part0[W], part1[W];
  for (int64_t j = 0; j < W; ++j) part0[j] = part1[j] = V(0.f);
  // Adds to part0, part1 the sums over region rr of the group's channels,
  // x from xr, dy from dyr (channel j at j * channel_stride in both).
  auto add_sums = [&](region rr, const float* xr, const float* dyr) {
    in_channel_quads(channels, [&](int64_t j0, auto quad) {
      constexpr int Q = decltype(quad)::value;
      const float* const gx = xr + j0 * channel_stride;
      const float* const gdy = dyr + j0 * channel_stride;
      V m[Q], s0[Q], s1[Q];
      for (int q = 0; q < Q; ++q) {
        m[q] = V(mean[j0 + q]);
        s0[q] = part0[j0 + q];
        s1[q] = part1[j0 + q];
      }
      group_vectors<A, Q>(
          rr, [&](int q, int64_t at, int64_t n) __attribute__((always_inline)) {
            at += q * channel_stride;
            const V g = load_n<A>(gdy + at, n);  // 0 in a tail's inactive lanes
            const V xm = n == W ? V::load_unaligned(gx + at) - m[q]
                                : simd::keep_first<A>(simd::load_first<A>(gx + at, n) - m[q], n);
            s0[q] += g;
            s1[q] = madd(g, xm, s1[q]);
          });
      for (int q = 0; q < Q; ++q) {
        part0[j0 + q] = s0[q];
        part1[j0 + q] = s1[q];
      }
    });
  };
  const int64_t row_values = channels * channel_stride;  // the group's part of a row
  if (!relu_in.bits) {
    add_sums(r, x, dy);
  } else if (row_values <= kKeptValues) {
    alignas(64) float kept[kKeptValues];
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t at = i * r.stride;
      keep_masked<A>(dy + at, relu_in.bits, relu_in.index + at, row_values, kept);
      add_sums(region{1, r.cols, r.cols}, x + at, kept);
    }
  } else {
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t at = j * channel_stride;
      const lane_sums<A> s =
          channel_sums<A>(x + at, dy + at, r, mean[j], {relu_in.bits, relu_in.index + at});
      part0[j] = s.dy;
      part1[j] = s.dy_xmu;
    }
  }
  alignas(64) float a0[W], a1[W];
  simd::haddp<A>(part0).store_aligned(a0);
  simd::haddp<A>(part1).store_aligned(a1);
  for (int64_t j = 0; j < channels; ++j) {
    sum_dy[j] = a0[j];
    sum_dy_xmu[j] = a1[j];
    if (!std::isfinite(a0[j]) || !std::isfinite(a1[j]))
      backward_reduce_double<A>(x + j * channel_stride, dy + j * channel_stride, r, mean[j],
                                {relu_in.bits, relu_in.index + j * channel_stride}, sum_dy + j,
                                sum_dy_xmu + j);
  }
}

// The float sums s1 of dy and s2 of dy * (x - mean) of every column of r, U
// rows a step in memory order (as deviation_rows), compiled with and
// without the mask: kernel_table::plane_sums (U = 4) and the NHWC backward
// sums of rows (backward_reduce_rows_into: U = 1 to 512 channels, 4 beyond).
// In session 18 a row at a time in this form took 45% longer than the
// backward's own loop (NHWC backward_reduce 8x256x14x14 in cache, 31 -> 46
// us). Inlined (GCC 12), one template for both measured as the two loops
// did (backward_reduce 8x256x14x14, 8x64x56x56, 8x128x28x28,
// 32x1024x14x14, NCHW 128x512x7x7: -5..+3%, session 24); called as a
// function, the backward sums of 8x64x56x56 took 8-19% longer.
template <class A, relu_mode Relu, int U>
__attribute__((always_inline)) inline void sum_rows(const float* x, const float* dy, region r,
                                                    const float* mean, relu_bits_in relu_in,
                                                    float* s1, float* s2) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  for (int64_t j = 0; j < r.cols; j += W) {
    V(0.f).store_aligned(s1 + j);
    V(0.f).store_aligned(s2 + j);
  }
  stream_rows<A, U>(r, 0, r.cols, [&](int64_t i, int64_t j, auto rows) {
    const V m = V::load_unaligned(mean + j);
    V a1 = V::load_aligned(s1 + j), a2 = V::load_aligned(s2 + j);
    for (int u = 0; u < decltype(rows)::value; ++u) {
      const int64_t at = (i + u) * r.stride + j;
      V g = V::load_unaligned(dy + at);
      if constexpr (Relu != relu_mode::none)
        g = masked<A, Relu>(g, relu_in.bits, relu_in.index + at, W);
      a1 += g;
      a2 = madd(g, V::load_unaligned(x + at) - m, a2);
    }
    a1.store_aligned(s1 + j);
    a2.store_aligned(s2 + j);
  });
}

template <class A>
void plane_sums(const float* x, const float* dy, region r, const float* mean, relu_bits_in relu_in,
                float* s1, float* s2) {
  with_relu_mode(rows_relu_mode<A>(relu_in, r, 0), [&](auto mode) {
    sum_rows<A, decltype(mode)::value, 4>(x, dy, r, mean, relu_in, s1, s2);
  });
}

// NHWC: as moments_nhwc, Q vectors of channels at a time in registers.
// The sums of the `cols` channels from j0 on, from their float sums a0 of
// dy and a1 of dy * (x - mean) (inf or NaN: again in double).
template <class A>
void backward_sums_out(const float* x, const float* dy, region r, int64_t j0, int64_t cols,
                       const float* mean, relu_bits_in relu_in, const float* a0, const float* a1,
                       double* sum_dy, double* sum_dy_xmu) {
  using D = simd::vdouble<A>;
  constexpr int64_t N = D::size;
  auto lanes = [&](int64_t k, int64_t end) {
    for (; k < end; ++k) {
      sum_dy[j0 + k] = a0[k];
      sum_dy_xmu[j0 + k] = a1[k];
      if (!std::isfinite(a0[k]) || !std::isfinite(a1[k]))
        backward_reduce_double<A>(x + j0 + k, dy + j0 + k, {r.rows, 1, r.stride}, mean[j0 + k],
                                  {relu_in.bits, relu_in.index + j0 + k}, sum_dy + j0 + k,
                                  sum_dy_xmu + j0 + k);
    }
  };
  // A vector of channels at a time where all are finite (the conversions
  // are exact: the same values).
  int64_t k = 0;
  for (; k + N <= cols; k += N) {
    const D s0 = simd::load_widened<A>(a0 + k), s1 = simd::load_widened<A>(a1 + k);
    if (xsimd::all(finite<A>(s0) && finite<A>(s1))) {
      s0.store_unaligned(sum_dy + j0 + k);
      s1.store_unaligned(sum_dy_xmu + j0 + k);
    } else {
      lanes(k, k + N);
    }
  }
  lanes(k, cols);
}

// Compiled with and without the ReLU mask: with the test in the loop, GCC
// 12 kept Q = 4's accumulators in memory, a store and a load on every add's
// dependency chain, and the NHWC sums of 64 and 128 channels in cache took
// up to twice as long as the NCHW ones.
template <class A, int Q, relu_mode Relu>
void backward_reduce_columns(const float* x, const float* dy, region r, int64_t j0,
                             const float* mean, relu_bits_in relu_in, double* sum_dy,
                             double* sum_dy_xmu) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const V zero(0.f);
  V vm[Q], s0[Q], s1[Q];
  for (int q = 0; q < Q; ++q) {
    vm[q] = V::load_unaligned(mean + j0 + q * W);
    s0[q] = s1[q] = zero;
  }
  with_prefetch<A, Q>(r, j0, [&](auto ahead) {
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t at = i * r.stride + j0;
      if (ahead) {
        prefetch_group<A, Q>(x + at);
        prefetch_group<A, Q>(dy + at);
      }
      // Unrolled whole, or GCC 12 keeps s0 and s1 in memory (Q = 8 with ReLU).
      static_assert(Q <= 8, "the pragma unrolls up to 8");
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) {
        V g = V::load_unaligned(dy + at + q * W);
        if constexpr (Relu != relu_mode::none)
          g = masked<A, Relu>(g, relu_in.bits, relu_in.index + at + q * W, W);
        s0[q] += g;
        s1[q] = madd(g, V::load_unaligned(x + at + q * W) - vm[q], s1[q]);
      }
    }
  });
  alignas(64) float a0[Q * W], a1[Q * W];
  for (int q = 0; q < Q; ++q) {
    s0[q].store_aligned(a0 + q * W);
    s1[q].store_aligned(a1 + q * W);
  }
  backward_sums_out<A>(x, dy, r, j0, Q * W, mean, relu_in, a0, a1, sum_dy, sum_dy_xmu);
}

// NHWC rows of kStreamRowsVectors vectors to kWideBlock channels (a
// multiple of W), in memory order with the sums in L1: one row after the
// other up to kStreamBlock channels, wider rows four at a time. The column groups read 256 bytes of
// each 1-2 KiB row per pass, four passes or more over a chunk; in memory order backward 8x256x56x56
// took 29% less time, 32x256x56x56 20%, 65536x256 27% (four rows at a
// time, as deviation_rows does, was 2-9% slower). With C = 512 the sums
// alone took 3-22% less (1x512x28x28 37 -> 29 us, 32x512x7x7 69 -> 55 us,
// 128x512x28x28 -6%; session 9). Until session 23 from 256 channels only:
// on Zen 4 C = 64 had measured +5..+10% and 128 up to +50% (session 9); on
// this project's Zen 3 (op harness, two rounds) the backward of
// 8x64x56x56 took -16..-26%, 8x128x28x28 -10%, 32x64x56x56 -4..-13%,
// 128x128x28x28 -5..-16%, with ReLU -9..-30% (32x128x28x28 and 1x64x56x56
// even). Wider rows one at a time measured slower or mixed (1024:
// -13..+28%, 4096x1024 in L3 the worst; 2048: +15..+42%); four at a time,
// whole rows of up to kWideBlock channels (session 24; until then the
// column groups), bnorm_ab both orders: backward 128x1024x14x14 -14..-20%,
// 128x2048x7x7 -17..-25%, 65536x1024 -16..-21%, 32x1024x14x14 -21..-23%,
// 8x1024x14x14 -13..-18%, 32x2048x7x7 -15%, 4096x1024 -19..-24%,
// 1x1024x14x14 -6..-14%.
// Every channel gets the same operations in the same order as in a column
// group. Compiled with and without the ReLU mask (as the column groups;
// 8x256x14x14 -4%, 1x512x28x28 -4%); two rows per load and store of the
// sums measured +2..+5% (session 13).

template <class A, relu_mode Relu, int U>
__attribute__((always_inline)) inline void backward_reduce_rows_into(
    const float* x, const float* dy, region r, const float* mean, relu_bits_in relu_in, float* a0,
    float* a1, double* sum_dy, double* sum_dy_xmu) {
  sum_rows<A, Relu, U>(x, dy, r, mean, relu_in, a0, a1);
  backward_sums_out<A>(x, dy, r, 0, r.cols, mean, relu_in, a0, a1, sum_dy, sum_dy_xmu);
}

// The sums in arrays on the stack (in cache) or placed by row_sums (Far):
// NHWC backward beyond the L3 (bnorm_ab) 32x256x56x56 -17..-31%,
// 65536x256 -16..-22%, 32x512x28x28 -12..-17%, 8x256x56x56 -14..-20%.
template <class A, relu_mode Relu, bool Far, int U>
void backward_reduce_rows(const float* x, const float* dy, region r, const float* mean,
                          relu_bits_in relu_in, double* sum_dy, double* sum_dy_xmu) {
  if constexpr (Far) {
    row_sums<2> sums(x, r.cols);
    backward_reduce_rows_into<A, Relu, U>(x, dy, r, mean, relu_in, sums[0], sums[1], sum_dy,
                                          sum_dy_xmu);
  } else {
    alignas(64) float a0[kWideBlock], a1[kWideBlock];
    backward_reduce_rows_into<A, Relu, U>(x, dy, r, mean, relu_in, a0, a1, sum_dy, sum_dy_xmu);
  }
}

template <class A>
void backward_reduce_nhwc(const float* x, const float* dy, region r, const float* mean,
                          relu_bits_in relu_in, bool far, double* sum_dy, double* sum_dy_xmu) {
  constexpr int64_t W = simd::vfloat<A>::size;
  // AVX-512 rows of 128 channels keep their one group of 8 vectors (below).
  const bool one_group = one_group_rows<A>(r);
  if (!one_group && r.stride >= kStreamRowsVectors * W && r.stride <= kWideBlock &&
      r.cols % W == 0) {
    with_relu_mode(rows_relu_mode<A>(relu_in, r, 0), [&](auto mode) {
      constexpr relu_mode Relu = decltype(mode)::value;
      auto rows = r.stride <= kStreamBlock ? (far ? backward_reduce_rows<A, Relu, true, 1>
                                                  : backward_reduce_rows<A, Relu, false, 1>)
                                           : (far ? backward_reduce_rows<A, Relu, true, 4>
                                                  : backward_reduce_rows<A, Relu, false, 4>);
      rows(x, dy, r, mean, relu_in, sum_dy, sum_dy_xmu);
    });
    return;
  }
  // Rows of up to 512 channels four at a time, as moments_nhwc does in
  // cache, measured slower (two arrays: 128x512x49 +9%; one row at a time
  // won, above). Narrower and wider rows take column groups. Rows of
  // 8 vectors with 32 registers (AVX-512: C = 128) in one group, in memory
  // order: 32x128x28x28 -13..-15%, 128x128x28x28 -18..-22%. Groups of 8
  // vectors that are parts of longer rows measured slower (+8..+28%, C = 256
  // to 1024). Every channel is one lane whatever the group: the same bits.
  int64_t j = 0;
  auto columns = [&](auto q, int64_t j0) {
    constexpr int Q = decltype(q)::value;
    with_relu_mode(rows_relu_mode<A>(relu_in, r, j0), [&](auto mode) {
      backward_reduce_columns<A, Q, decltype(mode)::value>(x, dy, r, j0, mean, relu_in, sum_dy,
                                                           sum_dy_xmu);
    });
  };
  if (one_group) {
    columns(std::integral_constant<int, 8>{}, 0);
    return;
  }
  for (; j + 4 * W <= r.cols; j += 4 * W) columns(std::integral_constant<int, 4>{}, j);
  for (; j + W <= r.cols; j += W) columns(std::integral_constant<int, 1>{}, j);
  for (; j < r.cols; ++j) {
    float t0 = 0.f, t1 = 0.f;
    for (int64_t i = 0; i < r.rows; ++i) {
      const float g = masked1(dy + i * r.stride, j, relu_in.bits, relu_in.index + i * r.stride + j);
      t0 += g;
      t1 = madd1<A>(g, x[i * r.stride + j] - mean[j], t1);
    }
    sum_dy[j] = t0;
    sum_dy_xmu[j] = t1;
    if (!std::isfinite(t0) || !std::isfinite(t1))
      backward_reduce_double<A>(x + j, dy + j, {r.rows, 1, r.stride}, mean[j],
                                {relu_in.bits, relu_in.index + j}, sum_dy + j, sum_dy_xmu + j);
  }
}

template <class A>
void backward_coefficients(const sums* s, const float* gamma, const double* invstd, bool constant,
                           double inv, int64_t n, float* dgamma, float* dbeta, float* a, float* b,
                           float* c) {
  using D = simd::vdouble<A>;
  constexpr int64_t N = D::size;
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    D dy, dy_xmu;
    simd::load_pairs<A>(reinterpret_cast<const double*>(s + j), &dy, &dy_xmu);
    const D is = D::load_unaligned(invstd + j);
    const D hat = dy_xmu * is;  // to_xhat
    if (dgamma) simd::store_narrowed<A>(dgamma + j, hat);
    if (dbeta) simd::store_narrowed<A>(dbeta + j, dy);
    const D ga = (gamma ? simd::load_widened<A>(gamma + j) : D(1.0)) * is;
    simd::store_narrowed<A>(a + j, ga);
    // -ga as the scalar code negates: the sign bit flipped. xsimd 8.1's
    // avx512f negation is 0 - ga, +0 for ga = +0 (gamma = 0) where the
    // scalar -ga is -0, and the sign of b's and c's zeros reaches dx.
    const D minus_ga = xsimd::bitwise_xor(ga, D(-0.0)), zero(0.0), m(inv);
    simd::store_narrowed<A>(b + j, constant ? zero : minus_ga * is * hat * m);
    simd::store_narrowed<A>(c + j, constant ? zero : minus_ga * dy * m);
  }
  for (; j < n; ++j) {
    const sums xhat = to_xhat(s[j], invstd[j]);
    if (dgamma) dgamma[j] = static_cast<float>(xhat.dy_xmu);
    if (dbeta) dbeta[j] = static_cast<float>(xhat.dy);
    backward_coefficient(xhat, gamma ? gamma[j] : 1.f, invstd[j], constant, inv, a + j, b + j,
                         c + j);
  }
}

template <class A>
void invstd(const float* var, float eps, int64_t n, double* out) {
  using D = xsimd::batch<double, A>;
  constexpr int64_t W = D::size;
  const D e(static_cast<double>(eps)), one(1.0);
  alignas(64) double v[W];
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int64_t k = 0; k < W; ++k) v[k] = var[j + k];
    (one / xsimd::sqrt(D::load_aligned(v) + e)).store_unaligned(out + j);
  }
  for (; j < n; ++j) out[j] = 1.0 / std::sqrt(static_cast<double>(var[j]) + eps);
}

// A plain loop: compiled with each arch_*.cpp's flags, GCC vectorizes it
// (float -> double conversions, products and sums in double, 2, 4 or 8
// lanes), lane by lane the operations of the scalar loop (-ffp-contract=off:
// no fused multiply-add), so every instruction set gives the same bits. In
// batchnorm.cpp, built for SSE2 only, it took 1.7 us for 2048 channels (5% of
// forward training of 1x2048x7x7; session 11).
template <class A>
void running_stats(int64_t n, double keep, double m, double bessel, const float* mean,
                   const float* var, float* running_mean, float* running_var) {
  for (int64_t j = 0; j < n; ++j) {
    running_mean[j] = static_cast<float>(keep * running_mean[j] + m * mean[j]);
    running_var[j] = static_cast<float>(keep * running_var[j] + m * (var[j] * bessel));
  }
}

// Compiled per (ReLU mode, streaming) pair: with the streaming test in the
// loop, walk_vectors' inner loops ran 7-20% slower (NCHW backward in cache,
// bnorm_ab: 8x512x7x7 -14%, 32x512x7x7 -20%, 8x2048x7x7 -16%, 8x256x14x14
// -13%, 1x64x56x56 -10%; the x test in the loop costs under 2%).
template <class A, relu_mode Relu, bool Stream>
__attribute__((noinline)) void apply_run(const float* x, const float* dy, float* dx, flat_run f,
                                         int64_t head, const float* mean, const float* a,
                                         const float* b, const float* c, relu_bits_in relu_in) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  const float* const coef[4] = {mean, a, b, c};
  auto out = [&](int64_t j, int64_t n, const V* k, V g) __attribute__((always_inline)) {
    return x ? madd(k[1], g, madd(load_n<A>(x + j, n) - k[0], k[2], k[3])) : k[1] * g;
  };
  auto step = [&](int64_t j, int64_t n, const V* k) __attribute__((always_inline)) {
    V g = load_n<A>(dy + j, n);
    if constexpr (Relu != relu_mode::none)
      g = masked<A, Relu>(g, relu_in.bits, relu_in.index + j, n);
    store_n<A>(dx + j, out(j, n, k, g), n, Stream);
  };
  // Not with the mask: its bits at any index (relu_mode::bits) cost more
  // than the blends save (NCHW backward with ReLU, 8x256x14x14 +20%).
  if constexpr (!Stream && Relu == relu_mode::none) {
    if (by_channel<A>(f.spatial, dx == dy)) return walk_channels<A, 4>(coef, f, step);
  }
  channel_walker<A, 4> walk(coef, f);
  if constexpr (mask_quads<A, Relu>) {
    auto quad = [&](int64_t j, const V* k) __attribute__((always_inline)) {
      const simd::quad_lanes<A> kept(relu_in.bits + ((relu_in.index + j) >> 3));
      for (int u = 0; u < 4; ++u) {
        const int64_t at = j + u * W;
        const V g = simd::keep_where<A>(kept[u], V::load_unaligned(dy + at));
        simd::store<A>(dx + at, out(at, W, k, g), Stream);
      }
    };
    walk_vectors<A>(walk, f.count, head, step, quad);
  } else {
    walk_vectors<A>(walk, f.count, head, step);
  }
}

template <class A>
void backward_apply_nchw(const float* x, const float* dy, float* dx, flat_run f, const float* mean,
                         const float* a, const float* b, const float* c, relu_bits_in relu_in,
                         bool stream) {
  const bool mask = relu_in.bits != nullptr;
  const int64_t head = walk_head<A>(dx, f.count, relu_in.index, mask, stream);
  with_modes(relu_mode_for<A>(mask, relu_in.bits, relu_in.index, head), stream,
             [&](auto m, auto nt) {
               apply_run<A, decltype(m)::value, decltype(nt)::value>(x, dy, dx, f, head, mean, a, b,
                                                                     c, relu_in);
             });
}

// dx for NHWC rows, as normalize_rows.
template <class A, relu_mode Relu, bool Stream>
__attribute__((noinline)) void apply_rows(const float* x, const float* dy, float* dx, region r,
                                          int64_t head, const float* mean, const float* a,
                                          const float* b, const float* c, relu_bits_in relu_in) {
  using V = simd::vfloat<A>;
  const V zero(0.f);
  const bool whole = r.cols == r.stride;
  const int64_t count = whole ? r.rows * r.cols : r.cols;
  for (int64_t i = 0; i < (whole ? 1 : r.rows); ++i) {
    const int64_t at = i * r.stride, index = relu_in.index + at;
    walk_rows<A>(
        count, r.cols,
        head, [&](int64_t j, int64_t n, int64_t q, auto wrap) __attribute__((always_inline)) {
          V g = load_n<A>(dy + at + j, n);
          if constexpr (Relu != relu_mode::none) g = masked<A, Relu>(g, relu_in.bits, index + j, n);
          const V rest =
              x ? madd(load_n<A>(x + at + j, n) - columns_at<A>(mean, q, r.cols, wrap),
                       columns_at<A>(b, q, r.cols, wrap), columns_at<A>(c, q, r.cols, wrap))
                : zero;
          store_n<A>(dx + at + j, madd(columns_at<A>(a, q, r.cols, wrap), g, rest), n, Stream);
        });
  }
}

// With ordinary stores, no ReLU mask and batch statistics, rows of whole
// vectors go two rows at a time: each vector of the four coefficients
// loaded once for both rows. bnorm_ab: 32x512x7x7 -8%, 256x1024 -4..-8%,
// 1x256x56x56 -10%, 128x512x7x7 and 8x512x28x28 -1%. (The same in the
// normalize measured -20% at 32x2048x7x7 but +36..+59% at 128x512x7x7, and
// with streaming stores +22..+31%: not used there.) Rows in pairs keep
// their loads on vector boundaries only when the buffers are aligned, so
// other buffers take walk_rows.
template <class A>
void apply_row_pairs(const float* x, const float* dy, float* dx, region r, const float* mean,
                     const float* a, const float* b, const float* c) {
  using V = simd::vfloat<A>;
  constexpr int64_t W = V::size;
  int64_t i = 0;
  for (; i + 2 <= r.rows; i += 2) {
    const int64_t at0 = i * r.stride, at1 = at0 + r.stride;
    for (int64_t j = 0; j < r.cols; j += W) {
      const V m = V::load_unaligned(mean + j), va = V::load_unaligned(a + j),
              vb = V::load_unaligned(b + j), vc = V::load_unaligned(c + j);
      const V rest0 = madd(V::load_unaligned(x + at0 + j) - m, vb, vc);
      const V rest1 = madd(V::load_unaligned(x + at1 + j) - m, vb, vc);
      madd(va, V::load_unaligned(dy + at0 + j), rest0).store_unaligned(dx + at0 + j);
      madd(va, V::load_unaligned(dy + at1 + j), rest1).store_unaligned(dx + at1 + j);
    }
  }
  if (i < r.rows)
    apply_rows<A, relu_mode::none, false>(x + i * r.stride, dy + i * r.stride, dx + i * r.stride,
                                          {1, r.cols, r.cols}, 0, mean, a, b, c, {nullptr, 0});
}

// NHWC: as normalize_nhwc.
template <class A>
void backward_apply_nhwc(const float* x, const float* dy, float* dx, region r, const float* mean,
                         const float* a, const float* b, const float* c, relu_bits_in relu_in,
                         bool stream) {
  constexpr int64_t W = simd::vfloat<A>::size;
  if (r.cols < W) {
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t at = i * r.stride;
      for (int64_t j = 0; j < r.cols; ++j) {
        const float g = masked1(dy + at, j, relu_in.bits, relu_in.index + at + j);
        const float rest = x ? madd1<A>(x[at + j] - mean[j], b[j], c[j]) : 0.f;
        dx[at + j] = madd1<A>(a[j], g, rest);
      }
    }
    return;
  }
  const bool mask = relu_in.bits != nullptr;
  const bool uniform = uniform_rows<A>(r, mask);
  for (int64_t i = 0; i < (uniform ? 1 : r.rows); ++i) {
    const int64_t at = i * r.stride;
    const region part = uniform ? r : region{1, r.cols, r.stride};
    const relu_bits_in in{relu_in.bits, relu_in.index + at};
    const int64_t count = part.cols == part.stride ? part.rows * part.cols : part.cols;
    const int64_t head = walk_head<A>(dx + at, count, in.index, mask, stream);
    if (x && !mask && !stream && head == 0 && part.cols == part.stride && part.cols % W == 0) {
      apply_row_pairs<A>(x + at, dy + at, dx + at, part, mean, a, b, c);
      return;
    }
    with_modes(relu_mode_for<A>(mask, in.bits, in.index, head), stream, [&](auto m, auto nt) {
      apply_rows<A, decltype(m)::value, decltype(nt)::value>(x ? x + at : nullptr, dy + at, dx + at,
                                                             part, head, mean, a, b, c, in);
    });
  }
}

}  // namespace
}  // namespace kernels_for

// The table of microkernels compiled for instruction set A.
template <class A>
kernel_table make_kernel_table(const char* isa) {
  using namespace kernels_for;
  return {isa,
          simd::vfloat<A>::size,
          moments_nchw<A>,
          moments_nchw_group<A>,
          moments_nhwc<A>,
          moments_nhwc_pair<A>,
          nhwc_means<A>,
          scale<A>,
          finish<A>,
          normalize_nchw<A>,
          normalize_nhwc<A>,
          backward_reduce_nchw<A>,
          backward_reduce_nchw_group<A>,
          backward_reduce_nhwc<A>,
          plane_deviations<A>,
          plane_sums<A>,
          backward_coefficients<A>,
          invstd<A>,
          running_stats<A>,
          backward_apply_nchw<A>,
          backward_apply_nhwc<A>};
}

}  // namespace bnorm
