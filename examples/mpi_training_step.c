/* Data-parallel training of one batch-norm layer (with fused ReLU) over MPI:
 * each rank holds a slice of the batch, the layer's statistics and gradients
 * are those of the whole batch, and since dgamma and dbeta come out the same
 * on every rank, every rank's SGD step keeps gamma and beta in sync without
 * a broadcast.
 *
 *   mpirun -np 4 ./bnorm_example_mpi
 *
 * The toy loss is L = sum((y - t)^2) / (2 * M) over the M values per channel
 * of the whole batch, with target t = 2 * x + 1: the layer learns
 * gamma = 2 * std(x) and beta = 2 * mean(x) + 1 (for channel 0, x is uniform
 * in [0, 2): gamma -> 1.155, beta -> 3). */
#include <bnorm/bnorm_mpi.h>
#include <stdio.h>
#include <stdlib.h>

enum { kChannels = 8, kSpatial = 6 * 6, kSteps = 30 };

static int check(bnorm_status s, const char* what, int rank) {
  if (s == BNORM_SUCCESS) return 0;
  fprintf(stderr, "rank %d: %s: %s %s\n", rank, what, bnorm_status_string(s),
          bnorm_last_error_message());
  return 1;
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);

  /* This rank's slice: 4 + rank samples, so the slices differ in size. */
  const bnorm_shape shape = {4 + rank, kChannels, kSpatial, BNORM_NCHW};
  const int64_t size = shape.n * shape.c * shape.spatial;
  float* x = malloc(size * sizeof *x);
  float* y = malloc(size * sizeof *y);
  float* dy = malloc(size * sizeof *dy);
  float* dx = malloc(size * sizeof *dx);
  uint8_t* mask = malloc((size + 7) / 8);
  float gamma[kChannels], beta[kChannels], mean[kChannels], var[kChannels];
  float dgamma[kChannels], dbeta[kChannels], running_mean[kChannels], running_var[kChannels];
  const float eps = 1e-5f, learning_rate = 0.5f, momentum = 0.1f;
  int failed = 0;

  /* Values per channel in the whole batch: the loss's normalization and the
   * count for the unbiased running variance. */
  const int64_t local_count = shape.n * shape.spatial;
  int64_t count = 0;
  MPI_Allreduce(&local_count, &count, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);

  for (int c = 0; c < kChannels; ++c) {
    gamma[c] = 1.0f;
    beta[c] = 0.0f;
    running_mean[c] = 0.0f;
    running_var[c] = 1.0f;
  }
  srand(1 + rank);
  for (int step = 0; step < kSteps && !failed; ++step) {
    for (int64_t i = 0; i < size; ++i) /* a fresh batch: uniform in [c, c + 2) */
      x[i] = (float)((i / kSpatial) % kChannels) + 2.0f * (float)rand() / (float)RAND_MAX;

    failed |= check(bnorm_mpi_forward_training(MPI_COMM_WORLD, &shape, eps, BNORM_FUSE_RELU, x,
                                               gamma, beta, y, mean, var, mask),
                    "forward", rank);
    if (failed) break;

    /* dL/dy of the toy loss; the loss itself, summed over the ranks. */
    double local_loss = 0.0, loss = 0.0;
    for (int64_t i = 0; i < size; ++i) {
      const float target = 2.0f * x[i] + 1.0f;
      dy[i] = (y[i] - target) / (float)count;
      local_loss += 0.5 * (double)(y[i] - target) * (y[i] - target) / (double)count;
    }
    MPI_Allreduce(&local_loss, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

    failed |= check(bnorm_mpi_backward(MPI_COMM_WORLD, &shape, eps, BNORM_FUSE_RELU, x, dy, gamma,
                                       mean, var, mask, dx, dgamma, dbeta),
                    "backward", rank);
    failed |= check(bnorm_update_running_stats(kChannels, count, momentum, mean, var, running_mean,
                                               running_var),
                    "running statistics", rank);
    if (failed) break;
    /* dx would go on to the layer below; here the step ends with SGD. */
    for (int c = 0; c < kChannels; ++c) {
      gamma[c] -= learning_rate * dgamma[c];
      beta[c] -= learning_rate * dbeta[c];
    }
    if (rank == 0 && (step % 10 == 0 || step == kSteps - 1))
      printf("step %2d: loss %8.4f  channel 0: mean %.3f var %.3f gamma %.3f beta %.3f\n", step,
             loss, mean[0], var[0], gamma[0], beta[0]);
  }

  /* The parameters are the same on every rank, bitwise. */
  float first[2 * kChannels], mine[2 * kChannels];
  for (int c = 0; c < kChannels; ++c) {
    mine[c] = gamma[c];
    mine[kChannels + c] = beta[c];
    first[c] = gamma[c];
    first[kChannels + c] = beta[c];
  }
  MPI_Bcast(first, 2 * kChannels, MPI_FLOAT, 0, MPI_COMM_WORLD);
  for (int c = 0; c < 2 * kChannels; ++c)
    if (first[c] != mine[c]) {
      fprintf(stderr, "rank %d: parameters differ from rank 0's\n", rank);
      failed = 1;
      break;
    }
  if (rank == 0 && !failed)
    printf("%d ranks, %lld values per channel: gamma/beta in sync, running var[0] %.3f\n", ranks,
           (long long)count, running_var[0]);

  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  free(x), free(y), free(dy), free(dx), free(mask);
  MPI_Finalize();
  return any_failed;
}
