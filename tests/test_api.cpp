// The contract around the numbers: argument validation (every invalid input is rejected and
// writes nothing), empty batches, status strings, error messages, the instruction-set choice,
// and the running-statistics update.
#include <bnorm/bnorm.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "reference.hpp"
#include "test_support.hpp"

namespace bnorm_test {
namespace {

// ---- Invalid arguments ------------------------------------------------------------------------

// Every buffer an invalid call could touch, sized for the valid shape 2x3x5, inputs filled with
// ordinary values and outputs with the sentinel.
struct Operands {
  static constexpr int64_t kN = 2, kC = 3, kS = 5, kCount = kN * kC * kS;
  Buffer<float> x{kCount}, y{kCount}, mean{kC}, var{kC}, gamma{kC}, beta{kC}, dy{kCount},
      dx{kCount}, dgamma{kC}, dbeta{kC}, running_mean{kC}, running_var{kC};
  Buffer<uint8_t> mask{(kCount + 7) / 8};

  Operands() {
    std::mt19937_64 rng(5);
    const bnorm_shape sh{kN, kC, kS, BNORM_NCHW};
    x.assign(random_x(sh, 0, rng));
    dy.assign(random_normal(kCount, rng));
    gamma.assign(random_gamma(kC, rng));
    beta.assign(random_uniform(kC, -1, 1, rng));
    mean.assign(random_uniform(kC, -1, 1, rng));
    var.assign(random_uniform(kC, 0.5, 2, rng));
    running_mean.assign(random_uniform(kC, -1, 1, rng));
    running_var.assign(random_uniform(kC, 0.5, 2, rng));
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = uint8_t(0x5A + i);
  }

  // All bytes of all buffers (guards included).
  std::vector<uint8_t> Snapshot() const {
    std::vector<uint8_t> all;
    for (const Buffer<float>* b : {&x, &y, &mean, &var, &gamma, &beta, &dy, &dx, &dgamma, &dbeta,
                                   &running_mean, &running_var}) {
      const auto r = b->raw_bytes();
      all.insert(all.end(), r.begin(), r.end());
    }
    const auto r = mask.raw_bytes();
    all.insert(all.end(), r.begin(), r.end());
    return all;
  }
};

using Call = std::function<bnorm_status(Operands&)>;

// Exit code for the child: 0 = rejected cleanly.
int RunRejected(const Call& call) {
  Operands ops;
  const std::vector<uint8_t> before = ops.Snapshot();
  const bnorm_status st = call(ops);
  int rc = 0;
  if (st != BNORM_INVALID_ARGUMENT) {
    std::fprintf(stderr, "returned status %d (%s), expected BNORM_INVALID_ARGUMENT\n", int(st),
                 bnorm_status_string(st));
    rc |= 1;
  }
  if (ops.Snapshot() != before) {
    std::fprintf(stderr, "the call changed memory it was given (outputs must stay untouched)\n");
    rc |= 2;
  }
  const char* msg = bnorm_last_error_message();
  if (st != BNORM_SUCCESS && (msg == nullptr || msg[0] == '\0')) {
    std::fprintf(stderr, "bnorm_last_error_message() is empty after a failure\n");
    rc |= 4;
  }
  return rc;
}

// Runs body in a child process (a death test in the "threadsafe" style, which re-executes the
// binary: no fork() of a process that holds OpenMP threads) and expects it to exit with 0. A
// library that dereferences a NULL pointer, walks a huge shape or divides by an empty batch then
// crashes the child and fails this one expectation, not the whole suite. The body reports what
// went wrong on stderr, which gtest prints.
void ExpectInChild(const std::string& what, const std::function<int()>& body) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(std::_Exit(body()), ::testing::ExitedWithCode(0), "") << what;
}

void ExpectRejected(const std::string& what, const Call& call) {
  ExpectInChild("invalid call not rejected cleanly: " + what,
                [&call] { return RunRejected(call); });
}

constexpr int64_t kBig22 = int64_t(1) << 22;

// Shapes whose element count overflows int64, or whose byte size exceeds PTRDIFF_MAX.
struct HugeShape {
  const char* what;
  int64_t n, c, s;
};
const HugeShape kHugeShapes[] = {
    {"n=c=s=2^22 (2^66 elements)", kBig22, kBig22, kBig22},
    {"n=2^62 c=4 (element count wraps to 0)", int64_t(1) << 62, 4, 1},
    {"n=2^32 c=2^32 (wraps to 0)", int64_t(1) << 32, int64_t(1) << 32, 1},
    {"n=2^31 c=2^30 s=1 (2^61 elements = 2^63 bytes)", int64_t(1) << 31, int64_t(1) << 30, 1},
    {"n=INT64_MAX c=1 s=1 (bytes overflow)", std::numeric_limits<int64_t>::max(), 1, 1},
    {"n=1 c=1 s=2^61+1 (bytes > PTRDIFF_MAX)", 1, 1, (int64_t(1) << 61) + 1},
    {"n=3 c=2^61/3+1 (bytes > PTRDIFF_MAX)", 3, (int64_t(1) << 61) / 3 + 1, 1},
    {"n=0 c=2^59 (the channels' scratch > PTRDIFF_MAX)", 0, int64_t(1) << 59, 1},
};

// Calls with a given shape and flags and eps and pointers from ops; one per operation.
bnorm_status Training(Operands& o, const bnorm_shape* sh, float eps, unsigned flags,
                      bool with_mask = false) {
  return bnorm_forward_training(sh, eps, flags, o.x.data(), o.gamma.data(), o.beta.data(),
                                o.y.data(), o.mean.data(), o.var.data(),
                                with_mask ? o.mask.data() : nullptr);
}
bnorm_status Inference(Operands& o, const bnorm_shape* sh, float eps, unsigned flags) {
  return bnorm_forward_inference(sh, eps, flags, o.x.data(), o.gamma.data(), o.beta.data(),
                                 o.mean.data(), o.var.data(), o.y.data());
}
bnorm_status Backward(Operands& o, const bnorm_shape* sh, float eps, unsigned flags,
                      bool with_mask = false) {
  return bnorm_backward(sh, eps, flags, o.x.data(), o.dy.data(), o.gamma.data(), o.mean.data(),
                        o.var.data(), with_mask ? o.mask.data() : nullptr, o.dx.data(),
                        o.dgamma.data(), o.dbeta.data());
}

const bnorm_shape kValid{Operands::kN, Operands::kC, Operands::kS, BNORM_NCHW};

// The valid shape with an out-of-range layout value. Stored bytewise: converting 7 to
// bnorm_layout in C++ would itself be undefined (the enum's range is 0..1).
bnorm_shape WithLayoutValue(int v) {
  bnorm_shape sh = kValid;
  static_assert(sizeof(sh.layout) == sizeof(int), "bnorm_layout is int-sized");
  std::memcpy(&sh.layout, &v, sizeof v);
  return sh;
}

// Shape/eps/flag defects shared by all three tensor operations.
struct Defect {
  std::string what;
  bnorm_shape shape;
  float eps;
  unsigned flags;
};

std::vector<Defect> CommonDefects() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<Defect> d = {
      {"n < 0", {-1, 3, 5, BNORM_NCHW}, 1e-5f, 0},
      {"n = INT64_MIN", {std::numeric_limits<int64_t>::min(), 3, 5, BNORM_NCHW}, 1e-5f, 0},
      {"c = 0", {2, 0, 5, BNORM_NCHW}, 1e-5f, 0},
      {"c < 0", {2, -3, 5, BNORM_NCHW}, 1e-5f, 0},
      {"c < 0 and n < 0 (product positive)", {-2, -3, 5, BNORM_NCHW}, 1e-5f, 0},
      {"spatial < 0", {2, 3, -5, BNORM_NCHW}, 1e-5f, 0},
      {"spatial < 0 and n < 0 (product positive)", {-2, 3, -5, BNORM_NCHW}, 1e-5f, 0},
      {"layout 7", WithLayoutValue(7), 1e-5f, 0},
      {"layout 2", WithLayoutValue(2), 1e-5f, 0},
      {"layout -1", WithLayoutValue(-1), 1e-5f, 0},
      {"eps < 0", kValid, -1e-5f, 0},
      {"eps = -inf", kValid, -std::numeric_limits<float>::infinity(), 0},
      {"eps = NaN", kValid, nan, 0},
      {"eps = -NaN", kValid, -nan, 0},
      {"flags 4", kValid, 1e-5f, 4u},
      {"flags 0x80000000", kValid, 1e-5f, 0x80000000u},
      {"flags FUSE_RELU|8", kValid, 1e-5f, unsigned(BNORM_FUSE_RELU) | 8u},
  };
  for (const HugeShape& h : kHugeShapes) {
    d.push_back({std::string("overflow NCHW ") + h.what, {h.n, h.c, h.s, BNORM_NCHW}, 1e-5f, 0});
    d.push_back({std::string("overflow NHWC ") + h.what, {h.n, h.c, h.s, BNORM_NHWC}, 1e-5f, 0});
  }
  return d;
}

TEST(InvalidArgument, ForwardTraining) {
  ExpectRejected("shape NULL", [](Operands& o) { return Training(o, nullptr, 1e-5f, 0); });
  ExpectRejected("x NULL", [](Operands& o) {
    return bnorm_forward_training(&kValid, 1e-5f, 0, nullptr, o.gamma.data(), o.beta.data(),
                                  o.y.data(), o.mean.data(), o.var.data(), nullptr);
  });
  ExpectRejected("y NULL", [](Operands& o) {
    return bnorm_forward_training(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                  nullptr, o.mean.data(), o.var.data(), nullptr);
  });
  ExpectRejected("mean NULL", [](Operands& o) {
    return bnorm_forward_training(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                  o.y.data(), nullptr, o.var.data(), nullptr);
  });
  ExpectRejected("var NULL", [](Operands& o) {
    return bnorm_forward_training(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                  o.y.data(), o.mean.data(), nullptr, nullptr);
  });
  ExpectRejected("FUSE_RELU without mask",
                 [](Operands& o) { return Training(o, &kValid, 1e-5f, BNORM_FUSE_RELU); });
  ExpectRejected("GLOBAL_STATS in training",
                 [](Operands& o) { return Training(o, &kValid, 1e-5f, BNORM_GLOBAL_STATS, true); });
  ExpectRejected("GLOBAL_STATS|FUSE_RELU in training", [](Operands& o) {
    return Training(o, &kValid, 1e-5f, BNORM_GLOBAL_STATS | BNORM_FUSE_RELU, true);
  });
  for (bnorm_layout l : {BNORM_NCHW, BNORM_NHWC}) {
    const std::string tag = l == BNORM_NCHW ? " (NCHW)" : " (NHWC)";
    ExpectRejected("n = 0 in training" + tag, [l](Operands& o) {
      const bnorm_shape sh{0, 3, 5, l};
      return Training(o, &sh, 1e-5f, 0);
    });
    ExpectRejected("spatial = 0 in training" + tag, [l](Operands& o) {
      const bnorm_shape sh{2, 3, 0, l};
      return Training(o, &sh, 1e-5f, 0);
    });
  }
  for (const Defect& d : CommonDefects()) {
    ExpectRejected(d.what, [d](Operands& o) { return Training(o, &d.shape, d.eps, d.flags); });
    // The same defect with a mask supplied and FUSE_RELU on must be rejected just the same.
    if ((d.flags & ~1u) == 0)
      ExpectRejected(d.what + " (relu, with mask)", [d](Operands& o) {
        return Training(o, &d.shape, d.eps, d.flags | BNORM_FUSE_RELU, true);
      });
  }
}

TEST(InvalidArgument, ForwardInference) {
  ExpectRejected("shape NULL", [](Operands& o) { return Inference(o, nullptr, 1e-5f, 0); });
  ExpectRejected("x NULL", [](Operands& o) {
    return bnorm_forward_inference(&kValid, 1e-5f, 0, nullptr, o.gamma.data(), o.beta.data(),
                                   o.mean.data(), o.var.data(), o.y.data());
  });
  ExpectRejected("mean NULL", [](Operands& o) {
    return bnorm_forward_inference(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                   nullptr, o.var.data(), o.y.data());
  });
  ExpectRejected("var NULL", [](Operands& o) {
    return bnorm_forward_inference(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                   o.mean.data(), nullptr, o.y.data());
  });
  ExpectRejected("y NULL", [](Operands& o) {
    return bnorm_forward_inference(&kValid, 1e-5f, 0, o.x.data(), o.gamma.data(), o.beta.data(),
                                   o.mean.data(), o.var.data(), nullptr);
  });
  for (const Defect& d : CommonDefects())
    ExpectRejected(d.what, [d](Operands& o) { return Inference(o, &d.shape, d.eps, d.flags); });
  // Defects are still defects when the batch is empty (n = 0 is otherwise valid here).
  ExpectRejected("n = 0, c = 0", [](Operands& o) {
    const bnorm_shape sh{0, 0, 5, BNORM_NCHW};
    return Inference(o, &sh, 1e-5f, 0);
  });
  ExpectRejected("n = 0, eps < 0", [](Operands& o) {
    const bnorm_shape sh{0, 3, 5, BNORM_NCHW};
    return Inference(o, &sh, -1.0f, 0);
  });
  // The per-channel arrays are required even then (x and y may be NULL: EmptyBatch below).
  ExpectRejected("n = 0, mean NULL", [](Operands& o) {
    const bnorm_shape sh{0, 3, 5, BNORM_NCHW};
    return bnorm_forward_inference(&sh, 1e-5f, 0, nullptr, o.gamma.data(), o.beta.data(),
                                   nullptr, o.var.data(), nullptr);
  });
}

TEST(InvalidArgument, Backward) {
  ExpectRejected("shape NULL", [](Operands& o) { return Backward(o, nullptr, 1e-5f, 0); });
  auto call = [](Operands& o, bool x, bool dy, bool mean, bool var, bool dx) {
    return bnorm_backward(&kValid, 1e-5f, 0, x ? o.x.data() : nullptr, dy ? o.dy.data() : nullptr,
                          o.gamma.data(), mean ? o.mean.data() : nullptr,
                          var ? o.var.data() : nullptr, nullptr, dx ? o.dx.data() : nullptr,
                          o.dgamma.data(), o.dbeta.data());
  };
  ExpectRejected("x NULL", [call](Operands& o) { return call(o, 0, 1, 1, 1, 1); });
  ExpectRejected("dy NULL", [call](Operands& o) { return call(o, 1, 0, 1, 1, 1); });
  ExpectRejected("mean NULL", [call](Operands& o) { return call(o, 1, 1, 0, 1, 1); });
  ExpectRejected("var NULL", [call](Operands& o) { return call(o, 1, 1, 1, 0, 1); });
  ExpectRejected("dx NULL", [call](Operands& o) { return call(o, 1, 1, 1, 1, 0); });
  ExpectRejected("FUSE_RELU without mask",
                 [](Operands& o) { return Backward(o, &kValid, 1e-5f, BNORM_FUSE_RELU); });
  ExpectRejected("FUSE_RELU|GLOBAL_STATS without mask", [](Operands& o) {
    return Backward(o, &kValid, 1e-5f, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS);
  });
  for (const Defect& d : CommonDefects()) {
    ExpectRejected(d.what, [d](Operands& o) { return Backward(o, &d.shape, d.eps, d.flags); });
    if ((d.flags & ~1u) == 0)
      ExpectRejected(d.what + " (relu, with mask)", [d](Operands& o) {
        return Backward(o, &d.shape, d.eps, d.flags | BNORM_FUSE_RELU, true);
      });
  }
  ExpectRejected("n = 0, c = 0", [](Operands& o) {
    const bnorm_shape sh{0, 0, 5, BNORM_NCHW};
    return Backward(o, &sh, 1e-5f, 0);
  });
}

TEST(InvalidArgument, UpdateRunningStats) {
  auto call = [](Operands& o, int64_t c, int64_t count, bool m, bool v, bool rm, bool rv) {
    return bnorm_update_running_stats(
        c, count, 0.1f, m ? o.mean.data() : nullptr, v ? o.var.data() : nullptr,
        rm ? o.running_mean.data() : nullptr, rv ? o.running_var.data() : nullptr);
  };
  ExpectRejected("count = 1", [call](Operands& o) { return call(o, 3, 1, 1, 1, 1, 1); });
  ExpectRejected("count = 0", [call](Operands& o) { return call(o, 3, 0, 1, 1, 1, 1); });
  ExpectRejected("count < 0", [call](Operands& o) { return call(o, 3, -5, 1, 1, 1, 1); });
  ExpectRejected("c = 0", [call](Operands& o) { return call(o, 0, 10, 1, 1, 1, 1); });
  ExpectRejected("c < 0", [call](Operands& o) { return call(o, -3, 10, 1, 1, 1, 1); });
  ExpectRejected("c = 2^62 (bytes overflow)",
                 [call](Operands& o) { return call(o, int64_t(1) << 62, 10, 1, 1, 1, 1); });
  ExpectRejected("mean NULL", [call](Operands& o) { return call(o, 3, 10, 0, 1, 1, 1); });
  ExpectRejected("var NULL", [call](Operands& o) { return call(o, 3, 10, 1, 0, 1, 1); });
  ExpectRejected("running_mean NULL", [call](Operands& o) { return call(o, 3, 10, 1, 1, 0, 1); });
  ExpectRejected("running_var NULL", [call](Operands& o) { return call(o, 3, 10, 1, 1, 1, 0); });
}

// ---- Valid edge cases -------------------------------------------------------------------------

// Child-process checks: each returns 0 when all is well, else prints why.
int Check(bool ok, const std::string& msg) {
  if (!ok) std::fprintf(stderr, "%s\n", msg.c_str());
  return ok ? 0 : 1;
}

TEST(EmptyBatch, InferenceDoesNothing) {
  for (bnorm_layout l : {BNORM_NCHW, BNORM_NHWC})
    for (unsigned flags : {0u, unsigned(BNORM_FUSE_RELU), unsigned(BNORM_GLOBAL_STATS)})
      for (const bnorm_shape& sh : {bnorm_shape{0, 3, 5, l}, bnorm_shape{2, 3, 0, l}}) {
        ExpectInChild("inference " + describe(sh) + " flags=" + std::to_string(flags), [&] {
          Operands o;
          const auto before = o.Snapshot();
          const bnorm_status st = Inference(o, &sh, 1e-5f, flags);
          return Check(st == BNORM_SUCCESS,
                       "status " + std::to_string(st) + ": " + bnorm_last_error_message()) |
                 Check(o.Snapshot() == before, "inference on an empty batch wrote memory") |
                 Check(std::strcmp(bnorm_last_error_message(), "") == 0,
                       "error message not empty after success");
        });
      }
}

// An empty tensor's data pointer is often NULL (PyTorch's data_ptr()): every operation but
// training, which needs values, accepts NULL tensor arguments (x, y, dy, dx, relu_mask) then,
// and with the ReLU flag too; per-channel results are those of an empty batch.
TEST(EmptyBatch, TensorArgumentsMayBeNull) {
  for (bnorm_layout l : {BNORM_NCHW, BNORM_NHWC})
    for (unsigned flags : {0u, unsigned(BNORM_FUSE_RELU)})
      for (const bnorm_shape& sh : {bnorm_shape{0, 3, 5, l}, bnorm_shape{2, 3, 0, l}}) {
        SCOPED_TRACE(describe(sh) + " flags=" + std::to_string(flags));
        Operands o;
        const auto before = o.Snapshot();
        EXPECT_EQ(bnorm_forward_inference(&sh, 1e-5f, flags, nullptr, o.gamma.data(),
                                          o.beta.data(), o.mean.data(), o.var.data(), nullptr),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        EXPECT_EQ(bnorm_normalize(&sh, 1e-5f, flags, nullptr, o.gamma.data(), o.beta.data(),
                                  o.mean.data(), o.var.data(), nullptr, nullptr),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        EXPECT_EQ(bnorm_backward_apply(&sh, 1e-5f, flags, nullptr, nullptr, o.gamma.data(),
                                       o.mean.data(), o.var.data(), nullptr, nullptr, nullptr, 7,
                                       nullptr),
                  BNORM_INVALID_ARGUMENT)
            << "the sums are required without BNORM_GLOBAL_STATS";
        EXPECT_TRUE(o.Snapshot() == before) << "an empty batch wrote memory";

        double m[Operands::kC], m2[Operands::kC], sdy[Operands::kC], sdyx[Operands::kC];
        std::fill(m2, m2 + Operands::kC, -1.0);
        EXPECT_EQ(bnorm_moments(&sh, nullptr, m, m2), BNORM_SUCCESS) << bnorm_last_error_message();
        EXPECT_EQ(bnorm_backward_reduce(&sh, 1e-5f, flags, nullptr, nullptr, o.mean.data(),
                                        o.var.data(), nullptr, sdy, sdyx),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        for (int64_t c = 0; c < Operands::kC; ++c)
          EXPECT_TRUE(m[c] == 0 && m2[c] == 0 && sdy[c] == 0 && sdyx[c] == 0) << "c=" << c;
        EXPECT_EQ(bnorm_backward_apply(&sh, 1e-5f, flags, nullptr, nullptr, o.gamma.data(),
                                       o.mean.data(), o.var.data(), nullptr, sdy, sdyx, 7,
                                       nullptr),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        EXPECT_EQ(bnorm_backward(&sh, 1e-5f, flags, nullptr, nullptr, o.gamma.data(),
                                 o.mean.data(), o.var.data(), nullptr, nullptr, o.dgamma.data(),
                                 o.dbeta.data()),
                  BNORM_SUCCESS)
            << bnorm_last_error_message();
        for (int64_t c = 0; c < Operands::kC; ++c)
          EXPECT_TRUE(o.dgamma[c] == 0.0f && o.dbeta[c] == 0.0f) << "c=" << c;
        // Training still needs values, NULL or not.
        EXPECT_EQ(bnorm_forward_training(&sh, 1e-5f, flags, nullptr, nullptr, nullptr, nullptr,
                                         o.mean.data(), o.var.data(), nullptr),
                  BNORM_INVALID_ARGUMENT);
      }
}

TEST(EmptyBatch, BackwardWritesZeroParameterGradients) {
  for (bnorm_layout l : {BNORM_NCHW, BNORM_NHWC})
    for (unsigned flags : {0u, unsigned(BNORM_FUSE_RELU), unsigned(BNORM_GLOBAL_STATS)})
      for (const bnorm_shape& sh : {bnorm_shape{0, 3, 5, l}, bnorm_shape{2, 3, 0, l}}) {
        ExpectInChild("backward " + describe(sh) + " flags=" + std::to_string(flags), [&] {
          Operands o;
          const auto x = o.x.values(), dx = o.dx.values(), dy = o.dy.values();
          const bnorm_status st = Backward(o, &sh, 1e-5f, flags, true);
          int rc = Check(st == BNORM_SUCCESS,
                         "status " + std::to_string(st) + ": " + bnorm_last_error_message());
          for (int64_t c = 0; c < Operands::kC; ++c)
            rc |= Check(o.dgamma[c] == 0.0f && o.dbeta[c] == 0.0f,
                        "c=" + std::to_string(c) + ": dgamma=" + std::to_string(o.dgamma[c]) +
                            " dbeta=" + std::to_string(o.dbeta[c]) + ", expected 0");
          rc |= Check(o.dgamma.guards_intact() && o.dbeta.guards_intact(),
                      "wrote outside dgamma/dbeta");
          rc |= Check(
              bitwise_equal(o.dx.values().data(), dx.data(), dx.size()) && o.dx.guards_intact(),
              "backward on an empty batch wrote dx");
          rc |= Check(o.x.values() == x && o.dy.values() == dy, "modified an input");
          // Without dgamma/dbeta there is nothing to write at all.
          const bnorm_status st2 =
              bnorm_backward(&sh, 1e-5f, flags, o.x.data(), o.dy.data(), nullptr, o.mean.data(),
                             o.var.data(), o.mask.data(), o.dx.data(), nullptr, nullptr);
          rc |= Check(st2 == BNORM_SUCCESS, "with dgamma = dbeta = NULL: status " +
                                                std::to_string(st2) + ": " +
                                                bnorm_last_error_message());
          return rc;
        });
      }
}

// ---- Status strings and error messages -----------------------------------------------------

TEST(Status, StringNeverNull) {
  std::set<std::string> seen;
  for (bnorm_status s :
       {BNORM_SUCCESS, BNORM_INVALID_ARGUMENT, BNORM_UNSUPPORTED, BNORM_OUT_OF_MEMORY}) {
    const char* str = bnorm_status_string(s);
    ASSERT_NE(str, nullptr) << int(s);
    EXPECT_STRNE(str, "") << int(s);
    seen.insert(str);
  }
  EXPECT_EQ(seen.size(), 4u) << "status strings should be distinct";
  for (int s : {99, -1, 4, 1 << 30}) EXPECT_NE(bnorm_status_string(bnorm_status(s)), nullptr) << s;
}

TEST(Status, LastErrorMessage) {
  Operands o;
  ASSERT_EQ(Inference(o, &kValid, 1e-5f, 0), BNORM_SUCCESS);
  ASSERT_NE(bnorm_last_error_message(), nullptr);
  EXPECT_STREQ(bnorm_last_error_message(), "");
  const bnorm_shape bad{2, -3, 5, BNORM_NCHW};
  ASSERT_EQ(Inference(o, &bad, 1e-5f, 0), BNORM_INVALID_ARGUMENT);
  ASSERT_NE(bnorm_last_error_message(), nullptr);
  EXPECT_STRNE(bnorm_last_error_message(), "");
  // A success clears it again.
  ASSERT_EQ(Inference(o, &kValid, 1e-5f, 0), BNORM_SUCCESS);
  EXPECT_STREQ(bnorm_last_error_message(), "");
  // Per thread: a failure in another thread leaves this thread's message alone.
  std::string other;
  std::thread t([&] {
    Operands o2;
    EXPECT_EQ(Inference(o2, &bad, 1e-5f, 0), BNORM_INVALID_ARGUMENT);
    other = bnorm_last_error_message();
  });
  t.join();
  EXPECT_NE(other, "");
  EXPECT_STREQ(bnorm_last_error_message(), "");
}

// ---- Instruction set ------------------------------------------------------------------------

TEST(Isa, IsKnownAndStable) {
  const char* a = bnorm_isa();
  ASSERT_NE(a, nullptr);
  const std::string s = a;
  EXPECT_TRUE(s == "sse2" || s == "avx2" || s == "avx512") << s;
  EXPECT_EQ(std::string(bnorm_isa()), s) << "bnorm_isa() changed within the process";
  EXPECT_TRUE(cpu_supports(s)) << "library chose " << s << ", which this CPU lacks";
}

// ctest runs the suites with BNORM_ISA = sse2, avx2, avx512 (and unset, and an unknown value).
TEST(Isa, HonoursBnormIsa) {
  const std::string requested = requested_isa(), got = bnorm_isa();
  std::printf("BNORM_ISA=%s, bnorm_isa()=%s, best on this CPU=%s\n", requested.c_str(), got.c_str(),
              best_isa().c_str());
  EXPECT_EQ(got, expected_isa()) << "BNORM_ISA='" << requested << "'";
  if (requested.empty()) GTEST_SKIP() << "BNORM_ISA not set: the best set is in use";
  if (requested != "sse2" && requested != "avx2" && requested != "avx512")
    GTEST_SKIP() << "unknown BNORM_ISA value: falls back to the best set";
  if (!cpu_supports(requested))
    GTEST_SKIP() << "this CPU lacks " << requested << "; the run tested " << got << " instead";
}

// ---- Running statistics ----------------------------------------------------------------------

// Tolerance: 4u of each term's magnitude (two products, a sum, and count/(count-1)). A kernel
// using the biased variance is off by var/(count-1): at least 1e-6 relative for every count
// below, far over 4u; a swapped momentum ((1-m)*batch) fails for every m != 0.5.
TEST(RunningStats, MatchesReference) {
  const int64_t channels[] = {1, 3, 15, 16, 17, 33, 64, 251, 1000};
  const int64_t counts[] = {2, 3, 7, 1000, 123457};
  const float momenta[] = {0.0f, 0.1f, 0.01f, 0.3f, 1.0f};
  int k = 0;
  for (int64_t c : channels)
    for (int64_t count : counts)
      for (float mo : momenta) {
        ++k;
        SCOPED_TRACE("c=" + std::to_string(c) + " count=" + std::to_string(count) +
                     " momentum=" + std::to_string(mo));
        std::mt19937_64 rng(k);
        const auto mean0 = random_uniform(c, -5, 5, rng), var0 = random_uniform(c, 0.1, 4, rng);
        const auto rm0 = random_uniform(c, -5, 5, rng), rv0 = random_uniform(c, 0.1, 4, rng);
        Buffer<float> mean(c), var(c), rm(c), rv(c);
        mean.assign(mean0);
        var.assign(var0);
        rm.assign(rm0);
        rv.assign(rv0);
        ASSERT_EQ(
            bnorm_update_running_stats(c, count, mo, mean.data(), var.data(), rm.data(), rv.data()),
            BNORM_SUCCESS)
            << bnorm_last_error_message();
        EXPECT_STREQ(bnorm_last_error_message(), "");
        std::vector<double> erm(rm0.begin(), rm0.end()), erv(rv0.begin(), rv0.end());
        bnorm_ref::update_running_stats(c, count, mo, mean0.data(), var0.data(), erm, erv);
        const bnorm_shape sh{1, c, 1, BNORM_NCHW};
        const double m = mo;
        EXPECT_TRUE(close_channels("running_mean", sh, rm.data(), erm, [&](int64_t i) {
          return 4 * kU * (std::fabs((1 - m) * rm0[i]) + std::fabs(m * mean0[i]));
        }));
        EXPECT_TRUE(close_channels("running_var", sh, rv.data(), erv, [&](int64_t i) {
          return 4 * kU * (std::fabs((1 - m) * rv0[i]) + m * var0[i] * count / (count - 1.0));
        }));
        // Every instruction set gives the bits of the scalar expressions in double, rounded once
        // to float (the library's loop is vectorized per instruction set; in float, as checked,
        // they differ in many channels).
        const double keep = 1.0 - m, bessel = double(count) / double(count - 1);
        for (int64_t i = 0; i < c; ++i) {
          const float want_mean = float(keep * rm0[i] + m * mean0[i]);
          const float want_var = float(keep * rv0[i] + m * (var0[i] * bessel));
          ASSERT_TRUE(bitwise_equal(&rm[i], &want_mean, 1) && bitwise_equal(&rv[i], &want_var, 1))
              << "channel " << i << ": " << rm[i] << ", " << rv[i] << " instead of " << want_mean
              << ", " << want_var;
        }
        EXPECT_TRUE(rm.guards_intact() && rv.guards_intact());
        EXPECT_TRUE(mean.values() == mean0 && var.values() == var0 && mean.guards_intact() &&
                    var.guards_intact())
            << "update_running_stats modified its inputs";
        if (HasFailure()) return;
      }
}

}  // namespace
}  // namespace bnorm_test
