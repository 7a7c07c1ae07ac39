// bnorm's rows: the three operations through the C ABI, as a user calls them.
#include <bnorm/bnorm.h>

#include <vector>

#include "workload.h"

namespace bnorm_bench {
namespace {

constexpr float kEps = 1e-5f;
constexpr float kMomentum = 0.1f;

run_result status_result(bnorm_status s) {
  if (s == BNORM_SUCCESS) return {true, {}};
  return {false, std::string(bnorm_status_string(s)) + ": " + bnorm_last_error_message()};
}

void run_bnorm(benchmark::State& state, const op& o, layout l, const problem& p) {
  const arena& a = arena::get();
  const bnorm_shape shape{p.n, p.c, p.spatial(), l == layout::nhwc ? BNORM_NHWC : BNORM_NCHW};
  const size_t c = static_cast<size_t>(p.c);
  std::vector<float> gamma(c, 1.25f), beta(c, 0.5f), mean(c, 0.1f), var(c, 1.5f);
  std::vector<float> running_mean(c, 0.0f), running_var(c, 1.0f), dgamma(c), dbeta(c);
  const unsigned flags = o.relu ? unsigned{BNORM_FUSE_RELU} : 0u;

  switch (o.kind) {
    case op_kind::fwd_training:
      // Training as a framework runs it: batch statistics, then the O(C)
      // running-statistics update (PyTorch's rows include theirs).
      measure(state, o.kind, p, [&] {
        bnorm_status s =
            bnorm_forward_training(&shape, kEps, flags, a.x(), gamma.data(), beta.data(), a.y(),
                                   mean.data(), var.data(), a.relu_mask());
        if (s == BNORM_SUCCESS)
          s = bnorm_update_running_stats(p.c, p.n * p.spatial(), kMomentum, mean.data(), var.data(),
                                         running_mean.data(), running_var.data());
        return status_result(s);
      });
      break;
    case op_kind::fwd_inference:
      measure(state, o.kind, p, [&] {
        return status_result(bnorm_forward_inference(&shape, kEps, flags, a.x(), gamma.data(),
                                                     beta.data(), mean.data(), var.data(), a.y()));
      });
      break;
    case op_kind::backward: {
      // The statistics and the mask come from a real forward pass.
      const run_result fwd = status_result(
          bnorm_forward_training(&shape, kEps, flags, a.x(), gamma.data(), beta.data(), a.y(),
                                 mean.data(), var.data(), a.relu_mask()));
      if (!fwd.ok) {
        state.SkipWithError(fwd.error.c_str());
        return;
      }
      measure(state, o.kind, p, [&] {
        return status_result(bnorm_backward(&shape, kEps, flags, a.x(), a.dy(), gamma.data(),
                                            mean.data(), var.data(), a.relu_mask(), a.y(),
                                            dgamma.data(), dbeta.data()));
      });
      break;
    }
  }
}

}  // namespace

implementation bnorm_implementation() { return {"bnorm", false, run_bnorm}; }

}  // namespace bnorm_bench
