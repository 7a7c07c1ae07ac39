#include "reference_bnorm.h"

#include <cmath>

namespace driver {

reference_moments reference_batch_moments(const bnorm_shape& shape, const float* x) {
  const double count = static_cast<double>(shape.n * shape.spatial);
  reference_moments m{std::vector<double>(shape.c), std::vector<double>(shape.c)};
  for (int64_t c = 0; c < shape.c; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t s = 0; s < shape.spatial; ++s) sum += x[tensor_offset(shape, n, c, s)];
    const double mean = sum / count;
    double squares = 0;
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t s = 0; s < shape.spatial; ++s) {
        const double d = x[tensor_offset(shape, n, c, s)] - mean;
        squares += d * d;
      }
    m.mean[c] = mean;
    m.var[c] = squares / count;
  }
  return m;
}

std::vector<double> reference_forward(const bnorm_shape& shape, double eps, bool relu,
                                      const float* x, const float* gamma, const float* beta,
                                      const std::vector<double>& mean,
                                      const std::vector<double>& var) {
  std::vector<double> y(static_cast<size_t>(shape.n * shape.c * shape.spatial));
  for (int64_t c = 0; c < shape.c; ++c) {
    const double invstd = 1 / std::sqrt(var[c] + eps);
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t s = 0; s < shape.spatial; ++s) {
        const int64_t i = tensor_offset(shape, n, c, s);
        const double v = gamma[c] * (x[i] - mean[c]) * invstd + beta[c];
        y[i] = relu && !(v > 0) ? 0.0 : v;
      }
  }
  return y;
}

reference_gradients reference_backward(const bnorm_shape& shape, double eps, bool global_stats,
                                       const float* x, const float* dy, const float* gamma,
                                       const std::vector<double>& mean,
                                       const std::vector<double>& var, const uint8_t* relu_mask) {
  const double count = static_cast<double>(shape.n * shape.spatial);
  reference_gradients r{std::vector<double>(static_cast<size_t>(shape.n * shape.c * shape.spatial)),
                        std::vector<double>(shape.c), std::vector<double>(shape.c)};
  auto g = [&](int64_t i) -> double {
    return relu_mask && !relu_mask_bit(relu_mask, i) ? 0.0 : dy[i];
  };
  for (int64_t c = 0; c < shape.c; ++c) {
    const double invstd = 1 / std::sqrt(var[c] + eps);
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t s = 0; s < shape.spatial; ++s) {
        const int64_t i = tensor_offset(shape, n, c, s);
        sum_g += g(i);
        sum_g_xhat += g(i) * (x[i] - mean[c]) * invstd;
      }
    r.dgamma[c] = sum_g_xhat;
    r.dbeta[c] = sum_g;
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t s = 0; s < shape.spatial; ++s) {
        const int64_t i = tensor_offset(shape, n, c, s);
        const double xhat = (x[i] - mean[c]) * invstd;
        r.dx[i] = global_stats
                      ? gamma[c] * invstd * g(i)
                      : gamma[c] * invstd * (g(i) - sum_g / count - xhat * sum_g_xhat / count);
      }
  }
  return r;
}

}  // namespace driver
