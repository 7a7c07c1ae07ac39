// Batch normalization in double precision, written for clarity, not speed: the answer that
// bnorm-run compares the library against. Element (n, c, s) is at tensor_offset(shape, n, c, s).
#ifndef BNORM_TOOLS_REFERENCE_BNORM_H
#define BNORM_TOOLS_REFERENCE_BNORM_H

#include <bnorm/bnorm.h>

#include <cstdint>
#include <vector>

namespace driver {

inline int64_t tensor_offset(const bnorm_shape& shape, int64_t n, int64_t c, int64_t s) {
  return shape.layout == BNORM_NCHW ? (n * shape.c + c) * shape.spatial + s
                                    : (n * shape.spatial + s) * shape.c + c;
}

inline bool relu_mask_bit(const uint8_t* mask, int64_t i) { return (mask[i / 8] >> (i % 8)) & 1; }

struct reference_moments {
  std::vector<double> mean, var;  // per channel; var is the population variance
};

// Two passes: the mean, then the mean of squared deviations from it.
reference_moments reference_batch_moments(const bnorm_shape& shape, const float* x);

// y = gamma*(x-mean)/sqrt(var+eps) + beta, then max(y, 0) if relu; one value per element of x,
// at the same offsets.
std::vector<double> reference_forward(const bnorm_shape& shape, double eps, bool relu,
                                      const float* x, const float* gamma, const float* beta,
                                      const std::vector<double>& mean,
                                      const std::vector<double>& var);

struct reference_gradients {
  std::vector<double> dx;             // per element
  std::vector<double> dgamma, dbeta;  // per channel
};

// With g = dy, or 0 where the relu mask bit is clear (relu_mask != nullptr), and
// xhat = (x-mean)/sqrt(var+eps):
//   dgamma = sum(g*xhat), dbeta = sum(g) over the channel,
//   dx = gamma/sqrt(var+eps) * (g - mean(g) - xhat*mean(g*xhat)), or
//   dx = gamma/sqrt(var+eps) * g with global statistics (mean and var are constants).
reference_gradients reference_backward(const bnorm_shape& shape, double eps, bool global_stats,
                                       const float* x, const float* dy, const float* gamma,
                                       const std::vector<double>& mean,
                                       const std::vector<double>& var, const uint8_t* relu_mask);

}  // namespace driver

#endif  // BNORM_TOOLS_REFERENCE_BNORM_H
