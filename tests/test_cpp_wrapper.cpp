// The C++ wrapper (include/bnorm/bnorm.hpp): the same bits as the C ABI, sizes checked before any
// call, failures as bnorm::error with the status and the message, empty tensors accepted.
#include <bnorm/bnorm.hpp>
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace bnorm_test {
namespace {

struct Layer {
  bnorm::shape shape;
  std::vector<float> x, dy, gamma, beta;

  explicit Layer(bnorm::shape s) : shape(s) {
    std::mt19937_64 rng(11);
    x = random_uniform(s.size(), -2, 3, rng);
    dy = random_uniform(s.size(), -1, 1, rng);
    gamma = random_uniform(s.c, 0.5, 2, rng);
    beta = random_uniform(s.c, -1, 1, rng);
  }
};

// f throws bnorm::error with BNORM_INVALID_ARGUMENT and a message containing `part`.
template <class F>
::testing::AssertionResult ThrowsInvalid(F f, const std::string& part) {
  try {
    f();
  } catch (const bnorm::error& e) {
    if (e.status() != BNORM_INVALID_ARGUMENT)
      return ::testing::AssertionFailure() << "status " << e.status() << ": " << e.what();
    if (std::string(e.what()).find(part) == std::string::npos)
      return ::testing::AssertionFailure() << "\"" << e.what() << "\" does not say " << part;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no exception";
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && bitwise_equal(a.data(), b.data(), a.size());
}

TEST(CppWrapper, GivesTheBitsOfTheCAbi) {
  for (const bnorm::shape& s : {bnorm::shape::nchw(3, 5, 49), bnorm::shape::nhwc(4, 33, 10)}) {
    SCOPED_TRACE(describe(s.c_shape()));
    const Layer l(s);
    const int64_t t = s.size(), c = s.c;
    bnorm::batch_norm bn(s, 1e-3f);
    bn.affine(l.gamma, l.beta).relu();
    std::vector<float> y(t), mean(c), var(c), dx(t), dgamma(c), dbeta(c), yi(t);
    std::vector<uint8_t> mask(s.mask_bytes());
    bn.forward_training(l.x, y, mean, var, mask);
    bn.forward_inference(l.x, yi, mean, var);
    bn.backward(l.x, l.dy, mean, var, dx, {dgamma, dbeta}, mask);

    const bnorm_shape cs = s.c_shape();
    std::vector<float> y2(t), mean2(c), var2(c), dx2(t), dgamma2(c), dbeta2(c), yi2(t);
    std::vector<uint8_t> mask2(s.mask_bytes());
    ASSERT_EQ(bnorm_forward_training(&cs, 1e-3f, BNORM_FUSE_RELU, l.x.data(), l.gamma.data(),
                                     l.beta.data(), y2.data(), mean2.data(), var2.data(),
                                     mask2.data()),
              BNORM_SUCCESS);
    ASSERT_EQ(bnorm_forward_inference(&cs, 1e-3f, BNORM_FUSE_RELU, l.x.data(), l.gamma.data(),
                                      l.beta.data(), mean2.data(), var2.data(), yi2.data()),
              BNORM_SUCCESS);
    ASSERT_EQ(bnorm_backward(&cs, 1e-3f, BNORM_FUSE_RELU, l.x.data(), l.dy.data(), l.gamma.data(),
                             mean2.data(), var2.data(), mask2.data(), dx2.data(), dgamma2.data(),
                             dbeta2.data()),
              BNORM_SUCCESS);
    EXPECT_TRUE(same(y, y2) && same(mean, mean2) && same(var, var2) && mask == mask2);
    EXPECT_TRUE(same(yi, yi2));
    EXPECT_TRUE(same(dx, dx2) && same(dgamma, dgamma2) && same(dbeta, dbeta2));

    // Without affine(), gamma = 1 and beta = 0: the C ABI's NULLs.
    bnorm::batch_norm plain(s, 1e-3f);
    plain.forward_training(l.x, y, mean, var);
    ASSERT_EQ(bnorm_forward_training(&cs, 1e-3f, 0, l.x.data(), nullptr, nullptr, y2.data(),
                                     mean2.data(), var2.data(), nullptr),
              BNORM_SUCCESS);
    EXPECT_TRUE(same(y, y2) && same(mean, mean2) && same(var, var2));
  }
}

// A wrong size throws before the library is called: nothing is written.
TEST(CppWrapper, SizesAreCheckedFirst) {
  const bnorm::shape s = bnorm::shape::nchw(2, 3, 5);
  const Layer l(s);
  bnorm::batch_norm bn(s);
  std::vector<float> y(s.size() - 1, 7.f), mean(s.c, 7.f), var(s.c, 7.f);
  EXPECT_TRUE(ThrowsInvalid([&] { bn.forward_training(l.x, y, mean, var); }, "output tensor"));
  for (float v : y) EXPECT_EQ(v, 7.f);
  for (float v : mean) EXPECT_EQ(v, 7.f);

  std::vector<float> y_ok(s.size()), dx(s.size()), dgamma(s.c + 1);
  bn.relu();
  std::vector<uint8_t> short_mask(s.mask_bytes() - 1);
  EXPECT_THROW(bn.forward_training(l.x, y_ok, mean, var, short_mask), bnorm::error);
  bn.relu(false);
  EXPECT_THROW(bn.backward(l.x, l.dy, mean, var, dx, {dgamma, {}}), bnorm::error);
}

// The library's own checks come back as bnorm::error with its status and message.
TEST(CppWrapper, LibraryFailuresBecomeExceptions) {
  const bnorm::shape s = bnorm::shape::nhwc(2, 3, 5);
  const Layer l(s);
  bnorm::batch_norm bn(s, -1.f);  // eps < 0
  std::vector<float> y(s.size()), mean(s.c), var(s.c);
  EXPECT_TRUE(ThrowsInvalid([&] { bn.forward_training(l.x, y, mean, var); }, "eps"));
  std::vector<float> rm(s.c), rv(s.c);
  EXPECT_THROW(bnorm::update_running_stats(mean, var, 1, 0.1f, rm, rv), bnorm::error);  // count 1
}

// Empty vectors give NULL data pointers (view::data()); an empty batch still works.
TEST(CppWrapper, EmptyBatch) {
  const bnorm::shape s = bnorm::shape::nchw(0, 4, 49);
  std::vector<float> none, mean(s.c, 0.5f), var(s.c, 2.f), dgamma(s.c, 7.f), dbeta(s.c, 7.f);
  bnorm::batch_norm bn(s);
  EXPECT_NO_THROW(bn.forward_inference(none, none, mean, var));
  EXPECT_NO_THROW(bn.backward(none, none, mean, var, none, {dgamma, dbeta}));
  for (int64_t c = 0; c < s.c; ++c) EXPECT_TRUE(dgamma[c] == 0.f && dbeta[c] == 0.f);
  std::vector<float> m(s.c), v(s.c);
  EXPECT_THROW(bn.forward_training(none, none, m, v), bnorm::error);  // training needs values
}

}  // namespace
}  // namespace bnorm_test
