// Robustness requirements (issue 4): statistics accurate whatever the offset, no overflow for
// large finite inputs, NaN/Inf confined to their channel, results independent of the thread
// count and of pointer alignment, bit for bit.
#include <bnorm/bnorm.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bnorm_tester.hpp"
#include "reference.hpp"
#include "test_support.hpp"

namespace bnorm_test {
namespace {

const bnorm_layout kLayouts[] = {BNORM_NCHW, BNORM_NHWC};

// ---- Accuracy with a large offset -------------------------------------------------------------

// Exact statistics of float data: the sum of m <= 2^20 floats of magnitude <= 2^20 spans fewer
// than 64 bits, so a long double (x87, 64-bit significand) accumulates it exactly; the
// two-pass variance then carries only long double rounding (~2^-64 relative).
struct ExactStats {
  std::vector<long double> mean, var;
};

ExactStats exact_stats(const bnorm_shape& sh, const std::vector<float>& x) {
  ExactStats e;
  e.mean.assign(sh.c, 0.0L);
  e.var.assign(sh.c, 0.0L);
  const long double m = (long double)(sh.n * sh.spatial);
  for (int64_t c = 0; c < sh.c; ++c) {
    long double sum = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) sum += x[bnorm_ref::index(sh, n, c, s)];
    const long double mean = sum / m;
    long double sq = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const long double d = x[bnorm_ref::index(sh, n, c, s)] - mean;
        sq += d * d;
      }
    e.mean[c] = mean;
    e.var[c] = sq / m;
  }
  return e;
}

// True iff f is a float nearest to e (|f - e| <= half an ulp, ties either way).
bool is_nearest_float(float f, long double e) {
  const long double d = std::fabs((long double)f - e);
  return d <= std::fabs((long double)std::nextafter(f, INFINITY) - e) &&
         d <= std::fabs((long double)std::nextafter(f, -INFINITY) - e);
}

double ulp_of(float f) {
  f = std::fabs(f);
  return double(std::nextafter(f, INFINITY)) - double(f);
}

// Forward training of xv (no gamma, beta or mask): the batch mean and variance, and the exact ones.
struct TrainingStats {
  std::vector<float> mean, var;
  ExactStats exact;
};

TrainingStats training_stats(const bnorm_shape& sh, const std::vector<float>& xv) {
  const int64_t count = bnorm_ref::elements(sh);
  Buffer<float> x(count), y(count), mean(sh.c), var(sh.c);
  x.assign(xv);
  TrainingStats s;
  EXPECT_EQ(bnorm_forward_training(&sh, 1e-5f, 0, x.data(), nullptr, nullptr, y.data(),
                                   mean.data(), var.data(), nullptr),
            BNORM_SUCCESS)
      << bnorm_last_error_message();
  s.mean.assign(mean.data(), mean.data() + sh.c);
  s.var.assign(var.data(), var.data() + sh.c);
  s.exact = exact_stats(sh, xv);
  return s;
}

// x = offset + N(0,1)*scale_c. The mean must be the float nearest to the exact mean of the float
// inputs, the variance within 1e-3 relative, and y within the error that rounding the mean to
// float forces: |gamma|*invstd*ulp(mean)/2, plus the library's own variance error propagated
// (|gamma*xhat|*|dvar|/(2(var+eps))), plus 8u of the output scale for the normalization itself
// (see bnorm_tester.hpp). A kernel computing E[x^2]-E[x]^2 in float, or summing 1e5-sized values
// in float, misses the mean by many ulps and the variance by far more than 1e-3; a kernel
// computing y as x*scale + (beta - mean*scale) loses u*|x*scale| ~ 1e5*u*|gamma|/std, about
// twice the allowance. NCHW 16x70x4 runs as an NHWC tensor of 280 columns (fold's spread), whose
// columns' moments merge_columns unites.
TEST(Robustness, StatisticsAccurateWithLargeOffset) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{8, 5, 1000}, {1, 3, 65537}, {4096, 17, 1},
                {3, 33, 251}, {70, 67, 49},  {16, 70, 4}};
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes)
      for (double offset : {1e5, -1e6}) {
        ++k;
        const bnorm_shape sh{t.n, t.c, t.s, layout};
        SCOPED_TRACE(describe(sh) + " offset=" + std::to_string(offset));
        std::mt19937_64 rng(4000 + k);
        std::normal_distribution<double> z;
        std::uniform_real_distribution<double> scale(0.5, 2);
        std::vector<double> sc(t.c);
        for (auto& v : sc) v = scale(rng);
        const int64_t count = bnorm_ref::elements(sh);
        std::vector<float> xv(count);
        for (int64_t i = 0; i < count; ++i) xv[i] = float(offset + sc[channel_of(sh, i)] * z(rng));
        const std::vector<float> gv = random_gamma(t.c, rng), bv = random_uniform(t.c, -1, 1, rng);
        const float eps = 1e-5f;
        Buffer<float> x(count), y(count), mean(t.c), var(t.c), gamma(t.c), beta(t.c);
        x.assign(xv);
        gamma.assign(gv);
        beta.assign(bv);
        ASSERT_EQ(bnorm_forward_training(&sh, eps, 0, x.data(), gamma.data(), beta.data(), y.data(),
                                         mean.data(), var.data(), nullptr),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        const ExactStats e = exact_stats(sh, xv);
        std::vector<double> dvar_rel(t.c);
        for (int64_t c = 0; c < t.c; ++c) {
          EXPECT_TRUE(is_nearest_float(mean[c], e.mean[c]))
              << "c=" << c << ": mean " << mean[c] << " is "
              << double(((long double)mean[c] - e.mean[c]) / ulp_of(float(e.mean[c])))
              << " ulp from the exact " << double(e.mean[c]) << " (allowed: 0.5)";
          const double rel = double(std::fabs((long double)var[c] - e.var[c]) / e.var[c]);
          dvar_rel[c] = double(std::fabs((long double)var[c] - e.var[c]) / (e.var[c] + eps));
          EXPECT_LE(rel, 1e-3) << "c=" << c << ": var " << var[c] << " exact " << double(e.var[c]);
        }
        std::vector<double> want(count);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t c = channel_of(sh, i);
          want[i] =
              double(gv[c] * ((long double)xv[i] - e.mean[c]) / std::sqrt(e.var[c] + eps) + bv[c]);
        }
        auto y_tol = [&](int64_t i) {
          const int64_t c = channel_of(sh, i);
          const double invstd = 1.0 / std::sqrt(double(e.var[c]) + eps);
          const double g = std::fabs(gv[c]);
          const double gxhat = g * std::fabs(double(xv[i] - e.mean[c])) * invstd;
          return g * invstd * 0.5 * ulp_of(float(e.mean[c])) + gxhat * dvar_rel[c] / 2 +
                 8 * kU * (gxhat + std::fabs(bv[c]));
        };
        EXPECT_TRUE(close_elements("y", sh, y.data(), want, y_tol));
        if (HasFailure()) return;
      }
}

// NHWC with many rows: chunks after the first of a slice are reduced in one pass around the
// previous chunk's means, the first chunks of the other slices around the first chunk's means,
// and a chunk whose mean is far from that shift must be reduced again with two passes. Rows here jump by 100 standard deviations every 256 rows (one chunk), and
// there are more chunks (70) than slices (64), so some slices hold two chunks with different
// means; 520 channels take the row-order kernels (>= 512) and one group of 8 channels the
// column kernels. Mean and variance as in StatisticsAccurateWithLargeOffset.
TEST(Robustness, DriftingChunksKeepStatisticsAccurate) {
  const bnorm_shape sh{70, 520, 256, BNORM_NHWC};
  const int64_t count = bnorm_ref::elements(sh), rows = sh.n * sh.spatial;
  std::mt19937_64 rng(77);
  std::normal_distribution<double> z;
  std::vector<float> xv(count);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < sh.c; ++c)
      xv[r * sh.c + c] = float(100.0 * double((r / 256) % 5) + z(rng));
  const TrainingStats s = training_stats(sh, xv);
  const std::vector<float>&mean = s.mean, &var = s.var;
  const ExactStats& e = s.exact;
  for (int64_t c = 0; c < sh.c; ++c) {
    EXPECT_TRUE(is_nearest_float(mean[c], e.mean[c]))
        << "c=" << c << ": mean " << mean[c] << " exact " << double(e.mean[c]);
    EXPECT_LE(double(std::fabs((long double)var[c] - e.var[c]) / e.var[c]), 1e-3)
        << "c=" << c << ": var " << var[c] << " exact " << double(e.var[c]);
    if (HasFailure()) return;
  }
}

// NCHW: a slice's first chunk of several images is reduced in one pass around the mean of
// its first images (at least 128 values: one 14x14 image, three 7x7 ones), and must be
// reduced again with two passes when that is far from the chunk's mean. Here image 0 of
// every channel sits 3000 standard deviations above the others: around its mean, the
// one-pass variance would cancel (sum of d^2 is up to 20 times M2) and lose a digit. 14x14
// images: 20 per chunk (moments_nchw), and at batch 10 a channel is one chunk of the group
// kernel (moments_nchw_group); 7x7 images: 83 per chunk at batch 100, the group kernel at
// batch 40. Batch 1 with 56x56 images: one chunk of one row per channel, reduced around the
// mean of every 8th vector; there the first 16 values of every 128 of each channel are the
// outliers (all that AVX-512 samples, part of it with narrower vectors). The variance must be
// as close as two passes get it.
TEST(Robustness, OutlierFirstImageKeepsStatisticsAccurate) {
  const struct {
    int64_t n, spatial;
  } shapes[] = {{10, 196}, {40, 196}, {1, 3136}, {40, 49}, {100, 49}};
  for (const auto& t : shapes) {
    const int64_t n = t.n;
    const bnorm_shape sh{n, 64, t.spatial, BNORM_NCHW};
    SCOPED_TRACE(describe(sh));
    const int64_t count = bnorm_ref::elements(sh);
    std::mt19937_64 rng(78);
    std::normal_distribution<double> z;
    std::vector<float> xv(count);
    for (int64_t i = 0; i < count; ++i) {
      const bool outlier = n == 1 ? i % sh.spatial % 128 < 16 : i / (sh.c * sh.spatial) == 0;
      xv[i] = float((outlier ? 3000.0 : 0.0) + z(rng));
    }
    const TrainingStats s = training_stats(sh, xv);
    const std::vector<float>&mean = s.mean, &var = s.var;
    const ExactStats& e = s.exact;
    for (int64_t c = 0; c < sh.c; ++c) {
      EXPECT_LE(double(std::fabs((long double)mean[c] - e.mean[c]) / std::sqrt(e.var[c])), 1e-6)
          << "c=" << c << ": mean " << mean[c] << " exact " << double(e.mean[c]);
      EXPECT_LE(double(std::fabs((long double)var[c] - e.var[c]) / e.var[c]), 8e-7)
          << "c=" << c << ": var " << var[c] << " exact " << double(e.var[c]);
      if (HasFailure()) return;
    }
  }
}

// A constant channel has variance exactly 0 and y exactly beta, whatever the constant; the
// other channels are ordinary (in NCHW 16x70x4 also through merge_columns: fold's spread).
TEST(Robustness, ConstantChannelIsExact) {
  const float constants[] = {1e7f, 10000001.0f, -12345.678f, 3.0e-3f, -7.5e6f};
  struct {
    int64_t n, c, s;
  } shapes[] = {{4, 5, 3001}, {1, 17, 4099}, {6000, 3, 1}, {2, 33, 64}, {16, 70, 4}};
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes)
      for (float value : constants)
        for (bool relu : {false, true}) {
          ++k;
          const bnorm_shape sh{t.n, t.c, t.s, layout};
          const int64_t bad = (k * 7) % t.c;
          SCOPED_TRACE(describe(sh) + " constant " + std::to_string(value) + " in channel " +
                       std::to_string(bad) + (relu ? " relu" : ""));
          std::mt19937_64 rng(6000 + k);
          const int64_t count = bnorm_ref::elements(sh);
          std::vector<float> xv = random_x(sh, 0, rng);
          for (int64_t i = 0; i < count; ++i)
            if (channel_of(sh, i) == bad) xv[i] = value;
          std::vector<float> gv = random_gamma(t.c, rng), bv = random_uniform(t.c, -1, 1, rng);
          Buffer<float> x(count), y(count), mean(t.c), var(t.c), gamma(t.c), beta(t.c);
          Buffer<uint8_t> mask((count + 7) / 8);
          x.assign(xv);
          gamma.assign(gv);
          beta.assign(bv);
          ASSERT_EQ(bnorm_forward_training(&sh, 1e-5f, relu ? BNORM_FUSE_RELU : 0, x.data(),
                                           gamma.data(), beta.data(), y.data(), mean.data(),
                                           var.data(), relu ? mask.data() : nullptr),
                    BNORM_SUCCESS)
              << bnorm_last_error_message();
          EXPECT_EQ(var[bad], 0.0f) << "variance of a constant channel";
          EXPECT_EQ(mean[bad], value) << "mean of a constant channel";
          const float want = relu ? std::max(bv[bad], 0.0f) : bv[bad];
          int64_t wrong = 0, first = -1;
          for (int64_t i = 0; i < count; ++i)
            if (channel_of(sh, i) == bad && !(y[i] == want) && wrong++ == 0) first = i;
          EXPECT_EQ(wrong, 0) << wrong << " outputs of the constant channel are not beta (" << want
                              << "); first " << where(sh, first)
                              << " y=" << y[std::max<int64_t>(first, 0)];
          if (HasFailure()) return;
        }
}

// Finite inputs up to 1e18 in magnitude: sums of squares reach m*1e36, beyond float range, so a
// float accumulator overflows. Statistics and outputs must be finite and as accurate (relative
// to the data's scale) as for ordinary data: the tolerances of bnorm_tester.hpp.
TEST(Robustness, NoOverflowForLargeFiniteInputs) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{4, 3, 1024}, {5000, 17, 1}, {2, 64, 33}};
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes)
      for (double magnitude : {1e18, 3e15}) {
        ++k;
        const bnorm_shape sh{t.n, t.c, t.s, layout};
        SCOPED_TRACE(describe(sh) + " magnitude " + std::to_string(magnitude));
        std::mt19937_64 rng(7000 + k);
        std::normal_distribution<double> z;
        std::uniform_real_distribution<double> shift(-0.3, 0.3);
        std::vector<double> sc(t.c);
        for (auto& v : sc) v = shift(rng);
        const int64_t count = bnorm_ref::elements(sh);
        std::vector<float> xv(count);
        for (int64_t i = 0; i < count; ++i) {
          const double v = magnitude * (sc[channel_of(sh, i)] + 0.2 * z(rng));
          xv[i] = float(std::max(-magnitude, std::min(magnitude, v)));
        }
        const std::vector<float> gv = random_gamma(t.c, rng), bv = random_uniform(t.c, -1, 1, rng);
        const std::vector<float> dyv = random_normal(count, rng);
        const float eps = 1e-5f;
        Buffer<float> x(count), y(count), mean(t.c), var(t.c), gamma(t.c), beta(t.c), dy(count),
            dx(count), dgamma(t.c), dbeta(t.c);
        x.assign(xv);
        gamma.assign(gv);
        beta.assign(bv);
        dy.assign(dyv);
        ASSERT_EQ(bnorm_forward_training(&sh, eps, 0, x.data(), gamma.data(), beta.data(), y.data(),
                                         mean.data(), var.data(), nullptr),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        const bnorm_ref::Stats ref = bnorm_ref::batch_stats(sh, xv.data());
        std::vector<double> max_abs(t.c, 0.0);
        for (int64_t i = 0; i < count; ++i)
          max_abs[channel_of(sh, i)] =
              std::max(max_abs[channel_of(sh, i)], std::fabs(double(xv[i])));
        EXPECT_TRUE(close_channels("mean", sh, mean.data(), ref.mean,
                                   [&](int64_t c) { return 1e-5 * max_abs[c]; }));
        EXPECT_TRUE(close_channels("var", sh, var.data(), ref.var, [&](int64_t c) {
          const double d = 1e-5 * max_abs[c];
          return 1e-5 * ref.var[c] + d * d;
        }));
        std::vector<double> yref, pre;
        bnorm_ref::normalize(sh, eps, false, xv.data(), gv.data(), bv.data(),
                             std::vector<double>(mean.data(), mean.data() + t.c),
                             std::vector<double>(var.data(), var.data() + t.c), yref, pre);
        const auto ytol =
            y_tolerance(sh, eps, xv.data(), gv.data(), bv.data(), mean.data(), var.data());
        EXPECT_TRUE(close_elements("y", sh, y.data(), yref,
                                   [&](int64_t i) { return ytol[channel_of(sh, i)]; }));

        ASSERT_EQ(bnorm_backward(&sh, eps, 0, x.data(), dy.data(), gamma.data(), mean.data(),
                                 var.data(), nullptr, dx.data(), dgamma.data(), dbeta.data()),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        const bnorm_ref::Grads g = bnorm_ref::backward(sh, eps, false, false, xv.data(), dyv.data(),
                                                       gv.data(), mean.data(), var.data(), nullptr);
        const BackwardTolerance bt =
            backward_tolerance(sh, eps, false, false, xv.data(), dyv.data(), gv.data(), mean.data(),
                               var.data(), nullptr, g);
        EXPECT_TRUE(close_elements("dx", sh, dx.data(), g.dx, [&](int64_t i) { return bt.dx[i]; }));
        EXPECT_TRUE(close_channels("dgamma", sh, dgamma.data(), g.dgamma,
                                   [&](int64_t c) { return bt.dgamma[c]; }));
        EXPECT_TRUE(close_channels("dbeta", sh, dbeta.data(), g.dbeta,
                                   [&](int64_t c) { return bt.dbeta[c]; }));
        if (HasFailure()) return;
      }
}

// ---- Bitwise reproducibility ------------------------------------------------------------------

struct Problem {
  bnorm_shape sh;
  float eps;
  std::vector<float> x, gamma, beta, dy, run_mean, run_var;
};

Problem make_problem(const bnorm_shape& sh, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Problem p{sh,
            1e-3f,
            random_x(sh, 3, rng),
            random_gamma(sh.c, rng),
            random_uniform(sh.c, -1, 1, rng),
            random_normal(bnorm_ref::elements(sh), rng),
            {},
            {}};
  const bnorm_ref::Stats st = bnorm_ref::batch_stats(sh, p.x.data());
  for (int64_t c = 0; c < sh.c; ++c) {
    p.run_mean.push_back(float(st.mean[c] + 0.1));
    p.run_var.push_back(float(st.var[c] * 1.1));
  }
  return p;
}

// Where each array starts, in floats (bytes for the mask) past a 64-byte boundary.
struct Offsets {
  size_t x = 0, y = 0, gamma = 0, beta = 0, mean = 0, var = 0, dy = 0, dx = 0, mask = 0;
  std::string str() const {
    return "offsets x" + std::to_string(x) + " y" + std::to_string(y) + " gamma" +
           std::to_string(gamma) + " beta" + std::to_string(beta) + " mean" + std::to_string(mean) +
           " var" + std::to_string(var) + " dy" + std::to_string(dy) + " dx" + std::to_string(dx) +
           " mask" + std::to_string(mask);
  }
};

struct Outputs {
  // training with ReLU (y, mean, var, mask) and without (y_plain); inference with running
  // statistics; backward with the training statistics and mask; backward with GLOBAL_STATS.
  std::vector<float> y, mean, var, y_plain, y_inference, dx, dgamma, dbeta, dx_global,
      dgamma_global, dbeta_global;
  std::vector<uint8_t> mask;
};

// in_place: the forward operations read x from y (y first holds x), the backward dy from dx.
Outputs run_all(const Problem& p, const Offsets& o, bool in_place = false) {
  const bnorm_shape& sh = p.sh;
  const int64_t count = bnorm_ref::elements(sh), c = sh.c;
  Buffer<float> x(count, o.x), y(count, o.y), gamma(c, o.gamma), beta(c, o.beta), mean(c, o.mean),
      var(c, o.var), dy(count, o.dy), dx(count, o.dx), dgamma(c, o.gamma), dbeta(c, o.beta),
      rmean(c, o.mean), rvar(c, o.var);
  Buffer<uint8_t> mask((count + 7) / 8, o.mask);
  x.assign(p.x);
  gamma.assign(p.gamma);
  beta.assign(p.beta);
  dy.assign(p.dy);
  rmean.assign(p.run_mean);
  rvar.assign(p.run_var);
  Outputs out;
  auto ok = [&](bnorm_status st, const char* op) {
    EXPECT_EQ(st, BNORM_SUCCESS) << op << ": " << bnorm_last_error_message();
  };
  auto x_in = [&] {
    if (!in_place) return x.data();
    y.assign(p.x);
    return y.data();
  };
  auto dy_in = [&] {
    if (!in_place) return dy.data();
    dx.assign(p.dy);
    return dx.data();
  };
  ok(bnorm_forward_training(&sh, p.eps, 0, x_in(), gamma.data(), beta.data(), y.data(), mean.data(),
                            var.data(), nullptr),
     "forward_training");
  out.y_plain = y.values();
  ok(bnorm_forward_training(&sh, p.eps, BNORM_FUSE_RELU, x_in(), gamma.data(), beta.data(),
                            y.data(), mean.data(), var.data(), mask.data()),
     "forward_training relu");
  out.y = y.values();
  out.mean = mean.values();
  out.var = var.values();
  out.mask = mask.values();
  ok(bnorm_forward_inference(&sh, p.eps, 0, x_in(), gamma.data(), beta.data(), rmean.data(),
                             rvar.data(), y.data()),
     "forward_inference");
  out.y_inference = y.values();
  ok(bnorm_backward(&sh, p.eps, BNORM_FUSE_RELU, x.data(), dy_in(), gamma.data(), mean.data(),
                    var.data(), mask.data(), dx.data(), dgamma.data(), dbeta.data()),
     "backward relu");
  out.dx = dx.values();
  out.dgamma = dgamma.values();
  out.dbeta = dbeta.values();
  ok(bnorm_backward(&sh, p.eps, BNORM_GLOBAL_STATS, x.data(), dy_in(), gamma.data(), rmean.data(),
                    rvar.data(), nullptr, dx.data(), dgamma.data(), dbeta.data()),
     "backward global_stats");
  out.dx_global = dx.values();
  out.dgamma_global = dgamma.values();
  out.dbeta_global = dbeta.values();
  EXPECT_TRUE(x.guards_intact() && y.guards_intact() && mean.guards_intact() &&
              var.guards_intact() && dx.guards_intact() && dgamma.guards_intact() &&
              dbeta.guards_intact() && mask.guards_intact())
      << "an operation wrote outside its output";
  return out;
}

// Bitwise comparison of every output; one failure per differing array.
void expect_identical(const Outputs& a, const Outputs& b, const bnorm_shape& sh,
                      const std::string& what) {
  auto cmp = [&](const char* name, const std::vector<float>& u, const std::vector<float>& v,
                 bool per_channel) {
    const int64_t d = first_bit_difference(u.data(), v.data(), u.size());
    EXPECT_EQ(d, -1) << what << ": " << name << " differs from the reference run at "
                     << (per_channel ? "c=" + std::to_string(d) : where(sh, d)) << ": "
                     << (d >= 0 ? std::to_string(v[d]) + " vs " + std::to_string(u[d]) : "");
  };
  cmp("training y (relu)", a.y, b.y, false);
  cmp("training y", a.y_plain, b.y_plain, false);
  cmp("mean", a.mean, b.mean, true);
  cmp("var", a.var, b.var, true);
  cmp("inference y", a.y_inference, b.y_inference, false);
  cmp("backward dx", a.dx, b.dx, false);
  cmp("backward dgamma", a.dgamma, b.dgamma, true);
  cmp("backward dbeta", a.dbeta, b.dbeta, true);
  cmp("global-stats dx", a.dx_global, b.dx_global, false);
  cmp("global-stats dgamma", a.dgamma_global, b.dgamma_global, true);
  cmp("global-stats dbeta", a.dbeta_global, b.dbeta_global, true);
  // The mask's used bits (bits past the last element of the last byte are unspecified).
  const int64_t count = bnorm_ref::elements(sh);
  int64_t d = -1;
  for (int64_t i = 0; i < count && d < 0; ++i)
    if (bnorm_ref::mask_bit(a.mask.data(), i) != bnorm_ref::mask_bit(b.mask.data(), i)) d = i;
  EXPECT_EQ(d, -1) << what << ": relu mask differs from the reference run at " << where(sh, d);
}

struct OmpThreadsGuard {
  int saved = omp_get_max_threads();
  ~OmpThreadsGuard() { omp_set_num_threads(saved); }
};

// Every output bitwise identical for any thread count and across repeated runs: awkward shapes
// (prime sizes; fewer channels than threads with a long reduction; many more channels than
// threads; NHWC with too few row chunks for the threads, which then split the columns, with C
// not a multiple of 8 so that threads share mask bytes; NCHW planes of 3 values at 300 images,
// run as an NHWC tensor of 192 columns, and of 9 values, reduced image after image past 256
// images), both layouts.
TEST(Robustness, DeterministicAcrossThreadCounts) {
  OmpThreadsGuard guard;
  const int threads[] = {1, 2, 3, 4, 7, 16, 64};
  struct {
    int64_t n, c, s;
  } shapes[] = {
      // {12, 128, 169}: in NHWC 8 slices around the pilot, rows of 128 channels (one group).
      {1, 3, (1 << 18) + 7}, {2, 1, 300007}, {2, 1031, 17}, {3, 5, 33},
      {997, 3, 1},           {3, 1500, 23},  {5, 333, 113}, {66, 70, 49},
      {300, 64, 3},          {300, 64, 9},   {12, 128, 169}};
  std::printf("bnorm_isa() = %s\n", bnorm_isa());
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes) {
      const bnorm_shape sh{t.n, t.c, t.s, layout};
      SCOPED_TRACE(describe(sh));
      const Problem p = make_problem(sh, 8000 + k++);
      omp_set_num_threads(1);
      const Outputs ref = run_all(p, Offsets{});
      for (int nt : threads) {
        omp_set_num_threads(nt);
        for (int rep = 0; rep < 2; ++rep)
          expect_identical(ref, run_all(p, Offsets{}), sh,
                           std::to_string(nt) + " threads, run " + std::to_string(rep + 1));
        if (HasFailure()) return;
      }
    }
}

struct OmpLevelsGuard {
  int saved = omp_get_max_active_levels();
  ~OmpLevelsGuard() { omp_set_max_active_levels(saved); }
};

// Calls from inside the caller's own parallel region: every thread of a team of four runs its
// own problems, with nested parallelism off (each call then runs on one thread, and its
// barriers must not bind to the caller's team) and on (each call a team of its own inside the
// caller's). The results are those of a lone call. Shapes below and above the size that takes
// a second thread, both layouts; 1x2048x49 NHWC has the threads split its columns.
TEST(Robustness, CallsFromInsideAParallelRegion) {
  OmpThreadsGuard guard;
  OmpLevelsGuard levels_guard;
  struct {
    int64_t n, c, s;
  } shapes[] = {{3, 5, 33}, {4, 64, 1024}, {2, 70, 1500}, {1, 2048, 49}};
  std::vector<Problem> problems;
  std::vector<Outputs> alone;
  omp_set_num_threads(2);
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes) {
      problems.push_back(make_problem(bnorm_shape{t.n, t.c, t.s, layout}, 9700 + k++));
      alone.push_back(run_all(problems.back(), Offsets{}));
    }
  const int count = static_cast<int>(problems.size());
  constexpr int kCallers = 4;
  for (int levels : {1, 2}) {
    omp_set_max_active_levels(levels);
    std::vector<Outputs> got(static_cast<size_t>(kCallers * count));
#pragma omp parallel num_threads(kCallers)
    {
      const int t = omp_get_thread_num();
      for (int i = 0; i < count; ++i) {
        const int j = (i + t) % count;  // callers on different problems at once
        got[static_cast<size_t>(t * count + j)] =
            run_all(problems[static_cast<size_t>(j)], Offsets{});
      }
    }
    for (int t = 0; t < kCallers; ++t)
      for (int j = 0; j < count; ++j)
        expect_identical(
            alone[static_cast<size_t>(j)], got[static_cast<size_t>(t * count + j)],
            problems[static_cast<size_t>(j)].sh,
            "caller " + std::to_string(t) + ", max active levels " + std::to_string(levels));
  }
}

// Each calling thread keeps its scratch blocks for its next calls (kernels/batchnorm.cpp,
// scratch_cache). A call that reuses the blocks of calls on other problems, full of their
// values, gives the bits of the same call in a new thread; so does each problem's second call.
TEST(Robustness, ReusedScratchGivesTheSameBits) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{8, 2048, 49}, {3, 5, 33}, {2, 70, 1500}, {600, 77, 1}, {4, 64, 1024}};
  std::vector<Problem> problems;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes)
      problems.push_back(make_problem(bnorm_shape{t.n, t.c, t.s, layout},
                                      9800 + static_cast<int>(problems.size())));
  const size_t count = problems.size();
  std::vector<Outputs> fresh(count), reused(2 * count);
  for (size_t j = 0; j < count; ++j)
    std::thread([&] { fresh[j] = run_all(problems[j], Offsets{}); }).join();
  std::thread([&] {
    for (size_t i = 0; i < 2 * count; ++i) reused[i] = run_all(problems[i % count], Offsets{});
  }).join();
  for (size_t i = 0; i < 2 * count; ++i)
    expect_identical(fresh[i % count], reused[i], problems[i % count].sh,
                     "call " + std::to_string(i) + " of one thread");
}

// A call from a thread_local destructor that runs after the thread's scratch cache is gone (the
// object is built before the thread's first call, so destroyed after the cache) allocates and
// frees as without the cache, and gives the same bits. (Under AddressSanitizer, taking blocks
// from the destroyed cache was a use after free.)
TEST(Robustness, CallsFromThreadExitAfterTheScratchCache) {
  const bnorm_shape sh{64, 70, 49, BNORM_NCHW};
  const Problem p = make_problem(sh, 9900);
  const Outputs want = run_all(p, Offsets{});
  Outputs first, last;
  struct at_exit {
    std::function<void()> f;
    ~at_exit() { f(); }
  };
  std::thread([&] {
    thread_local at_exit late{[&] { last = run_all(p, Offsets{}); }};
    first = run_all(p, Offsets{});
  }).join();
  expect_identical(want, first, sh, "first call of the thread");
  expect_identical(want, last, sh, "call from a thread_local destructor");
}

// The outputs of run_all from the split-phase API with one set of moments and sums:
// moments -> merge -> normalize, backward_reduce -> backward_apply.
Outputs run_split(const Problem& p) {
  const bnorm_shape& sh = p.sh;
  const int64_t count = bnorm_ref::elements(sh), c = sh.c, values = sh.n * sh.spatial;
  std::vector<float> y(count), mean(c), var(c), dx(count), dgamma(c), dbeta(c);
  std::vector<double> m(c), m2(c), sum_dy(c), sum_dy_xhat(c);
  std::vector<uint8_t> mask((count + 7) / 8);
  auto ok = [&](bnorm_status st, const char* op) {
    EXPECT_EQ(st, BNORM_SUCCESS) << op << ": " << bnorm_last_error_message();
  };
  ok(bnorm_moments(&sh, p.x.data(), m.data(), m2.data()), "moments");
  ok(bnorm_merge_moments(1, c, &values, m.data(), m2.data(), mean.data(), var.data()), "merge");
  Outputs out;
  out.mean = mean;
  out.var = var;
  ok(bnorm_normalize(&sh, p.eps, 0, p.x.data(), p.gamma.data(), p.beta.data(), mean.data(),
                     var.data(), y.data(), nullptr),
     "normalize");
  out.y_plain = y;
  ok(bnorm_normalize(&sh, p.eps, BNORM_FUSE_RELU, p.x.data(), p.gamma.data(), p.beta.data(),
                     mean.data(), var.data(), y.data(), mask.data()),
     "normalize relu");
  out.y = y;
  out.mask = mask;
  ok(bnorm_forward_inference(&sh, p.eps, 0, p.x.data(), p.gamma.data(), p.beta.data(),
                             p.run_mean.data(), p.run_var.data(), y.data()),
     "forward_inference");
  out.y_inference = y;
  // Backward with the training statistics and mask, then with GLOBAL_STATS.
  const struct {
    unsigned flags;
    const float *mean, *var;
    const uint8_t* mask;
  } passes[] = {{BNORM_FUSE_RELU, mean.data(), var.data(), mask.data()},
                {BNORM_GLOBAL_STATS, p.run_mean.data(), p.run_var.data(), nullptr}};
  for (const auto& b : passes) {
    ok(bnorm_backward_reduce(&sh, p.eps, b.flags, p.x.data(), p.dy.data(), b.mean, b.var, b.mask,
                             sum_dy.data(), sum_dy_xhat.data()),
       "backward_reduce");
    ok(bnorm_backward_apply(&sh, p.eps, b.flags, p.x.data(), p.dy.data(), p.gamma.data(), b.mean,
                            b.var, b.mask, sum_dy.data(), sum_dy_xhat.data(), values, dx.data()),
       "backward_apply");
    for (int64_t j = 0; j < c; ++j) {
      dgamma[j] = static_cast<float>(sum_dy_xhat[j]);
      dbeta[j] = static_cast<float>(sum_dy[j]);
    }
    (b.mask ? out.dx : out.dx_global) = dx;
    (b.mask ? out.dgamma : out.dgamma_global) = dgamma;
    (b.mask ? out.dbeta : out.dbeta_global) = dbeta;
  }
  return out;
}

struct TestShape {
  int64_t n, c, s;
};

// Calls check(shape, seed) for every shape in both layouts on 1 and 2 threads, the seeds
// counting from `seed`; stops at the first failure.
template <class Check>
void for_shapes_and_threads(const std::vector<TestShape>& shapes, uint64_t seed, Check check) {
  OmpThreadsGuard guard;
  for (int nt : {1, 2})
    for (bnorm_layout layout : kLayouts)
      for (const TestShape& t : shapes) {
        omp_set_num_threads(nt);
        const bnorm_shape sh{t.n, t.c, t.s, layout};
        SCOPED_TRACE(describe(sh) + ", " + std::to_string(nt) + " threads");
        check(sh, seed++);
        if (::testing::Test::HasFailure()) return;
      }
}

// The operators are bitwise their split-phase forms (bnorm.h promises it), whichever path
// they take: NCHW channel blocks fused in cache (in the small_cache run, BNORM_CACHE_BYTES: they
// are used only beyond the L3), NCHW phases, NHWC column blocks fused in cache with one slice of
// rows and with several, NHWC phases; 1 and 2 threads. Every third gamma is 0 (models start some
// there): the backward's coefficients are then zeros whose signs reach dx, and the operators
// compute them in vector lanes where backward_apply computes them one channel at a time (the
// AVX-512 negation of session 18's first version gave +0 for -0). The last shape's channels
// (80000 values, 640 KB of x and dy) are larger than a quarter of any L2 up to 2 MiB: with
// BNORM_CACHE_BYTES = 16 MiB (ctest's l3_blocks run) the NCHW backward takes blocks sized
// from the L3, and so does the forward training of 2x64x20000 (one slice, 160 KB of x a
// channel; 10 MB with 1.5 MB blocks). NCHW 16x70x4 runs as an NHWC tensor (fold's spread) in every
// entry point; the backward of 4x2500 and 30x2048 (few rows) in column blocks of 1024 (few_rows).
// The forward training and backward of 64x64x196 (short planes reduced by the plane walk) take
// blocks of 8 channels in the small_cache run, with ReLU too (each image's part of a block starts
// on a mask byte), and 66x68x196 blocks that end on the last channel (68 is not a multiple of 8).
TEST(Robustness, OperatorsAreBitwiseTheirSplitPhases) {
  const std::vector<TestShape> shapes = {
      {4, 64, 1024}, {3, 5, 33},     {1, 300, 49},  {3, 130, 200},  {2, 70, 1500}, {600, 77, 1},
      {8, 200, 49},  {70, 67, 49},   {20, 80, 196}, {2, 24, 40000}, {16, 70, 4},   {4, 2500, 1},
      {30, 2048, 1}, {2, 64, 20000}, {64, 64, 196}, {66, 68, 196}};
  for_shapes_and_threads(shapes, 9500, [](const bnorm_shape& sh, uint64_t seed) {
    Problem p = make_problem(sh, seed);
    for (size_t j = 0; j < p.gamma.size(); j += 3) p.gamma[j] = 0.f;
    expect_identical(run_all(p, Offsets{}), run_split(p), sh, "split phases");
  });
}

// In place (y == x, dx == dy) gives the same bits as separate buffers. The NCHW elementwise
// passes in cache walk rows that are not whole vectors (7x7, 14x14, 5x5, 3x3) channel by channel
// with separate buffers (walk_channels: the last vector of a channel overlaps the one before)
// and in memory order in place (walk_vectors), so this compares the two walks; 1 and 2 threads
// (the runs of two threads start and end inside channels).
TEST(Robustness, InPlaceGivesIdenticalResults) {
  // The last two shapes take two threads.
  const std::vector<TestShape> shapes = {{3, 40, 49}, {2, 37, 196}, {4, 19, 25},  {5, 33, 9},
                                         {1, 70, 17}, {2, 9, 100},  {8, 330, 49}, {4, 170, 196}};
  for_shapes_and_threads(shapes, 9700, [](const bnorm_shape& sh, uint64_t seed) {
    const Problem p = make_problem(sh, seed);
    expect_identical(run_all(p, Offsets{}), run_all(p, Offsets{}, true), sh, "in place");
  });
}

// Any float alignment of every pointer gives the same bits as the 64-byte-aligned run. The last
// two shapes (1 MB) stream their outputs when the tests run with a 1 MiB cache (small_cache):
// the elementwise kernels then start each run with a head that aligns the stores, and NHWC rows
// of 48 channels have vectors that run from one row into the next.
TEST(Robustness, AnyAlignmentGivesIdenticalResults) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{3, 17, 33}, {2, 64, 15}, {5, 251, 3}, {100, 33, 1}, {2, 3, 1031},
                {2, 64, 2100}, {8, 48, 700}};
  std::vector<Offsets> offsets;
  for (size_t k : {1, 2, 3}) offsets.push_back({k, k, k, k, k, k, k, k, k});
  offsets.push_back({1, 2, 3, 0, 1, 2, 3, 1, 5});
  offsets.push_back({3, 0, 2, 1, 3, 1, 0, 2, 3});
  offsets.push_back({0, 3, 1, 2, 2, 3, 1, 3, 1});
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes) {
      const bnorm_shape sh{t.n, t.c, t.s, layout};
      SCOPED_TRACE(describe(sh));
      const Problem p = make_problem(sh, 9000 + k++);
      const Outputs ref = run_all(p, Offsets{});
      for (const Offsets& o : offsets) expect_identical(ref, run_all(p, o), sh, o.str());
      if (HasFailure()) return;
    }
}

// ---- NaN and infinity stay in their channel
// ------------------------------------------------------

// One NaN or infinity in channel `bad`: that channel's var and every y are NaN (mean NaN, or
// infinite for an infinite input), dx and dgamma NaN; every other channel is bitwise equal to
// the run where the bad element held its ordinary value. (NHWC puts neighbouring channels in
// the same vector: a lane-crossing operation would leak the NaN; NCHW 16x70x4 puts a channel's
// 4 columns in one vector, then merges them.)
TEST(Robustness, NonFiniteInputStaysInItsChannel) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{3, 7, 33}, {2, 19, 64}, {50, 17, 1}, {1, 3, 1001}, {66, 70, 49}, {16, 70, 4}};
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  int k = 0;
  for (bnorm_layout layout : kLayouts)
    for (auto& t : shapes)
      for (float bad_value : bad_values) {
        ++k;
        const bnorm_shape sh{t.n, t.c, t.s, layout};
        const int64_t bad_c = (k * 5) % t.c;
        const int64_t bad_i = bnorm_ref::index(sh, t.n / 2, bad_c, t.s / 2);
        SCOPED_TRACE(describe(sh) + " " + std::to_string(bad_value) + " at " + where(sh, bad_i));
        const Problem good = make_problem(sh, 10000 + k);
        Problem badp = good;
        badp.x[bad_i] = bad_value;
        const Outputs a = run_all(good, Offsets{}), b = run_all(badp, Offsets{});
        const int64_t count = bnorm_ref::elements(sh);
        auto same = [](float u, float v) { return std::memcmp(&u, &v, 4) == 0; };
        int64_t leaks = 0, first_leak = -1;
        const char* leak_what = "";
        auto check_elems = [&](const char* name, const std::vector<float>& u,
                               const std::vector<float>& v) {
          for (int64_t i = 0; i < count; ++i)
            if (channel_of(sh, i) != bad_c && !same(u[i], v[i]) && leaks++ == 0)
              first_leak = i, leak_what = name;
        };
        check_elems("training y", a.y_plain, b.y_plain);
        check_elems("training y (relu)", a.y, b.y);
        check_elems("backward dx", a.dx, b.dx);
        check_elems("global-stats dx", a.dx_global, b.dx_global);
        for (int64_t i = 0; i < count; ++i)
          if (channel_of(sh, i) != bad_c &&
              bnorm_ref::mask_bit(a.mask.data(), i) != bnorm_ref::mask_bit(b.mask.data(), i) &&
              leaks++ == 0)
            first_leak = i, leak_what = "mask";
        // Inference uses finite running statistics: only the bad element itself may change.
        for (int64_t i = 0; i < count; ++i)
          if (i != bad_i && !same(a.y_inference[i], b.y_inference[i]) && leaks++ == 0)
            first_leak = i, leak_what = "inference y";
        EXPECT_EQ(leaks, 0) << "a non-finite input changed other elements: first in " << leak_what
                            << " at " << where(sh, first_leak);
        for (int64_t c = 0; c < t.c; ++c) {
          if (c == bad_c) continue;
          EXPECT_TRUE(same(a.mean[c], b.mean[c]) && same(a.var[c], b.var[c]))
              << "statistics of channel " << c << " changed";
          EXPECT_TRUE(same(a.dgamma[c], b.dgamma[c]) && same(a.dbeta[c], b.dbeta[c]) &&
                      same(a.dgamma_global[c], b.dgamma_global[c]) &&
                      same(a.dbeta_global[c], b.dbeta_global[c]))
              << "parameter gradients of channel " << c << " changed";
        }
        if (std::isnan(bad_value))
          EXPECT_TRUE(std::isnan(b.mean[bad_c])) << "mean " << b.mean[bad_c];
        else
          EXPECT_FALSE(std::isfinite(b.mean[bad_c])) << "mean " << b.mean[bad_c];
        EXPECT_TRUE(std::isnan(b.var[bad_c])) << "var " << b.var[bad_c];
        int64_t finite_y = 0, finite_dx = 0;
        for (int64_t i = 0; i < count; ++i)
          if (channel_of(sh, i) == bad_c) {
            finite_y += !std::isnan(b.y_plain[i]);
            finite_dx += !std::isnan(b.dx[i]);
          }
        EXPECT_EQ(finite_y, 0) << "outputs y of the bad channel that are not NaN";
        EXPECT_EQ(finite_dx, 0) << "dx of the bad channel that are not NaN";
        EXPECT_TRUE(std::isnan(b.dgamma[bad_c])) << "dgamma " << b.dgamma[bad_c];
        EXPECT_FALSE(std::isfinite(b.y_inference[bad_i])) << "inference y of the bad element";
        if (HasFailure()) return;
      }
}

}  // namespace
}  // namespace bnorm_test
