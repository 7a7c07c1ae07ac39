// Naive batch normalization in double precision: the oracle every test compares against.
//
// Written to be obviously right rather than fast: plain loops over (n, c, s), one index function
// per layout, two-pass mean and variance. Inputs are the float arrays the library sees, widened
// exactly to double, so the only rounding here is double's (2^-53 relative), about 2^29 times
// smaller than the float tolerances the tests use.
#ifndef BNORM_TESTS_REFERENCE_HPP
#define BNORM_TESTS_REFERENCE_HPP

#include <bnorm/bnorm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace bnorm_ref {

// Memory index of element (n, c, s): NCHW is x[n][c][s], NHWC is x[n][s][c].
inline int64_t index(const bnorm_shape& sh, int64_t n, int64_t c, int64_t s) {
  if (sh.layout == BNORM_NCHW) return (n * sh.c + c) * sh.spatial + s;
  return (n * sh.spatial + s) * sh.c + c;
}

inline int64_t elements(const bnorm_shape& sh) { return sh.n * sh.c * sh.spatial; }

inline bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i / 8] >> (i % 8)) & 1; }

// Per-channel batch statistics: mean and population variance (divide by N*spatial).
struct Stats {
  std::vector<double> mean, var;
};

inline Stats batch_stats(const bnorm_shape& sh, const float* x) {
  Stats st;
  st.mean.assign(sh.c, 0.0);
  st.var.assign(sh.c, 0.0);
  const double m = double(sh.n * sh.spatial);
  for (int64_t c = 0; c < sh.c; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) sum += x[index(sh, n, c, s)];
    const double mean = sum / m;
    double sq = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const double d = x[index(sh, n, c, s)] - mean;
        sq += d * d;
      }
    st.mean[c] = mean;
    st.var[c] = sq / m;
  }
  return st;
}

// y = gamma*(x - mean)/sqrt(var + eps) + beta, then max(y, 0) if relu. gamma == nullptr means 1,
// beta == nullptr means 0. Returns the value before the ReLU in pre_relu (for mask checks).
inline void normalize(const bnorm_shape& sh, double eps, bool relu, const float* x,
                      const float* gamma, const float* beta, const std::vector<double>& mean,
                      const std::vector<double>& var, std::vector<double>& y,
                      std::vector<double>& pre_relu) {
  y.assign(elements(sh), 0.0);
  pre_relu.assign(elements(sh), 0.0);
  for (int64_t c = 0; c < sh.c; ++c) {
    const double g = gamma ? gamma[c] : 1.0;
    const double b = beta ? beta[c] : 0.0;
    const double invstd = 1.0 / std::sqrt(var[c] + eps);
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = index(sh, n, c, s);
        const double v = g * (x[i] - mean[c]) * invstd + b;
        pre_relu[i] = v;
        y[i] = relu ? std::max(v, 0.0) : v;
      }
  }
}

struct Grads {
  std::vector<double> dx, dgamma, dbeta;
};

// Backward with the given (saved or frozen) statistics. With relu, dy is zeroed where the mask
// bit is 0. Batch statistics:  dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)).
// Frozen statistics (global):  dx = gamma*invstd*dy.  In both, dgamma = sum(dy*xhat),
// dbeta = sum(dy), with xhat = (x - mean)*invstd.
inline Grads backward(const bnorm_shape& sh, double eps, bool relu, bool global_stats,
                      const float* x, const float* dy, const float* gamma, const float* mean,
                      const float* var, const uint8_t* mask) {
  Grads g;
  g.dx.assign(elements(sh), 0.0);
  g.dgamma.assign(sh.c, 0.0);
  g.dbeta.assign(sh.c, 0.0);
  const double m = double(sh.n * sh.spatial);
  for (int64_t c = 0; c < sh.c; ++c) {
    const double invstd = 1.0 / std::sqrt(double(var[c]) + eps);
    const double gm = gamma ? gamma[c] : 1.0;
    auto dy_eff = [&](int64_t i) { return (relu && !mask_bit(mask, i)) ? 0.0 : double(dy[i]); };
    auto xhat = [&](int64_t i) { return (double(x[i]) - mean[c]) * invstd; };
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = index(sh, n, c, s);
        sum_dy += dy_eff(i);
        sum_dy_xhat += dy_eff(i) * xhat(i);
      }
    g.dbeta[c] = sum_dy;
    g.dgamma[c] = sum_dy_xhat;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = index(sh, n, c, s);
        g.dx[i] = global_stats ? gm * invstd * dy_eff(i)
                               : gm * invstd * (dy_eff(i) - sum_dy / m - xhat(i) * sum_dy_xhat / m);
      }
  }
  return g;
}

// running = (1-momentum)*running + momentum*batch; the variance term is unbiased.
inline void update_running_stats(int64_t c, int64_t count, double momentum, const float* mean,
                                 const float* var, std::vector<double>& running_mean,
                                 std::vector<double>& running_var) {
  for (int64_t k = 0; k < c; ++k) {
    running_mean[k] = (1 - momentum) * running_mean[k] + momentum * mean[k];
    running_var[k] = (1 - momentum) * running_var[k] +
                     momentum * double(var[k]) * double(count) / double(count - 1);
  }
}

}  // namespace bnorm_ref

#endif  // BNORM_TESTS_REFERENCE_HPP
