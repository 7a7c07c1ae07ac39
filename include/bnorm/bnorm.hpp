// bnorm C++17 wrapper: the C ABI over views that know their sizes, errors as
// exceptions. Header-only; everything here checks sizes and calls bnorm.h.
//
//   bnorm::batch_norm bn(bnorm::shape::nchw(32, 256, 56 * 56));
//   bn.affine(gamma, beta).relu();
//   bn.forward_training(x, y, mean, var, mask);
//   bn.backward(x, dy, mean, var, dx, {dgamma, dbeta}, mask);
#ifndef BNORM_BNORM_HPP
#define BNORM_BNORM_HPP

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bnorm.h"

namespace bnorm {

// A failed call: the C status and the library's message.
class error : public std::runtime_error {
 public:
  error(bnorm_status status, const std::string& message)
      : std::runtime_error(std::string(bnorm_status_string(status)) + ": " + message),
        status_(status) {}
  bnorm_status status() const noexcept { return status_; }

 private:
  bnorm_status status_;
};

inline void check(bnorm_status status) {
  if (status != BNORM_SUCCESS) throw error(status, bnorm_last_error_message());
}

// Contiguous elements, not owned: a pointer and a count. Empty means absent
// (gamma = 1, beta = 0, no dgamma, ...). Converts from any contiguous
// container with data() and size(), such as std::vector.
template <class T>
class view {
 public:
  view() = default;
  view(T* data, std::size_t size) : data_(data), size_(size) {}
  template <class C, class = std::enable_if_t<std::is_convertible<
                         decltype(std::declval<C&>().data()), T*>::value>>
  view(C& container) : data_(container.data()), size_(container.size()) {}  // NOLINT: implicit
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  view(view<U> other) : data_(other.data()), size_(other.size()) {}  // NOLINT: implicit

  T* data() const { return size_ ? data_ : nullptr; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// n samples of c channels with `spatial` positions each (H*W, D*H*W, or 1).
struct shape {
  int64_t n = 0, c = 0, spatial = 1;
  bnorm_layout layout = BNORM_NCHW;

  static shape nchw(int64_t n, int64_t c, int64_t spatial = 1) { return {n, c, spatial, BNORM_NCHW}; }
  static shape nhwc(int64_t n, int64_t c, int64_t spatial = 1) { return {n, c, spatial, BNORM_NHWC}; }

  int64_t size() const { return n * c * spatial; }
  int64_t values_per_channel() const { return n * spatial; }
  // Bytes of the fused-ReLU mask: one bit per element.
  int64_t mask_bytes() const { return (size() + 7) / 8; }
  bnorm_shape c_shape() const { return {n, c, spatial, layout}; }
};

// Gradients of the scale and shift; either may be left empty.
struct param_grads {
  view<float> dgamma;
  view<float> dbeta;
};

// One batch-norm layer: a shape, eps, optional scale/shift and fused ReLU.
// The tensors are passed to each call; nothing is allocated or owned.
class batch_norm {
 public:
  explicit batch_norm(bnorm::shape s, float eps = 1e-5f) : shape_(s), eps_(eps) {}

  // y = gamma * xhat + beta; without this (or with empty views) 1 and 0.
  batch_norm& affine(view<const float> gamma, view<const float> beta) {
    gamma_ = gamma;
    beta_ = beta;
    return *this;
  }
  batch_norm& relu(bool on = true) {
    relu_ = on;
    return *this;
  }

  const bnorm::shape& shape() const { return shape_; }
  float eps() const { return eps_; }

  // Batch statistics (population variance) into mean and var, then y. With
  // ReLU, relu_mask (shape().mask_bytes() bytes) records where y > 0.
  void forward_training(view<const float> x, view<float> y, view<float> mean, view<float> var,
                        view<uint8_t> relu_mask = {}) const {
    check_sizes("forward_training", x.size(), y.size(), mean.size(), var.size());
    check_mask("forward_training", relu_mask.size());
    const bnorm_shape s = shape_.c_shape();
    check(bnorm_forward_training(&s, eps_, flags(), x.data(), gamma(), beta(), y.data(),
                                 mean.data(), var.data(), relu_mask.data()));
  }

  void forward_inference(view<const float> x, view<float> y, view<const float> mean,
                         view<const float> var) const {
    check_sizes("forward_inference", x.size(), y.size(), mean.size(), var.size());
    const bnorm_shape s = shape_.c_shape();
    check(bnorm_forward_inference(&s, eps_, flags(), x.data(), gamma(), beta(), mean.data(),
                                  var.data(), y.data()));
  }

  // dx (and the parameter gradients that are not empty). frozen_stats: mean
  // and var were given, not computed from this batch (BNORM_GLOBAL_STATS).
  void backward(view<const float> x, view<const float> dy, view<const float> mean,
                view<const float> var, view<float> dx, param_grads grads = {},
                view<const uint8_t> relu_mask = {}, bool frozen_stats = false) const {
    check_sizes("backward", x.size(), dx.size(), mean.size(), var.size());
    check_size("backward", "dy", dy.size(), shape_.size());
    check_mask("backward", relu_mask.size());
    if (!grads.dgamma.empty()) check_size("backward", "dgamma", grads.dgamma.size(), shape_.c);
    if (!grads.dbeta.empty()) check_size("backward", "dbeta", grads.dbeta.size(), shape_.c);
    const bnorm_shape s = shape_.c_shape();
    const unsigned f = flags() | (frozen_stats ? unsigned(BNORM_GLOBAL_STATS) : 0u);
    check(bnorm_backward(&s, eps_, f, x.data(), dy.data(), gamma(), mean.data(), var.data(),
                         relu_mask.data(), dx.data(), grads.dgamma.data(), grads.dbeta.data()));
  }

 private:
  unsigned flags() const { return relu_ ? unsigned(BNORM_FUSE_RELU) : 0u; }
  const float* gamma() const { return gamma_.data(); }
  const float* beta() const { return beta_.data(); }

  static void check_size(const char* op, const char* what, std::size_t got, int64_t want) {
    if (static_cast<int64_t>(got) != want)
      throw error(BNORM_INVALID_ARGUMENT, std::string(op) + ": " + what + " has " +
                                              std::to_string(got) + " elements, the shape needs " +
                                              std::to_string(want));
  }
  void check_sizes(const char* op, std::size_t in, std::size_t out, std::size_t mean,
                   std::size_t var) const {
    check_size(op, "the input tensor", in, shape_.size());
    check_size(op, "the output tensor", out, shape_.size());
    check_size(op, "mean", mean, shape_.c);
    check_size(op, "var", var, shape_.c);
    if (!gamma_.empty()) check_size(op, "gamma", gamma_.size(), shape_.c);
    if (!beta_.empty()) check_size(op, "beta", beta_.size(), shape_.c);
  }
  void check_mask(const char* op, std::size_t bytes) const {
    if (relu_ && static_cast<int64_t>(bytes) < shape_.mask_bytes())
      throw error(BNORM_INVALID_ARGUMENT, std::string(op) + ": ReLU needs a mask of " +
                                              std::to_string(shape_.mask_bytes()) + " bytes, got " +
                                              std::to_string(bytes));
  }

  bnorm::shape shape_;
  float eps_;
  view<const float> gamma_, beta_;
  bool relu_ = false;
};

// running = (1 - momentum) * running + momentum * batch, with the unbiased
// variance var * count / (count - 1); count is values per channel.
inline void update_running_stats(view<const float> mean, view<const float> var, int64_t count,
                                 float momentum, view<float> running_mean,
                                 view<float> running_var) {
  if (mean.size() != var.size() || mean.size() != running_mean.size() ||
      mean.size() != running_var.size())
    throw error(BNORM_INVALID_ARGUMENT,
                "update_running_stats: mean, var, running_mean and running_var differ in size");
  check(bnorm_update_running_stats(static_cast<int64_t>(mean.size()), count, momentum, mean.data(),
                                   var.data(), running_mean.data(), running_var.data()));
}

// The instruction set in use: "sse2", "avx2" or "avx512".
inline std::string isa() { return bnorm_isa(); }

}  // namespace bnorm

#endif  // BNORM_BNORM_HPP
