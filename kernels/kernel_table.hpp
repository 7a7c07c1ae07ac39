// The microkernels' interface: what one thread does to one region of a tensor.
//
// Microkernels are written once (microkernels.hpp) and compiled per
// instruction set (arch_*.cpp). They take pointers, counts and strides, never
// vector types, validate nothing and allocate nothing; the operators in
// batchnorm.cpp check arguments, split the work and call them through the
// table chosen once per process (dispatch.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace bnorm {

// Moments of a set of values: mean and sum of squared deviations (M2), in
// double so that merging many of them (Chan et al.) adds no visible error.
struct moments {
  double mean;
  double m2;
};

// Moments of n values (n == 0: nothing yet), as the reductions merge them.
struct partial {
  moments m;
  double n;
};

// The kernels see both as arrays of doubles (pairs, triples).
static_assert(sizeof(moments) == 2 * sizeof(double) && sizeof(partial) == 3 * sizeof(double),
              "moments and partial are packed doubles");

// The backward's sums of a channel: sum(dy) and sum(dy * (x - mean)), or,
// after to_xhat, sum(dy * xhat).
struct sums {
  double dy;
  double dy_xmu;
};

// The scalar forms of some kernels, compiled by batchnorm.cpp (SSE2) and by
// every arch_*.cpp with its own -m flags: internal linkage, so that no
// translation unit calls another's copy (see microkernels.hpp).
namespace {

// sum(dy * (x - mean)) -> sum(dy * xhat).
inline sums to_xhat(sums s, double invstd) { return {s.dy, s.dy_xmu * invstd}; }

// The backward pass of y = gamma * (x - mean) * invstd + beta, per channel
// (docs/batchnorm.md derives it): with M values, xhat = (x - mean) * invstd,
//   dbeta  = sum(dy)
//   dgamma = sum(dy * xhat) = invstd * sum(dy * (x - mean))
//   dx     = gamma * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M)
//          = a * dy + (x - mean) * b + c, with
//   a = gamma * invstd, b = -a * invstd * sum(dy * xhat) / M, c = -a * sum(dy) / M.
// With frozen statistics mean and invstd are constants: dx = a * dy
// (`constant`, b = c = 0). From xhat = sum(dy) and sum(dy * xhat): a, b and
// c; inv = 1 / M (times 1/M, not divided by M twice, see two_pass_moments).
// kernel_table::backward_coefficients gives the same bits, a vector of
// channels at a time.
inline void backward_coefficient(sums xhat, float gamma, double invstd, bool constant, double inv,
                                 float* a, float* b, float* c) {
  const double ga = gamma * invstd;
  *a = static_cast<float>(ga);
  *b = constant ? 0.f : static_cast<float>(-ga * invstd * xhat.dy_xmu * inv);
  *c = constant ? 0.f : static_cast<float>(-ga * xhat.dy * inv);
}

// mean and population variance; NaN for both if the data held inf or NaN.
// kernel_table::finish gives the same bits, a vector of channels at a time.
inline void finish_moments(const partial& a, float* mean, float* var) {
  const double v = a.m.m2 / a.n;
  if (std::isfinite(a.m.mean) && std::isfinite(v)) {
    *mean = static_cast<float>(a.m.mean);
    *var = static_cast<float>(v);
  } else {
    *mean = *var = std::numeric_limits<float>::quiet_NaN();
  }
}

}  // namespace

// `rows` rows of `cols` floats, consecutive rows `stride` floats apart.
struct region {
  int64_t rows;
  int64_t cols;
  int64_t stride;
};

// A run of consecutive NCHW values in memory order, which may cross rows and
// channels: `count` values from column `col` of row `row`, where row
// n * channels + c holds the `spatial` values of image n, channel c. The
// elementwise NCHW kernels take runs, so that they stream through memory
// whatever the spatial size (7x7 rows are 196 bytes).
struct flat_run {
  int64_t row;
  int64_t col;
  int64_t count;
  int64_t spatial;
  int64_t channels;
};

// The fused-ReLU bit mask and the memory index (in elements, from the start
// of the tensor) of the region's first element: bit i%8 of byte i/8 belongs
// to the element at index i.
struct relu_bits {
  bool relu;       // clamp y at 0
  uint8_t* bits;   // and, if not nullptr, write the mask
  int64_t index;
};
// `bits == nullptr`: no ReLU.
struct relu_bits_in {
  const uint8_t* bits;
  int64_t index;
};

// The group kernels take channels of at most this many values (and at most
// 256 images): each accumulator lane then sums at most 256 values with SSE2
// (docs/numerics.md).
constexpr int64_t kGroupValues = 2048;
// The widest vector, in floats (AVX-512).
constexpr int64_t kMaxWidth = 16;

struct kernel_table {
  const char* isa;
  int64_t width;  // floats per vector: the group kernels' channels per call

  // NCHW: every value of the region belongs to one channel. shift: NaN, or a
  // value near the channel's mean (the previous chunk's), which allows a
  // single pass over the data (microkernels.hpp).
  moments (*moments_nchw)(const float* x, region r, float shift);
  // NCHW channels of at most kGroupValues values, `channels` <= width at
  // once: channel j is region r at x + j * channel_stride; out[j].
  void (*moments_nchw_group)(const float* x, region r, int64_t channels, int64_t channel_stride,
                             moments* out);
  // NHWC: column j is channel j; out[j] for j < r.cols. shift: nullptr, or
  // r.cols values near the channels' means (the previous chunk's), which
  // allow a single pass over the data (microkernels.hpp).
  // far: the tensor is larger than the cache (rows of 128-512 channels are
  // then reduced one row at a time; the same bits either way).
  void (*moments_nhwc)(const float* x, region r, const float* shift, bool far, moments* out);
  // Two chunks' moments_nhwc at once: the results of two calls, the rows of
  // the two read in turn where that is faster (far, rows of 8 vectors to
  // 512 channels, both shifted).
  void (*moments_nhwc_pair)(const float* xa, region ra, const float* shift_a, moments* out_a,
                            const float* xb, region rb, const float* shift_b, moments* out_b,
                            bool far);
  // The first of the two passes' means of every channel of an NHWC region
  // (mean[j], j < r.cols): the NHWC pilot (batchnorm.cpp).
  void (*nhwc_means)(const float* x, region r, float* mean);

  // scale[j] = gamma[j] / sqrt(var[j] + eps) (gamma null: 1) for j < n, a
  // vector of channels at a time (correctly rounded IEEE operations: the
  // bits of the scalar expression).
  void (*scale)(const float* gamma, const float* var, float eps, int64_t n, float* scale);
  // finish_moments(a[j], &mean[j], &var[j]) for j < n. In scalar code the
  // division alone held forward training of 1x2048x7x7 NHWC for 2.4 us.
  void (*finish)(const partial* a, int64_t n, float* mean, float* var);

  // y = (x - mean) * scale + shift, then max(y, 0) and mask bits if ReLU.
  // stream: non-temporal stores where y is vector-aligned (the elementwise
  // kernels give the same bits either way), left unfenced: the caller fences
  // them once its thread's share is done (run_threads). NCHW: x and y point at the run's
  // first value; mean, scale and shift are indexed by channel.
  void (*normalize_nchw)(const float* x, float* y, flat_run f, const float* mean,
                         const float* scale, const float* shift, relu_bits relu, bool stream);
  void (*normalize_nhwc)(const float* x, float* y, region r, const float* mean,
                         const float* scale, const float* shift, relu_bits relu, bool stream);

  // sum(dy) and sum(dy * (x - mean)), dy zeroed where the ReLU bit is clear.
  void (*backward_reduce_nchw)(const float* x, const float* dy, region r, float mean,
                               relu_bits_in relu, double* sum_dy, double* sum_dy_xmu);
  // The same for `channels` <= width channels at once (see moments_nchw_group);
  // mean, sum_dy and sum_dy_xmu indexed by the group's channel.
  void (*backward_reduce_nchw_group)(const float* x, const float* dy, region r, int64_t channels,
                                     int64_t channel_stride, const float* mean, relu_bits_in relu,
                                     double* sum_dy, double* sum_dy_xmu);
  // far: x and dy do not fit in the cache (where the rows' sums are placed
  // differs, see row_sums; the results do not).
  void (*backward_reduce_nhwc)(const float* x, const float* dy, region r, const float* mean,
                               relu_bits_in relu, bool far, double* sum_dy, double* sum_dy_xmu);

  // NCHW short planes walked as rows (the images) of columns (a range of
  // channels' values), rows in memory order; r.cols a multiple of width,
  // s1 and s2 r.cols floats, 64-byte aligned, overwritten with column sums:
  // d = x - center[j]: s1 = sum(d), s2 = sum(d * d);
  void (*plane_deviations)(const float* x, region r, const float* center, float* s1, float* s2);
  // g = dy (zeroed where the ReLU bit is clear): s1 = sum(g), s2 = sum(g * (x - mean[j])).
  void (*plane_sums)(const float* x, const float* dy, region r, const float* mean,
                     relu_bits_in relu, float* s1, float* s2);

  // For the channels j < n, from s[j] = sum(dy) and sum(dy * (x - mean)):
  // xhat = to_xhat(s[j], invstd[j]), dgamma[j] = float(xhat.dy_xmu) and
  // dbeta[j] = float(xhat.dy) (each if not null), and backward_coefficient
  // with gamma[j] (gamma null: 1) into a[j], b[j], c[j].
  void (*backward_coefficients)(const sums* s, const float* gamma, const double* invstd,
                                bool constant, double inv, int64_t n, float* dgamma, float* dbeta,
                                float* a, float* b, float* c);

  // invstd[j] = 1 / sqrt(double(var[j]) + eps) for j < n: the backward
  // coefficients' square root and division, a vector of channels at a time
  // (correctly rounded IEEE operations: the bits of the scalar expression).
  void (*invstd)(const float* var, float eps, int64_t n, double* invstd);

  // running_mean = keep * running_mean + m * mean and running_var = keep *
  // running_var + m * (var * bessel) for j < n, in double, rounded once to
  // float (the bits of the scalar expressions).
  void (*running_stats)(int64_t n, double keep, double m, double bessel, const float* mean,
                        const float* var, float* running_mean, float* running_var);

  // dx = a * dy + ((x - mean) * b + c); x == nullptr means b = c = 0 (x unused).
  void (*backward_apply_nchw)(const float* x, const float* dy, float* dx, flat_run f,
                              const float* mean, const float* a, const float* b, const float* c,
                              relu_bits_in relu, bool stream);
  void (*backward_apply_nhwc)(const float* x, const float* dy, float* dx, region r,
                              const float* mean, const float* a, const float* b, const float* c,
                              relu_bits_in relu, bool stream);
};

// The table for this process: chosen on first use from the CPU and the
// environment variable BNORM_ISA (which may only lower the choice).
const kernel_table& kernels();

// One per instruction set, each defined in its arch_*.cpp.
kernel_table sse2_kernels();
kernel_table avx2_kernels();
kernel_table avx512_kernels();

}  // namespace bnorm
