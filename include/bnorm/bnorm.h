/* bnorm: batch-normalization kernels for CPUs (f32, NCHW and NHWC).
 *
 * This header is the ABI. Every function validates its arguments first and,
 * on any error, returns a status without writing to any output. The text of
 * the last error in the calling thread is available from
 * bnorm_last_error_message().
 *
 * Empty tensors: a tensor with n*spatial == 0 holds no values, and its
 * tensor arguments (x, y, dy, dx, relu_mask) may then be NULL, as the data
 * pointer of an empty tensor often is; the per-channel arrays (length c > 0)
 * are still required. Forward training needs values (n*spatial > 0). */
#ifndef BNORM_BNORM_H
#define BNORM_BNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define BNORM_API
#else
#define BNORM_API __attribute__((visibility("default")))
#endif

typedef enum bnorm_status {
  BNORM_SUCCESS = 0,
  BNORM_INVALID_ARGUMENT = 1,
  BNORM_UNSUPPORTED = 2,
  BNORM_OUT_OF_MEMORY = 3,
} bnorm_status;

/* NCHW is x[n][c][s], NHWC is x[n][s][c]; s runs over the product of the
 * spatial sizes (H*W, D*H*W, or 1 for (N, C) input). */
typedef enum bnorm_layout { BNORM_NCHW = 0, BNORM_NHWC = 1 } bnorm_layout;

typedef struct bnorm_shape {
  int64_t n, c, spatial;
  bnorm_layout layout;
} bnorm_shape;

enum {
  /* y = max(y, 0); training writes a bit mask (bit i%8 of byte i/8 for the
   * element at memory index i, set iff y > 0) that backward reads. */
  BNORM_FUSE_RELU = 1u,
  /* backward: mean and var are constants (frozen statistics). */
  BNORM_GLOBAL_STATS = 2u
};

/* Batch statistics (population variance) and y = gamma*(x-mean)/sqrt(var+eps)
 * + beta. gamma == NULL means 1, beta == NULL means 0. y may equal x. */
BNORM_API bnorm_status bnorm_forward_training(const bnorm_shape* shape, float eps,
                                              unsigned flags, const float* x,
                                              const float* gamma, const float* beta,
                                              float* y, float* mean, float* var,
                                              uint8_t* relu_mask);

/* y = gamma*(x-mean)/sqrt(var+eps) + beta with the given statistics. */
BNORM_API bnorm_status bnorm_forward_inference(const bnorm_shape* shape, float eps,
                                               unsigned flags, const float* x,
                                               const float* gamma, const float* beta,
                                               const float* mean, const float* var,
                                               float* y);

/* dx, and dgamma = sum(dy*xhat), dbeta = sum(dy) where those are not NULL.
 * dx may equal dy. */
BNORM_API bnorm_status bnorm_backward(const bnorm_shape* shape, float eps, unsigned flags,
                                      const float* x, const float* dy,
                                      const float* gamma, const float* mean,
                                      const float* var, const uint8_t* relu_mask,
                                      float* dx, float* dgamma, float* dbeta);

/* running = (1-momentum)*running + momentum*batch, with the unbiased variance
 * var*count/(count-1) for running_var. count >= 2. */
BNORM_API bnorm_status bnorm_update_running_stats(int64_t c, int64_t count, float momentum,
                                                  const float* mean, const float* var,
                                                  float* running_mean, float* running_var);

/* ---- Split-phase API, for frameworks and distributed training ----------
 * Forward training is exactly
 *   bnorm_moments -> bnorm_merge_moments -> bnorm_normalize
 * and backward is exactly
 *   bnorm_backward_reduce -> (sum across workers) -> bnorm_backward_apply
 * (with one set of moments and local sums, the results are bitwise those of
 * bnorm_forward_training and bnorm_backward). */

/* Per-channel mean and M2 = sum((x - mean)^2) over the n*spatial values of
 * each channel, in double. n*spatial == 0 gives mean = M2 = 0. */
BNORM_API bnorm_status bnorm_moments(const bnorm_shape* shape, const float* x, double* mean,
                                     double* m2);

/* Merges k sets of per-channel moments (set i holds counts[i] values per
 * channel: mean[i*c + j], m2[i*c + j]) in index order with Chan's formula
 * into the mean and population variance. Sets with count 0 are skipped; at
 * least one count must be positive. */
BNORM_API bnorm_status bnorm_merge_moments(int64_t k, int64_t c, const int64_t* counts,
                                           const double* mean, const double* m2,
                                           float* merged_mean, float* merged_var);

/* y = gamma*(x-mean)/sqrt(var+eps) + beta with the given statistics, like
 * bnorm_forward_inference, and with BNORM_FUSE_RELU also the mask (then
 * required), like bnorm_forward_training. */
BNORM_API bnorm_status bnorm_normalize(const bnorm_shape* shape, float eps, unsigned flags,
                                       const float* x, const float* gamma, const float* beta,
                                       const float* mean, const float* var, float* y,
                                       uint8_t* relu_mask);

/* Per-channel sum(dy) and sum(dy * xhat) over this tensor, xhat =
 * (x - mean)/sqrt(var + eps), dy zeroed where the ReLU mask bit is clear.
 * These are dbeta and dgamma of this tensor; summed over workers, the
 * global ones. */
BNORM_API bnorm_status bnorm_backward_reduce(const bnorm_shape* shape, float eps, unsigned flags,
                                             const float* x, const float* dy,
                                             const float* mean, const float* var,
                                             const uint8_t* relu_mask, double* sum_dy,
                                             double* sum_dy_xhat);

/* dx = gamma*invstd*(dy - sum_dy/count - xhat*sum_dy_xhat/count) from the
 * global sums over `count` values per channel (count >= n*spatial). With
 * BNORM_GLOBAL_STATS, dx = gamma*invstd*dy and the sums may be NULL. dx may
 * equal dy. */
BNORM_API bnorm_status bnorm_backward_apply(const bnorm_shape* shape, float eps, unsigned flags,
                                            const float* x, const float* dy,
                                            const float* gamma, const float* mean,
                                            const float* var, const uint8_t* relu_mask,
                                            const double* sum_dy, const double* sum_dy_xhat,
                                            int64_t count, float* dx);

/* Never NULL. */
BNORM_API const char* bnorm_status_string(bnorm_status status);

/* The instruction set in use: "sse2", "avx2" or "avx512". Chosen once per
 * process; the environment variable BNORM_ISA may force a lower one. */
BNORM_API const char* bnorm_isa(void);

/* Why the last call in this thread failed ("" if it succeeded). Never NULL. */
BNORM_API const char* bnorm_last_error_message(void);

#ifdef __cplusplus
}
#endif

#endif /* BNORM_BNORM_H */
