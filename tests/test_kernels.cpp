// Numerical tests of every operation against the double-precision reference, over shapes that
// hit every vector tail (widths 4, 8 and 16 floats), both layouts and every pointer option.
// The instruction set is whatever bnorm_isa() chose; ctest runs this binary once per BNORM_ISA.
#include <bnorm/bnorm.h>
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <initializer_list>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "bnorm_tester.hpp"
#include "reference.hpp"
#include "test_support.hpp"

namespace bnorm_test {
namespace {

// Channel and spatial sizes: 1, W-1, W, W+1 for W = 4, 8, 16 (3, 15, 16, 17 cover 16-wide tails,
// 15 and 17 also 8-wide and 4-wide ones), 2W+1 for W = 16, a multiple of every width, and a large
// prime.
const int64_t kSizes[] = {1, 3, 15, 16, 17, 33, 64, 251};
constexpr int kNumSizes = 8;
const int64_t kBatches[] = {1, 2, 7, 32};
const double kOffsets[] = {0, 3, -50};
const float kEps[] = {1e-5f, 1e-2f, 0.5f};

struct Variant {
  const char* name;
  bool relu, no_gamma, no_beta, no_dgamma, no_dbeta, global_stats, inplace;
};

const Variant kVariants[] = {
    // name                relu   gamma0 beta0  dgam0  dbet0  global inplace
    {"plain", false, false, false, false, false, false, false},
    {"relu", true, false, false, false, false, false, false},
    {"no_gamma_beta", false, true, true, false, false, false, false},
    {"no_gamma_relu", true, true, false, true, false, false, false},
    {"no_beta_no_dbeta", false, false, true, false, true, false, false},
    {"no_dgamma_dbeta", false, false, false, true, true, false, false},
    {"global_stats", false, false, false, false, false, true, false},
    {"global_stats_relu", true, false, false, false, false, true, true},
    {"inplace", false, false, false, false, false, false, true},
    {"inplace_relu", true, false, false, false, false, false, true},
};

using SweepParam = std::tuple<bnorm_layout, int64_t, int>;  // layout, N, variant

class Sweep : public ::testing::TestWithParam<SweepParam> {};

// For each (layout, N, variant), shapes (C, S) = (kSizes[i], kSizes[(i + r) % 8]) for every i and
// a few rotations r: every size appears as C and as S with every layout, N and variant, while the
// suite stays far below the full 8x8 cross product. The plain variant gets more rotations.
TEST_P(Sweep, MatchesReference) {
  const auto [layout, n, v] = GetParam();
  const Variant& var = kVariants[v];
  const std::vector<int> rotations =
      v == 0 ? std::vector<int>{0, 1, 3, 5, 7} : std::vector<int>{v % 8, (v + 3) % 8};
  int k = 0;
  for (int r : rotations)
    for (int i = 0; i < kNumSizes; ++i, ++k) {
      BnormTester()
          .layout(layout)
          .n(n)
          .c(kSizes[i])
          .spatial(kSizes[(i + r) % kNumSizes])
          .offset(kOffsets[k % 3])
          .eps(kEps[(k / 3 + v) % 3])
          .seed(1000003u * uint64_t(n) + 7919u * uint64_t(k) + 31u * uint64_t(v) + layout)
          .relu(var.relu)
          .no_gamma(var.no_gamma)
          .no_beta(var.no_beta)
          .no_dgamma(var.no_dgamma)
          .no_dbeta(var.no_dbeta)
          .global_stats(var.global_stats)
          .inplace(var.inplace)
          .Test();
      if (HasFailure()) return;  // one broken shape says enough; keep the log readable
    }
}

INSTANTIATE_TEST_SUITE_P(
    AllShapes, Sweep,
    ::testing::Combine(::testing::Values(BNORM_NCHW, BNORM_NHWC), ::testing::ValuesIn(kBatches),
                       ::testing::Range(0, int(sizeof(kVariants) / sizeof(kVariants[0])))),
    [](const ::testing::TestParamInfo<SweepParam>& info) {
      return std::string(std::get<0>(info.param) == BNORM_NCHW ? "nchw" : "nhwc") + "_n" +
             std::to_string(std::get<1>(info.param)) + "_" +
             kVariants[std::get<2>(info.param)].name;
    });

class Layouts : public ::testing::TestWithParam<bnorm_layout> {};

// (N, C) input: spatial = 1, every channel count, every N, plus a tall batch.
TEST_P(Layouts, TwoDimensionalInput) {
  int k = 0;
  for (int64_t n : {int64_t(1), int64_t(2), int64_t(7), int64_t(32), int64_t(1000)})
    for (int64_t c : kSizes) {
      ++k;
      BnormTester()
          .layout(GetParam())
          .n(n)
          .c(c)
          .spatial(1)
          .offset(kOffsets[k % 3])
          .eps(kEps[k % 3])
          .seed(77 + k)
          .relu(k % 2)
          .inplace(k % 5 == 0)
          .Test();
      if (HasFailure()) return;
    }
}

// Channel counts where the NHWC kernels change form: rows of fewer than 8 vectors (48 with AVX2:
// column groups and single vectors), rows of 8 vectors and more (64 and 72 with AVX2, 128 with
// AVX-512: the moments four rows at a time in memory order, beyond the cache up to 15 vectors
// (the small_cache run), the backward sums a row at a time), rows of exactly 8 AVX-512 vectors
// (128, one group in the backward sums), 256-511 channels (the moments a row at a time beyond
// the cache), rows from 512 channels on, and neighbours; with and without ReLU. 600 rows of 256
// channels: 0.6 MB.
// One BnormTester run of the shape, with the k-th offset and epsilon of the lists above.
void TestShape(bnorm_layout layout, int64_t n, int64_t c, int64_t spatial, int k, uint64_t seed,
               bool relu) {
  BnormTester()
      .layout(layout)
      .n(n)
      .c(c)
      .spatial(spatial)
      .offset(kOffsets[k % 3])
      .eps(kEps[k % 3])
      .seed(seed)
      .relu(relu)
      .Test();
}

struct Shape {
  int64_t n, c, s;
};

// TestShape for each shape, without and with ReLU, the k-th run with seed + k; stops at the
// first failure.
void TestShapes(bnorm_layout layout, std::initializer_list<Shape> shapes, uint64_t seed) {
  int k = 0;
  for (const Shape& t : shapes)
    for (bool relu : {false, true}) {
      ++k;
      TestShape(layout, t.n, t.c, t.s, k, seed + k, relu);
      if (::testing::Test::HasFailure()) return;
    }
}

// 1200 and 2100 channels: rows whose coefficients and data exceed a 32 KiB L1d, which the
// elementwise passes take in column blocks of 1024 channels (the backward's from 1171 channels
// on, the normalize's from 1639), the last block narrower.
TEST_P(Layouts, ChannelCountsOfKernelForms) {
  int k = 0;
  for (int64_t c : {int64_t(48), int64_t(64), int64_t(72), int64_t(128), int64_t(130),
                    int64_t(256), int64_t(512), int64_t(1040), int64_t(1200), int64_t(2100)})
    for (bool relu : {false, true}) {
      ++k;
      TestShape(GetParam(), 3, c, c == 256 ? 200 : 30, k, 991 + k, relu);
      if (HasFailure()) return;
    }
}

// NCHW planes of fewer than 256 values at batch 16 and more (sums) and 64 and more (moments)
// are reduced image after image, a vector of channels at a time (plane_walk in
// kernels/batchnorm.cpp): channels that do not fill the last vector, more than 256 images (two
// float sums per column; 64 channels, so that the tensor is one slice), planes of 9, 15, 49 and
// 196 values (planes of 2-8 values with as many images run as NHWC tensors: SpreadPlanes).
TEST_P(Layouts, ShortPlanes) {
  TestShapes(GetParam(), {{16, 64, 49}, {64, 70, 49}, {300, 64, 9}, {65, 33, 196}, {20, 100, 15}},
             1201);
}

// NCHW planes of more than 4096 values (kChunkValues) are reduced in pieces; in tensors of one
// slice (C >= 64) each thread takes its channels plane by plane, all the pieces of one channel's
// plane, then the next channel's (chunk_rows in kernels/batchnorm.cpp): two pieces, three with a
// short last one, one image.
TEST_P(Layouts, PlanesInPieces) {
  TestShapes(GetParam(), {{2, 64, 4100}, {3, 65, 9000}, {1, 70, 8193}}, 1251);
}

// NHWC rows whose channels do not fill whole vectors are read g rows at a time as rows of
// L = lcm(C, W, 8) channels (fold() in kernels/batchnorm.cpp), the rows left over as they are:
// rows a multiple of g, with a rest, fewer rows than g (no fold), one channel (g = 8 with AVX2),
// C = 127 (L = 1016 with AVX2, 2032 with AVX-512: folded or not by the vector width), C = 129
// (L beyond kFoldFloats), many slices of folded rows with a rest (65536 x 3 + 5 rows). C = 73
// folds to rows of 584 channels (AVX2, SSE2) and C = 584 stays so (AVX-512): rows of more than
// 512 channels, until session 24 reduced in blocks of 512 columns, the second one short (under
// the sanitizer, session 21's fuzzer found pointers formed past the block's sums there; rows of
// up to 2048 channels are now whole, and ChannelCountsOfKernelForms' C = 2100, in blocks of 512,
// has the short one).
TEST_P(Layouts, FoldedChannelCounts) {
  TestShapes(GetParam(),
             {{4, 3, 64},
              {3, 5, 33},
              {1, 3, 5},
              {2, 1, 999},
              {5, 127, 17},
              {3, 129, 20},
              {65541, 3, 1},
              {7, 20, 49},
              {4, 100, 15},
              {7, 73, 8},
              {7, 584, 1}},
             1301);
}

// NCHW planes of 2 to 8 values with at least as many images as values a plane run as the NHWC
// tensor of N rows and C * spatial columns (fold() in kernels/batchnorm.cpp): each channel's
// columns merged, per-channel inputs repeated. One channel, channels that fill no vector, more
// images than a chunk holds (300 and 600: several slices), and the shapes on either side of the
// rule (3 images of 4-value planes, 9-value planes: not spread).
TEST_P(Layouts, SpreadPlanes) {
  TestShapes(GetParam(),
             {{2, 3, 2},
              {16, 1, 4},
              {8, 64, 8},
              {5, 129, 5},
              {9, 1031, 6},
              {600, 5, 7},
              {300, 37, 3},
              {3, 40, 4},
              {8, 20, 9}},
             1401);
}

// 3-D inputs: spatial is D*H*W (the library only sees the product).
TEST_P(Layouts, ThreeDimensionalInput) {
  struct {
    int64_t n, c, d, h, w;
  } cases[] = {
      {2, 17, 3, 5, 7}, {3, 16, 4, 4, 4}, {1, 33, 2, 3, 5}, {4, 3, 5, 6, 7}, {2, 64, 1, 7, 9}};
  int k = 0;
  for (auto& t : cases)
    for (bool relu : {false, true}) {
      ++k;
      TestShape(GetParam(), t.n, t.c, t.d * t.h * t.w, k, 500 + k, relu);
      if (HasFailure()) return;
    }
}

// eps = 0 is valid (only eps < 0 is rejected).
TEST_P(Layouts, ZeroEps) {
  for (int64_t c : {int64_t(3), int64_t(17), int64_t(64)})
    BnormTester().layout(GetParam()).n(2).c(c).spatial(33).eps(0.0f).seed(c).Test();
}

// gamma = sqrtf(var + eps) computed in float from the training variance, beta = mean: the library
// computes scale = gamma / sqrtf(var + eps) = 1 exactly, so y = (x - mean)*1 + mean, which is x
// up to the rounding of the subtraction and the addition: |y - x| <= u*(|x - mean| + |x|) per
// element. Allowing 2u also covers a scale that is 1 +- 1 ulp (a kernel that computes it in
// another precision). A kernel that adds eps outside the square root or forgets it gets a scale
// of sqrt(var+eps)/sqrt(var) or so, far outside this (eps = 0.5 below).
TEST_P(Layouts, IdentityWithGammaSqrtVarBetaMean) {
  struct {
    int64_t n, c, s;
  } shapes[] = {{2, 17, 33}, {7, 3, 251}, {1, 64, 15}, {32, 16, 1}};
  int k = 0;
  for (auto& t : shapes)
    for (float eps : {1e-5f, 0.5f}) {
      ++k;
      const bnorm_shape sh{t.n, t.c, t.s, GetParam()};
      SCOPED_TRACE(describe(sh) + " eps=" + std::to_string(eps));
      std::mt19937_64 rng(900 + k);
      const std::vector<float> xv = random_x(sh, kOffsets[k % 3], rng);
      const int64_t count = bnorm_ref::elements(sh);
      Buffer<float> x(count), y(count), mean(t.c), var(t.c), y2(count), gamma(t.c);
      x.assign(xv);
      ASSERT_EQ(bnorm_forward_training(&sh, eps, 0, x.data(), nullptr, nullptr, y.data(),
                                       mean.data(), var.data(), nullptr),
                BNORM_SUCCESS);
      for (int64_t c = 0; c < t.c; ++c) gamma[c] = sqrtf(var[c] + eps);
      ASSERT_EQ(bnorm_forward_inference(&sh, eps, 0, x.data(), gamma.data(), mean.data(),
                                        mean.data(), var.data(), y2.data()),
                BNORM_SUCCESS);
      std::vector<double> want(xv.begin(), xv.end());
      EXPECT_TRUE(close_elements("identity y", sh, y2.data(), want, [&](int64_t i) {
        const double xi = xv[i], mu = mean[channel_of(sh, i)];
        return 2 * kU * (std::fabs(xi - mu) + std::fabs(xi));
      }));
      // Same through training: batch statistics are what training itself returns.
      Buffer<float> y3(count), mean3(t.c), var3(t.c);
      ASSERT_EQ(bnorm_forward_training(&sh, eps, 0, x.data(), gamma.data(), mean.data(), y3.data(),
                                       mean3.data(), var3.data(), nullptr),
                BNORM_SUCCESS);
      EXPECT_TRUE(bitwise_equal(mean3.data(), mean.data(), t.c) &&
                  bitwise_equal(var3.data(), var.data(), t.c))
          << "training statistics are not reproducible";
      EXPECT_TRUE(bitwise_equal(y3.data(), y2.data(), count))
          << "training y differs bitwise from inference y with the same statistics";
    }
}

INSTANTIATE_TEST_SUITE_P(BothLayouts, Layouts, ::testing::Values(BNORM_NCHW, BNORM_NHWC),
                         [](const ::testing::TestParamInfo<bnorm_layout>& info) {
                           return std::string(info.param == BNORM_NCHW ? "nchw" : "nhwc");
                         });

}  // namespace
}  // namespace bnorm_test
