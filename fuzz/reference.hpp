// Naive batch normalization in double precision: the fuzzer's oracle.
//
// The definitions and nothing else: plain loops over (n, c, s), two-pass mean
// and variance. Inputs are the float arrays the library sees, widened exactly
// to double, so the only rounding here is double's (2^-53), far below the
// float error bounds the fuzzer allows (fuzz_bnorm.cpp).
#ifndef BNORM_FUZZ_REFERENCE_HPP
#define BNORM_FUZZ_REFERENCE_HPP

#include <cmath>
#include <cstdint>
#include <vector>

namespace reference {

struct shape {
  int64_t n, c, spatial;
  bool nhwc;
  int64_t total() const { return n * c * spatial; }
  int64_t count() const { return n * spatial; }  // values per channel
  // Memory index of element (n, c, s): NCHW is x[n][c][s], NHWC is x[n][s][c].
  int64_t at(int64_t in, int64_t ic, int64_t is) const {
    return nhwc ? (in * spatial + is) * c + ic : (in * c + ic) * spatial + is;
  }
  // The memory indices of channel ic, in (n, s) order.
  std::vector<int64_t> channel(int64_t ic) const {
    std::vector<int64_t> idx;
    idx.reserve(static_cast<size_t>(count()));
    for (int64_t in = 0; in < n; ++in)
      for (int64_t is = 0; is < spatial; ++is) idx.push_back(at(in, ic, is));
    return idx;
  }
};

inline bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i / 8] >> (i % 8)) & 1; }

// Mean and population variance of the values at idx (two passes).
struct moments {
  double mean, var;
};
inline moments channel_moments(const float* x, const std::vector<int64_t>& idx) {
  double sum = 0;
  for (int64_t i : idx) sum += x[i];
  const double mean = sum / static_cast<double>(idx.size());
  double sq = 0;
  for (int64_t i : idx) sq += (x[i] - mean) * (x[i] - mean);
  return {mean, sq / static_cast<double>(idx.size())};
}

// y = gamma*(x - mean)/sqrt(var + eps) + beta, before any ReLU.
inline double normalize(double x, double mean, double var, double eps, double gamma, double beta) {
  return gamma * (x - mean) / std::sqrt(var + eps) + beta;
}

// Backward of one channel with M = idx.size() values, g = dy where the ReLU
// mask bit is set (or no mask), else 0; xhat = (x - mean) * invstd:
//   dbeta  = sum(g)
//   dgamma = sum(g * xhat)
//   dx     = gamma * invstd * (g - sum(g)/M - xhat * sum(g*xhat)/M)
//   dx     = gamma * invstd * g                   (frozen statistics)
struct channel_grads {
  std::vector<double> dx;  // in idx order
  double dgamma, dbeta;
};
inline channel_grads channel_backward(const float* x, const float* dy, const uint8_t* mask,
                                      const std::vector<int64_t>& idx, double mean, double var,
                                      double eps, double gamma, bool global) {
  const double invstd = 1.0 / std::sqrt(var + eps);
  const double m = static_cast<double>(idx.size());
  auto g = [&](int64_t i) { return !mask || mask_bit(mask, i) ? static_cast<double>(dy[i]) : 0.0; };
  double sum_g = 0, sum_gxhat = 0;
  for (int64_t i : idx) {
    sum_g += g(i);
    sum_gxhat += g(i) * (x[i] - mean) * invstd;
  }
  channel_grads out{{}, sum_gxhat, sum_g};
  out.dx.reserve(idx.size());
  for (int64_t i : idx) {
    const double xhat = (x[i] - mean) * invstd;
    out.dx.push_back(global ? gamma * invstd * g(i)
                            : gamma * invstd * (g(i) - sum_g / m - xhat * sum_gxhat / m));
  }
  return out;
}

// running = (1 - momentum)*running + momentum*batch, the variance unbiased.
inline double running_mean(double running, double mean, double momentum) {
  return (1 - momentum) * running + momentum * mean;
}
inline double running_var(double running, double var, int64_t count, double momentum) {
  const double unbiased = var * static_cast<double>(count) / static_cast<double>(count - 1);
  return (1 - momentum) * running + momentum * unbiased;
}

}  // namespace reference

#endif  // BNORM_FUZZ_REFERENCE_HPP
