// Builder-style tester: one problem (shape, flags, pointer options), every operation run on it and
// every output compared with the double-precision reference in reference.hpp.
//
//   BnormTester().layout(BNORM_NHWC).n(7).c(17).spatial(33).relu(true).Test();
//
// ---- Tolerances, and why they are what they are ---------------------------------------------
// u = 2^-24 is f32's unit roundoff. The inputs are exact floats and the reference is exact to
// ~2^-53, so every difference below is the library's float rounding.
//
// mean:  |mean - ref| <= 1e-5 * max|x_c|. A float sum of m <= 8032 terms kept in W >= 4
//        independent accumulators, divided by m, is off by at most ~m/(2W)*u*max|x| (1000u at
//        m = 8032, W = 4, if every rounding went the same way) and typically (random rounding)
//        by ~sqrt(m)/W*u*max|x| (<= 25u); 1e-5 = 168u leaves room for the typical case many times
//        over. A kernel that drops an element moves the mean by |x_i - mean|/m, which fails at
//        the small m of the sweep (m <= ~500 with offset 0: >= 1e-3*std).
// var:   |var - ref| <= 1e-5*var + (1e-5*max|x_c|)^2. Two-pass: an error d in the mean adds d^2;
//        summing squares in float has the same 1e-5 relative bound as the mean. The unbiased
//        variance differs by var/(m-1) >= 1.2e-4*var for every m <= 8032, so it fails.
// y:     with the statistics the library returned (so this checks the normalization alone),
//        |y - ref| <= 8u*(|gamma|*max|xhat_c| + |beta|) + 4u*|gamma|*|mean|*invstd.
//        scale = gamma/sqrtf(var+eps) carries ~1.5u, (x-mean)*scale+beta another ~1.5u of
//        |gamma*xhat| and 0.5u of |y|: <= ~3.5u of the output scale; 8u leaves headroom. The second
//        term admits the algebraically equal form x*scale + (beta - mean*scale), whose
//        cancellation costs u*|mean*scale|. eps is varied (1e-5, 1e-2, 0.5) against variances in
//        [0.25, 4]: forgetting eps, or adding it outside the square root, changes y by >= 5%.
// dbeta: sum(dy) over m terms: <= 1e-5 * sum|dy| (same argument as the mean).
// dgamma: sum(dy*xhat): 1e-5*sum|dy*xhat| for the summation, plus 4u*(sum|dy*xhat| +
//        cond*sum|dy|) for xhat's own rounding, cond = |mean|*invstd (xhat = x*invstd -
//        mean*invstd loses u*cond per element).
// dx:    propagate the above through gamma*invstd*(dy - dbeta/m - xhat*dgamma/m): 8u of each
//        term's magnitude, plus tol(dbeta)/m and |xhat|*tol(dgamma)/m, plus xhat's rounding times
//        |dgamma|/m. Dropping the mean(dy) or the xhat*mean(dy*xhat) term is off by ~|dy|/sqrt(m),
//        10^3 times the bound at the largest m.
// running stats: 4u of each term's magnitude (two products and a sum, and count/(count-1)).
#ifndef BNORM_TESTS_BNORM_TESTER_HPP
#define BNORM_TESTS_BNORM_TESTER_HPP

#include <bnorm/bnorm.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "reference.hpp"
#include "test_support.hpp"

namespace bnorm_test {

// Per-channel bound on |y - ref| for y = gamma*(x-mean)/sqrt(var+eps)+beta computed in float
// from the given float statistics (see the header comment).
inline std::vector<double> y_tolerance(const bnorm_shape& sh, double eps, const float* x,
                                       const float* gamma, const float* beta, const float* mean,
                                       const float* var) {
  std::vector<double> max_dev(sh.c, 0.0), tol(sh.c);
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t c = 0; c < sh.c; ++c)
      for (int64_t s = 0; s < sh.spatial; ++s)
        max_dev[c] =
            std::max(max_dev[c], std::fabs(double(x[bnorm_ref::index(sh, n, c, s)]) - mean[c]));
  for (int64_t c = 0; c < sh.c; ++c) {
    const double g = gamma ? std::fabs(gamma[c]) : 1.0, b = beta ? std::fabs(beta[c]) : 0.0;
    const double invstd = 1.0 / std::sqrt(double(var[c]) + eps);
    tol[c] = 8 * kU * (g * max_dev[c] * invstd + b) + 4 * kU * g * std::fabs(mean[c]) * invstd;
  }
  return tol;
}

// Bounds for backward outputs (see the header comment).
struct BackwardTolerance {
  std::vector<double> dgamma, dbeta;
  std::vector<double> dx;  // per element
};

inline BackwardTolerance backward_tolerance(const bnorm_shape& sh, double eps, bool relu,
                                            bool global_stats, const float* x, const float* dy,
                                            const float* gamma, const float* mean, const float* var,
                                            const uint8_t* mask, const bnorm_ref::Grads& ref) {
  BackwardTolerance t;
  t.dgamma.assign(sh.c, 0.0);
  t.dbeta.assign(sh.c, 0.0);
  t.dx.assign(bnorm_ref::elements(sh), 0.0);
  const double m = double(sh.n * sh.spatial);
  for (int64_t c = 0; c < sh.c; ++c) {
    const double invstd = 1.0 / std::sqrt(double(var[c]) + eps);
    const double cond = std::fabs(mean[c]) * invstd;
    const double g = gamma ? std::fabs(gamma[c]) : 1.0;
    double sum_abs_dy = 0, sum_abs_dy_xhat = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = bnorm_ref::index(sh, n, c, s);
        const double d = (relu && !bnorm_ref::mask_bit(mask, i)) ? 0.0 : std::fabs(dy[i]);
        sum_abs_dy += d;
        sum_abs_dy_xhat += d * std::fabs((double(x[i]) - mean[c]) * invstd);
      }
    t.dbeta[c] = 1e-5 * sum_abs_dy;
    t.dgamma[c] = 1e-5 * sum_abs_dy_xhat + 4 * kU * (sum_abs_dy_xhat + cond * sum_abs_dy);
    const double adb = std::fabs(ref.dbeta[c]), adg = std::fabs(ref.dgamma[c]);
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = bnorm_ref::index(sh, n, c, s);
        const double d = (relu && !bnorm_ref::mask_bit(mask, i)) ? 0.0 : std::fabs(dy[i]);
        const double xh = std::fabs((double(x[i]) - mean[c]) * invstd);
        if (global_stats) {
          t.dx[i] = g * invstd * 8 * kU * d;
        } else {
          t.dx[i] = g * invstd *
                    (8 * kU * (d + adb / m + xh * adg / m) + t.dbeta[c] / m + xh * t.dgamma[c] / m +
                     4 * kU * (xh + cond) * adg / m);
        }
      }
  }
  return t;
}

class BnormTester {
 public:
  BnormTester& layout(bnorm_layout v) { return layout_ = v, *this; }
  BnormTester& n(int64_t v) { return n_ = v, *this; }
  BnormTester& c(int64_t v) { return c_ = v, *this; }
  BnormTester& spatial(int64_t v) { return spatial_ = v, *this; }
  BnormTester& eps(float v) { return eps_ = v, *this; }
  BnormTester& offset(double v) { return offset_ = v, *this; }
  BnormTester& seed(uint64_t v) { return seed_ = v, *this; }
  BnormTester& relu(bool v) { return relu_ = v, *this; }
  BnormTester& no_gamma(bool v) { return no_gamma_ = v, *this; }
  BnormTester& no_beta(bool v) { return no_beta_ = v, *this; }
  BnormTester& no_dgamma(bool v) { return no_dgamma_ = v, *this; }
  BnormTester& no_dbeta(bool v) { return no_dbeta_ = v, *this; }
  BnormTester& global_stats(bool v) { return global_stats_ = v, *this; }
  BnormTester& inplace(bool v) { return inplace_ = v, *this; }

  std::string Name() const {
    std::ostringstream os;
    os << describe(Shape()) << " eps=" << eps_ << " offset=" << offset_ << " seed=" << seed_
       << (relu_ ? " relu" : "") << (no_gamma_ ? " gamma=NULL" : "")
       << (no_beta_ ? " beta=NULL" : "") << (no_dgamma_ ? " dgamma=NULL" : "")
       << (no_dbeta_ ? " dbeta=NULL" : "") << (global_stats_ ? " global_stats" : "")
       << (inplace_ ? " inplace" : "");
    return os.str();
  }

  bnorm_shape Shape() const { return bnorm_shape{n_, c_, spatial_, layout_}; }

  // Runs forward training, forward inference (with the training statistics and with other
  // statistics), backward and the running-statistics update, checking each against the reference.
  void Test() const {
    SCOPED_TRACE(Name());
    const bnorm_shape sh = Shape();
    const int64_t count = bnorm_ref::elements(sh), m = n_ * spatial_;
    const unsigned flags = relu_ ? unsigned(BNORM_FUSE_RELU) : 0u;
    std::mt19937_64 rng(seed_);
    const std::vector<float> xv = random_x(sh, offset_, rng);
    const std::vector<float> gv = random_gamma(c_, rng);
    const std::vector<float> bv = random_uniform(c_, -1, 1, rng);
    const std::vector<float> dyv = random_normal(count, rng);

    Buffer<float> x(count), gamma(c_), beta(c_);
    x.assign(xv);
    gamma.assign(gv);
    beta.assign(bv);
    const float* gp = no_gamma_ ? nullptr : gamma.data();
    const float* bp = no_beta_ ? nullptr : beta.data();

    // ---- forward training
    Buffer<float> y(count), mean(c_), var(c_);
    Buffer<uint8_t> mask(relu_ ? (count + 7) / 8 : 0);
    if (inplace_) y.assign(xv);
    const float* xin = inplace_ ? y.data() : x.data();
    ASSERT_EQ(bnorm_forward_training(&sh, eps_, flags, xin, gp, bp, y.data(), mean.data(),
                                     var.data(), relu_ ? mask.data() : nullptr),
              BNORM_SUCCESS)
        << "forward_training: " << bnorm_last_error_message();
    EXPECT_STREQ(bnorm_last_error_message(), "");
    EXPECT_TRUE(y.guards_intact() && mean.guards_intact() && var.guards_intact() &&
                mask.guards_intact())
        << "forward_training wrote outside an output";
    EXPECT_TRUE(x.values() == xv && gamma.values() == gv && beta.values() == bv)
        << "forward_training modified an input";

    const bnorm_ref::Stats ref = bnorm_ref::batch_stats(sh, xv.data());
    std::vector<double> max_abs_x(c_, 0.0);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t ch = channel_of(sh, i);
      max_abs_x[ch] = std::max(max_abs_x[ch], std::fabs(double(xv[i])));
    }
    EXPECT_TRUE(close_channels("training mean", sh, mean.data(), ref.mean,
                               [&](int64_t ch) { return 1e-5 * max_abs_x[ch]; }));
    EXPECT_TRUE(close_channels("training var", sh, var.data(), ref.var, [&](int64_t ch) {
      const double d = 1e-5 * max_abs_x[ch];
      return 1e-5 * ref.var[ch] + d * d;
    }));

    CheckNormalized("training y", sh, flags, xv.data(), gp, bp, mean.data(), var.data(), y.data(),
                    relu_ ? mask.data() : nullptr);

    // ---- forward inference with the training statistics: bitwise the training output.
    {
      Buffer<float> yi(count);
      if (inplace_) yi.assign(xv);
      ASSERT_EQ(bnorm_forward_inference(&sh, eps_, flags, inplace_ ? yi.data() : x.data(), gp, bp,
                                        mean.data(), var.data(), yi.data()),
                BNORM_SUCCESS)
          << "forward_inference: " << bnorm_last_error_message();
      const int64_t d = first_bit_difference(yi.data(), y.data(), count);
      EXPECT_EQ(d, -1) << "forward_inference with the training statistics differs bitwise from "
                          "forward_training at "
                       << where(sh, d) << ": inference " << yi[std::max<int64_t>(d, 0)]
                       << " training " << y[std::max<int64_t>(d, 0)];
      EXPECT_TRUE(yi.guards_intact());
    }

    // ---- forward inference with unrelated (running) statistics.
    std::vector<float> imean(c_), ivar(c_);
    {
      std::normal_distribution<double> z;
      std::uniform_real_distribution<double> f(0.5, 2);
      for (int64_t ch = 0; ch < c_; ++ch) {
        imean[ch] = float(ref.mean[ch] + 0.5 * z(rng) * std::sqrt(ref.var[ch]));
        ivar[ch] = float(std::max(ref.var[ch], 0.25) * f(rng));
      }
      Buffer<float> yi(count), im(c_), iv(c_);
      im.assign(imean);
      iv.assign(ivar);
      if (inplace_) yi.assign(xv);
      // GLOBAL_STATS is accepted by inference and changes nothing.
      const unsigned iflags = flags | (global_stats_ ? unsigned(BNORM_GLOBAL_STATS) : 0u);
      ASSERT_EQ(bnorm_forward_inference(&sh, eps_, iflags, inplace_ ? yi.data() : x.data(), gp, bp,
                                        im.data(), iv.data(), yi.data()),
                BNORM_SUCCESS)
          << "forward_inference: " << bnorm_last_error_message();
      EXPECT_STREQ(bnorm_last_error_message(), "");
      EXPECT_TRUE(yi.guards_intact()) << "forward_inference wrote outside y";
      EXPECT_TRUE(im.values() == imean && iv.values() == ivar && x.values() == xv)
          << "forward_inference modified an input";
      CheckNormalized("inference y", sh, flags, xv.data(), gp, bp, im.data(), iv.data(), yi.data(),
                      nullptr);
    }

    // ---- backward, with the training statistics and mask (or frozen statistics).
    {
      Buffer<float> smean(c_), svar(c_);
      smean.assign(global_stats_ ? imean : mean.values());
      svar.assign(global_stats_ ? ivar : var.values());
      const std::vector<float> mean_in = smean.values(), var_in = svar.values();
      const std::vector<uint8_t> mask_in = mask.values();
      const unsigned bflags = flags | (global_stats_ ? unsigned(BNORM_GLOBAL_STATS) : 0u);
      Buffer<float> dy(count), dx(count), dgamma(c_), dbeta(c_);
      dy.assign(dyv);
      if (inplace_) dx.assign(dyv);
      ASSERT_EQ(
          bnorm_backward(&sh, eps_, bflags, x.data(), inplace_ ? dx.data() : dy.data(), gp,
                         smean.data(), svar.data(), relu_ ? mask.data() : nullptr, dx.data(),
                         no_dgamma_ ? nullptr : dgamma.data(), no_dbeta_ ? nullptr : dbeta.data()),
          BNORM_SUCCESS)
          << "backward: " << bnorm_last_error_message();
      EXPECT_STREQ(bnorm_last_error_message(), "");
      EXPECT_TRUE(dx.guards_intact() && dgamma.guards_intact() && dbeta.guards_intact())
          << "backward wrote outside an output";
      EXPECT_TRUE(x.values() == xv && dy.values() == dyv && smean.values() == mean_in &&
                  svar.values() == var_in && mask.values() == mask_in && gamma.values() == gv)
          << "backward modified an input";

      const bnorm_ref::Grads g =
          bnorm_ref::backward(sh, eps_, relu_, global_stats_, xv.data(), dyv.data(), gp,
                              mean_in.data(), var_in.data(), mask_in.data());
      const BackwardTolerance t =
          backward_tolerance(sh, eps_, relu_, global_stats_, xv.data(), dyv.data(), gp,
                             mean_in.data(), var_in.data(), mask_in.data(), g);
      EXPECT_TRUE(
          close_elements("backward dx", sh, dx.data(), g.dx, [&](int64_t i) { return t.dx[i]; }));
      if (!no_dgamma_) {
        EXPECT_TRUE(close_channels("backward dgamma", sh, dgamma.data(), g.dgamma,
                                   [&](int64_t ch) { return t.dgamma[ch]; }));
      }
      if (!no_dbeta_) {
        EXPECT_TRUE(close_channels("backward dbeta", sh, dbeta.data(), g.dbeta,
                                   [&](int64_t ch) { return t.dbeta[ch]; }));
      }
    }

    // ---- running statistics from this batch.
    if (m >= 2) {
      const float momentum = std::vector<float>{0.1f, 0.01f, 1.0f, 0.0f}[seed_ % 4];
      std::vector<float> rm0 = random_uniform(c_, -2, 2, rng),
                         rv0 = random_uniform(c_, 0.5, 2, rng);
      Buffer<float> rm(c_), rv(c_);
      rm.assign(rm0);
      rv.assign(rv0);
      ASSERT_EQ(bnorm_update_running_stats(c_, m, momentum, mean.data(), var.data(), rm.data(),
                                           rv.data()),
                BNORM_SUCCESS)
          << bnorm_last_error_message();
      std::vector<double> erm(rm0.begin(), rm0.end()), erv(rv0.begin(), rv0.end());
      bnorm_ref::update_running_stats(c_, m, momentum, mean.data(), var.data(), erm, erv);
      const double mo = momentum;
      EXPECT_TRUE(close_channels("running_mean", sh, rm.data(), erm, [&](int64_t ch) {
        return 4 * kU * (std::fabs((1 - mo) * rm0[ch]) + std::fabs(mo * mean[ch]));
      }));
      EXPECT_TRUE(close_channels("running_var", sh, rv.data(), erv, [&](int64_t ch) {
        return 4 * kU * (std::fabs((1 - mo) * rv0[ch]) + mo * var[ch] * m / (m - 1.0));
      }));
      EXPECT_TRUE(rm.guards_intact() && rv.guards_intact());
    }
  }

 private:
  // y (and the mask, if given) against the reference normalization with the given statistics.
  void CheckNormalized(const char* what, const bnorm_shape& sh, unsigned flags, const float* x,
                       const float* gamma, const float* beta, const float* mean, const float* var,
                       const float* y, const uint8_t* mask) const {
    const bool relu = flags & BNORM_FUSE_RELU;
    std::vector<double> yref, pre;
    bnorm_ref::normalize(sh, eps_, relu, x, gamma, beta, std::vector<double>(mean, mean + sh.c),
                         std::vector<double>(var, var + sh.c), yref, pre);
    const std::vector<double> tol = y_tolerance(sh, eps_, x, gamma, beta, mean, var);
    EXPECT_TRUE(
        close_elements(what, sh, y, yref, [&](int64_t i) { return tol[channel_of(sh, i)]; }));
    if (!mask) return;
    // The mask must say exactly "y > 0" for the y the library wrote, and agree with the
    // reference wherever the reference is clearly away from 0.
    int64_t bad_self = 0, bad_ref = 0, first_self = -1, first_ref = -1;
    for (int64_t i = 0; i < int64_t(yref.size()); ++i) {
      const bool bit = bnorm_ref::mask_bit(mask, i);
      if (bit != (y[i] > 0) && bad_self++ == 0) first_self = i;
      if (std::fabs(pre[i]) > tol[channel_of(sh, i)] && bit != (pre[i] > 0) && bad_ref++ == 0)
        first_ref = i;
    }
    EXPECT_EQ(bad_self, 0) << what << " mask: bit != (y > 0) at " << bad_self << " elements, first "
                           << where(sh, first_self) << " y=" << y[std::max<int64_t>(first_self, 0)];
    EXPECT_EQ(bad_ref, 0) << what << " mask: bit != (reference y > 0) at " << bad_ref
                          << " elements, first " << where(sh, first_ref)
                          << " reference y=" << pre[std::max<int64_t>(first_ref, 0)];
  }

  bnorm_layout layout_ = BNORM_NCHW;
  int64_t n_ = 1, c_ = 1, spatial_ = 1;
  float eps_ = 1e-5f;
  double offset_ = 0;
  uint64_t seed_ = 1;
  bool relu_ = false, no_gamma_ = false, no_beta_ = false, no_dgamma_ = false, no_dbeta_ = false,
       global_stats_ = false, inplace_ = false;
};

}  // namespace bnorm_test

#endif  // BNORM_TESTS_BNORM_TESTER_HPP
