// Allocation failures (issue 4): every scratch allocation of the library can fail, and each
// failure must give BNORM_OUT_OF_MEMORY, a message, and no write to any output (or to an input
// that is also the output, y == x, dx == dy).
//
// The library takes all its scratch from `new (std::align_val_t, std::nothrow) T[n]`
// (kernels/batchnorm.cpp, allocate()). This binary replaces that global allocation function, and
// the matching operator delete[], for the whole process (the library resolves them to these), so
// that a test can make the k-th allocation of a call fail. Each case is first run without
// failures to count its allocations (it must make at least one), then once per allocation with
// that one failing, then once more without failures: it must still give the first run's bits.
// Run once per instruction set, and with BNORM_CACHE_BYTES=1048576 so that the tensors below
// also take the paths of tensors larger than the cache (fused NCHW blocks, streaming stores).
#include <bnorm/bnorm.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {
// Allocations to let through before one fails: -1, none fails.
std::atomic<long> g_until_failure{-1};
std::atomic<long> g_allocations{0};
// Each call allocates its scratch afresh: without this, a thread's cache of scratch blocks
// (kernels/batchnorm.cpp, scratch_cache) would serve the runs after the first, which would then
// make no allocation to fail. Set before main, so before the library reads it.
[[maybe_unused]] const bool g_no_scratch_cache = setenv("BNORM_SCRATCH_CACHE", "0", 1) == 0;
}  // namespace

void* operator new[](std::size_t bytes, std::align_val_t align,
                     const std::nothrow_t&) noexcept {
  g_allocations.fetch_add(1);
  if (g_until_failure.load() >= 0 && g_until_failure.fetch_sub(1) == 0) return nullptr;
  const std::size_t a = static_cast<std::size_t>(align);
  return std::aligned_alloc(a, (bytes + a - 1) / a * a);
}
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace bnorm_test {
namespace {

using Bytes = std::vector<uint8_t>;

// The operands of one call: inputs hold data, outputs start as sentinels (test_support.hpp).
struct Operands {
  bnorm_shape sh;
  int64_t count;
  Buffer<float> x, dy, gamma, beta, y, mean, var, dgamma, dbeta;
  Buffer<double> mean_d, m2_d, sum_dy, sum_dy_xhat;
  Buffer<uint8_t> mask;

  explicit Operands(const bnorm_shape& s)
      : sh(s), count(bnorm_ref::elements(s)), x(count), dy(count), gamma(s.c), beta(s.c),
        y(count), mean(s.c), var(s.c), dgamma(s.c), dbeta(s.c), mean_d(s.c), m2_d(s.c),
        sum_dy(s.c), sum_dy_xhat(s.c), mask((count + 7) / 8) {
    std::mt19937_64 rng(count + s.c);
    x.assign(random_uniform(count, -3, 5, rng));
    dy.assign(random_uniform(count, -1, 1, rng));
    gamma.assign(random_uniform(s.c, 0.5, 2, rng));
    beta.assign(random_uniform(s.c, -1, 1, rng));
  }
  // Every byte of every buffer, guards included.
  std::vector<Bytes> state() const {
    return {x.raw_bytes(),     dy.raw_bytes(),   gamma.raw_bytes(),  beta.raw_bytes(),
            y.raw_bytes(),     mean.raw_bytes(), var.raw_bytes(),    dgamma.raw_bytes(),
            dbeta.raw_bytes(), mean_d.raw_bytes(), m2_d.raw_bytes(), sum_dy.raw_bytes(),
            sum_dy_xhat.raw_bytes(), mask.raw_bytes()};
  }
};

// Statistics for the operations that take them: those of forward training.
void set_statistics(Operands& o) {
  Buffer<float> scratch(o.count);
  ASSERT_EQ(bnorm_forward_training(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.gamma.data(),
                                   o.beta.data(), scratch.data(), o.mean.data(), o.var.data(),
                                   o.mask.data()),
            BNORM_SUCCESS)
      << bnorm_last_error_message();
  ASSERT_EQ(bnorm_backward_reduce(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.dy.data(),
                                  o.mean.data(), o.var.data(), o.mask.data(), o.sum_dy.data(),
                                  o.sum_dy_xhat.data()),
            BNORM_SUCCESS)
      << bnorm_last_error_message();
}

struct Case {
  const char* name;
  bool needs_statistics;
  std::function<bnorm_status(Operands&)> call;
};

const Case kCases[] = {
    {"forward_training", false,
     [](Operands& o) {
       return bnorm_forward_training(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.gamma.data(),
                                     o.beta.data(), o.y.data(), o.mean.data(), o.var.data(),
                                     o.mask.data());
     }},
    {"forward_training in place", false,
     [](Operands& o) {
       return bnorm_forward_training(&o.sh, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                     o.x.data(), o.mean.data(), o.var.data(), nullptr);
     }},
    {"forward_inference", true,
     [](Operands& o) {
       return bnorm_forward_inference(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.gamma.data(),
                                      o.beta.data(), o.mean.data(), o.var.data(), o.y.data());
     }},
    {"moments", false,
     [](Operands& o) { return bnorm_moments(&o.sh, o.x.data(), o.mean_d.data(), o.m2_d.data()); }},
    {"normalize", true,
     [](Operands& o) {
       return bnorm_normalize(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.gamma.data(),
                              o.beta.data(), o.mean.data(), o.var.data(), o.y.data(),
                              o.mask.data());
     }},
    {"backward", true,
     [](Operands& o) {
       return bnorm_backward(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.dy.data(),
                             o.gamma.data(), o.mean.data(), o.var.data(), o.mask.data(),
                             o.y.data(), o.dgamma.data(), o.dbeta.data());
     }},
    {"backward in place", true,
     [](Operands& o) {
       return bnorm_backward(&o.sh, 1e-5f, 0, o.x.data(), o.dy.data(), o.gamma.data(),
                             o.mean.data(), o.var.data(), nullptr, o.dy.data(), o.dgamma.data(),
                             o.dbeta.data());
     }},
    {"backward_reduce", true,
     [](Operands& o) {
       return bnorm_backward_reduce(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.dy.data(),
                                    o.mean.data(), o.var.data(), o.mask.data(), o.sum_dy.data(),
                                    o.sum_dy_xhat.data());
     }},
    {"backward_apply", true,
     [](Operands& o) {
       return bnorm_backward_apply(&o.sh, 1e-5f, BNORM_FUSE_RELU, o.x.data(), o.dy.data(),
                                   o.gamma.data(), o.mean.data(), o.var.data(), o.mask.data(),
                                   o.sum_dy.data(), o.sum_dy_xhat.data(),
                                   o.sh.n * o.sh.spatial, o.y.data());
     }},
};

// Shapes that take the library's different paths: NCHW in phases, in fused channel blocks
// (beyond the cache), grouped small planes, several slices per channel; NHWC in phases, in
// fused column blocks (few rows, C >= 2048 on two threads), with the pilot (many slices),
// folded (C = 5: rows of 40 channels, 80 with AVX-512, and 3 rows left over).
const bnorm_shape kShapes[] = {
    {2, 5, 3, BNORM_NCHW},     {4, 64, 49, BNORM_NCHW},   {3, 24, 3136, BNORM_NCHW},
    {16, 9, 4096, BNORM_NCHW}, {1, 2048, 49, BNORM_NCHW}, {2, 5, 3, BNORM_NHWC},
    {8, 256, 196, BNORM_NHWC}, {1, 4096, 49, BNORM_NHWC}, {4, 96, 784, BNORM_NHWC},
    {3, 5, 33, BNORM_NHWC},
};

// Runs c on o with allocation k failing (k < 0: none), counting the allocations.
bnorm_status run(const Case& c, Operands& o, long k, long* allocations) {
  g_allocations = 0;
  g_until_failure = k;
  const bnorm_status s = c.call(o);
  g_until_failure = -1;
  *allocations = g_allocations;
  return s;
}

TEST(OutOfMemory, EveryAllocationFailureLeavesOutputsUntouched) {
  for (const bnorm_shape& sh : kShapes)
    for (const Case& c : kCases) {
      SCOPED_TRACE(std::string(c.name) + " " + describe(sh));
      Operands o(sh);
      if (c.needs_statistics) set_statistics(o);
      if (HasFatalFailure()) return;
      const std::vector<Bytes> before = o.state();

      long allocations = 0;
      ASSERT_EQ(run(c, o, -1, &allocations), BNORM_SUCCESS) << bnorm_last_error_message();
      ASSERT_GT(allocations, 0) << "the call allocates nothing: this case tests nothing";
      const std::vector<Bytes> want = o.state();

      for (long k = 0; k < allocations; ++k) {
        SCOPED_TRACE("allocation " + std::to_string(k) + " of " + std::to_string(allocations) +
                     " fails");
        Operands f(sh);
        if (c.needs_statistics) set_statistics(f);
        ASSERT_TRUE(f.state() == before);
        long made = 0;
        ASSERT_EQ(run(c, f, k, &made), BNORM_OUT_OF_MEMORY) << bnorm_last_error_message();
        EXPECT_NE(std::string(bnorm_last_error_message()).find("memory"), std::string::npos)
            << bnorm_last_error_message();
        ASSERT_TRUE(f.state() == before) << "a call that ran out of memory wrote something";

        // The library is still whole: the same call without failures gives the same bits.
        ASSERT_EQ(run(c, f, -1, &made), BNORM_SUCCESS) << bnorm_last_error_message();
        ASSERT_TRUE(f.state() == want) << "results differ after an allocation failure";
      }
    }
}

// The replacement is what the library calls: a failure at the first allocation is seen.
TEST(OutOfMemory, ReplacementReachesTheLibrary) {
  const bnorm_shape sh{2, 3, 5, BNORM_NCHW};
  Operands o(sh);
  long made = 0;
  EXPECT_EQ(run(kCases[0], o, 0, &made), BNORM_OUT_OF_MEMORY);
  EXPECT_GE(made, 1);
}

}  // namespace
}  // namespace bnorm_test
