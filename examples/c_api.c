/* The C ABI end to end: forward training with fused ReLU, backward, running
 * statistics, and what a bad argument looks like. */
#include <bnorm/bnorm.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
  const bnorm_shape shape = {8, 16, 7 * 7, BNORM_NCHW};
  const int64_t size = shape.n * shape.c * shape.spatial;
  float* x = malloc(size * sizeof *x);
  float* y = malloc(size * sizeof *y);
  float* dy = malloc(size * sizeof *dy);
  float* dx = malloc(size * sizeof *dx);
  uint8_t* mask = malloc((size + 7) / 8);
  float gamma[16], beta[16], mean[16], var[16], dgamma[16], dbeta[16];
  float running_mean[16] = {0}, running_var[16];
  for (int64_t i = 0; i < size; ++i) {
    x[i] = (float)((i * 7919) % 1000) / 100.0f; /* 0 .. 10 */
    dy[i] = (float)((i * 104729) % 200) / 100.0f - 1.0f;
  }
  for (int c = 0; c < 16; ++c) {
    gamma[c] = 1.0f + 0.1f * c;
    beta[c] = 0.5f;
    running_var[c] = 1.0f;
  }

  bnorm_status s = bnorm_forward_training(&shape, 1e-5f, BNORM_FUSE_RELU, x, gamma, beta, y,
                                          mean, var, mask);
  if (s != BNORM_SUCCESS) goto failed;
  s = bnorm_backward(&shape, 1e-5f, BNORM_FUSE_RELU, x, dy, gamma, mean, var, mask, dx, dgamma,
                     dbeta);
  if (s != BNORM_SUCCESS) goto failed;
  s = bnorm_update_running_stats(16, shape.n * shape.spatial, 0.1f, mean, var, running_mean,
                                 running_var);
  if (s != BNORM_SUCCESS) goto failed;
  printf("isa %s: channel 0 mean %.4f var %.4f dgamma %.4f dbeta %.4f running_var %.4f\n",
         bnorm_isa(), mean[0], var[0], dgamma[0], dbeta[0], running_var[0]);
  if (!(fabsf(mean[0] - 5.0f) < 0.5f)) {
    fprintf(stderr, "unexpected mean %f\n", mean[0]);
    return 1;
  }

  /* A bad argument: a status and a message, and nothing written. */
  const bnorm_shape bad = {8, 0, 49, BNORM_NCHW};
  s = bnorm_forward_training(&bad, 1e-5f, 0, x, NULL, NULL, y, mean, var, NULL);
  printf("c = 0 gives '%s': %s\n", bnorm_status_string(s), bnorm_last_error_message());
  if (s != BNORM_INVALID_ARGUMENT) return 1;
  free(x), free(y), free(dy), free(dx), free(mask);
  return 0;

failed:
  fprintf(stderr, "bnorm: %s: %s\n", bnorm_status_string(s), bnorm_last_error_message());
  return 1;
}
