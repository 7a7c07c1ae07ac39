// The C++ wrapper: one layer's training step, the identity
// gamma = sqrt(var + eps), beta = mean => y == x, and errors as exceptions.
#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const auto shape = bnorm::shape::nhwc(4, 32, 14 * 14);
  std::vector<float> x(shape.size()), y(shape.size()), dy(shape.size()), dx(shape.size());
  std::vector<float> gamma(shape.c, 1.f), beta(shape.c, 0.f), mean(shape.c), var(shape.c);
  std::vector<float> dgamma(shape.c), dbeta(shape.c);
  std::vector<uint8_t> mask(shape.mask_bytes());
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(3.f, 2.f);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng) - 3.f;

  bnorm::batch_norm bn(shape, 1e-5f);
  bn.affine(gamma, beta).relu();
  bn.forward_training(x, y, mean, var, mask);
  bn.backward(x, dy, mean, var, dx, {dgamma, dbeta}, mask);
  std::printf("isa %s: mean[0] %.4f var[0] %.4f dgamma[0] %.4f dbeta[0] %.4f\n",
              bnorm::isa().c_str(), mean[0], var[0], dgamma[0], dbeta[0]);

  // Undoing the normalization: gamma = sqrt(var + eps), beta = mean.
  for (int64_t c = 0; c < shape.c; ++c) {
    gamma[c] = std::sqrt(var[c] + bn.eps());
    beta[c] = mean[c];
  }
  bnorm::batch_norm identity(shape, bn.eps());
  identity.affine(gamma, beta);
  identity.forward_inference(x, y, mean, var);
  float worst = 0.f;
  for (size_t i = 0; i < x.size(); ++i) worst = std::fmax(worst, std::fabs(y[i] - x[i]));
  std::printf("identity: max |y - x| = %g\n", worst);
  if (worst > 1e-5f) return 1;

  try {
    std::vector<float> short_y(10);
    bn.forward_training(x, short_y, mean, var, mask);
    return 1;
  } catch (const bnorm::error& e) {
    std::printf("error as expected: %s\n", e.what());
    return e.status() == BNORM_INVALID_ARGUMENT ? 0 : 1;
  }
}
