// PyTorch (ATen) rows: the operators torch.nn.functional.batch_norm and its
// autograd formula call, on tensors that wrap the shared arena's buffers.
// ATen allocates every output on every call; run under a caching allocator
// (bench/run_bench.sh preloads jemalloc) so page faults are not what is timed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <torch/version.h>

#include <tuple>

#include "workload.h"

namespace bnorm_bench {
namespace {

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

at::Tensor wrap(float* data, layout l, const problem& p) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (l == layout::nc) return at::from_blob(data, {p.n, p.c}, f32);
  if (l == layout::nchw) return at::from_blob(data, {p.n, p.c, p.h, p.w}, f32);
  // channels_last: sizes stay NCHW, strides are NHWC's.
  return at::from_blob(data, {p.n, p.c, p.h, p.w}, {p.h * p.w * p.c, 1, p.w * p.c, p.c}, f32);
}

void run_torch_row(benchmark::State& state, const op& o, layout l, const problem& p) {
  // No autograd bookkeeping: the rows time the kernels and the dispatcher.
  c10::InferenceMode no_autograd;
  const arena& a = arena::get();
  const at::Tensor x = wrap(a.x(), l, p);
  const at::Tensor weight = at::full({p.c}, 1.25f), bias = at::full({p.c}, 0.5f);
  at::Tensor running_mean = at::full({p.c}, 0.1f), running_var = at::full({p.c}, 1.5f);

  switch (o.kind) {
    case op_kind::fwd_training:
    case op_kind::fwd_inference: {
      const bool training = o.kind == op_kind::fwd_training;
      // ReLU is a second, unfused pass (what nn.ReLU(inplace=True) does).
      measure(state, o.kind, p, [&]() -> run_result {
        at::Tensor y = at::batch_norm(x, weight, bias, running_mean, running_var, training,
                                      kMomentum, kEps, /*cudnn_enabled=*/false);
        if (o.relu) y.relu_();
        return {true, {}};
      });
      break;
    }
    case op_kind::backward: {
      const at::Tensor dy = wrap(a.dy(), l, p);
      at::Tensor y, save_mean, save_invstd;
      std::tie(y, save_mean, save_invstd) =
          at::native_batch_norm(x, weight, bias, running_mean, running_var, true, kMomentum, kEps);
      if (o.relu) y.relu_();
      measure(state, o.kind, p, [&]() -> run_result {
        // Unfused ReLU backward: dy masked by y > 0 in a pass of its own.
        const at::Tensor g = o.relu ? at::threshold_backward(dy, y, 0) : dy;
        at::native_batch_norm_backward(g, x, weight, running_mean, running_var, save_mean,
                                       save_invstd, true, kEps, {true, true, true});
        return {true, {}};
      });
      break;
    }
  }
}

void run_torch(benchmark::State& state, const op& o, layout l, const problem& p) {
  try {
    run_torch_row(state, o, l, p);
  } catch (const c10::Error& e) {
    state.SkipWithError(e.what_without_backtrace());
  }
}

}  // namespace

implementation torch_implementation() {
  // Same threads as bnorm and oneDNN (all three use the same libgomp).
  at::set_num_threads(omp_get_max_threads());
  return {"torch", true, run_torch};
}

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
         " (ATen parallel: " + std::to_string(at::get_num_threads()) + " threads)";
}

}  // namespace bnorm_bench
