// bnorm_mpi against one process. Every rank builds the whole batch from a
// seed, runs bnorm_forward_training and bnorm_backward on it (the reference),
// takes its own slice, runs the MPI versions on the slice and compares:
//  - mean, var, dgamma, dbeta bitwise the same on every rank, and within
//    1e-5 of the reference's scale;
//  - y and dx within 1e-5 of the reference's scale; ReLU mask bits equal
//    except where the reference y is within that tolerance of 0;
//  - when one rank holds the whole batch, everything bitwise equal to the
//    reference (bnorm.h promises that for one set of moments and sums).
// Then the collective error handling: one rank's bad argument or a mismatch
// between ranks fails every rank, with nothing written.
//
// Run under mpirun with any number of ranks; exit status 0 on every rank iff
// every check on every rank passed.
#include <bnorm/bnorm_mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int g_failures = 0;
double g_worst = 0;  // largest |difference| / scale seen where the tolerance applies
std::string g_case;  // what is being checked, for the messages

void failure(const char* format, ...) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (g_failures++ < 20) {
    char text[512];
    va_list args;
    va_start(args, format);
    std::vsnprintf(text, sizeof text, format, args);
    va_end(args);
    std::fprintf(stderr, "FAIL rank %d [%s]: %s\n", rank, g_case.c_str(), text);
  }
}

// Also the message: empty after a success, else naming the function.
void expect_status(bnorm_status got, bnorm_status want, const char* what) {
  const char* message = bnorm_last_error_message();
  if (got != want)
    failure("%s: status '%s', expected '%s' (%s)", what, bnorm_status_string(got),
            bnorm_status_string(want), message);
  else if (want == BNORM_SUCCESS && message[0] != '\0')
    failure("%s: success with the message \"%s\"", what, message);
  else if (want != BNORM_SUCCESS && std::strncmp(message, "bnorm_", 6) != 0)
    failure("%s: failed with the message \"%s\"", what, message);
}

// The message of the last failure contains `part`.
void expect_message(const char* part, const char* what) {
  if (!std::strstr(bnorm_last_error_message(), part))
    failure("%s: message \"%s\" does not say \"%s\"", what, bnorm_last_error_message(), part);
}

// Deterministic data: the same on every rank for the same seed.
struct lcg {
  uint64_t state;
  float uniform() {  // [-1, 1)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>((state >> 40) * (2.0 / (1ull << 24)) - 1.0);
  }
};

const float kSentinel = -12345.f;
const float kEps = 1e-5f;
const double kTolerance = 1e-5;

struct problem {
  int64_t n, c, spatial;
  bnorm_layout layout;
};

std::string describe(const problem& p, const std::vector<int64_t>& split, unsigned flags,
                     bool inplace, bool affine) {
  std::string s = (p.layout == BNORM_NCHW ? "nchw n" : "nhwc n") + std::to_string(p.n) + " c" +
                  std::to_string(p.c) + " s" + std::to_string(p.spatial) + " split";
  for (int64_t v : split) s += " " + std::to_string(v);
  if (flags & BNORM_FUSE_RELU) s += " relu";
  if (inplace) s += " inplace";
  if (!affine) s += " no-affine";
  return s;
}

bool get_bit(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1u; }
void set_bit(uint8_t* mask, int64_t i, bool v) {
  mask[i >> 3] = static_cast<uint8_t>((mask[i >> 3] & ~(1u << (i & 7))) | (unsigned(v) << (i & 7)));
}

double max_abs(const float* v, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(v[i])));
  return m;
}

// got[i] within kTolerance * scale of want[i]; or bitwise equal if `exact`.
void expect_close(const char* name, const float* got, const float* want, int64_t n, double scale,
                  bool exact) {
  for (int64_t i = 0; i < n; ++i) {
    const double error = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!exact && scale > 0) g_worst = std::max(g_worst, error / scale);
    if (exact ? std::memcmp(&got[i], &want[i], sizeof(float)) != 0
              : !(error <= kTolerance * scale)) {
      failure("%s[%lld] = %.9g, single process %.9g (%s, scale %.3g)", name,
              static_cast<long long>(i), got[i], want[i], exact ? "bitwise" : "1e-5", scale);
      return;
    }
  }
}

// v[0, n) bitwise the same on every rank of comm.
void expect_same_on_all_ranks(MPI_Comm comm, const char* name, const float* v, int64_t n) {
  int ranks = 0;
  MPI_Comm_size(comm, &ranks);
  std::vector<float> all(static_cast<size_t>(n) * ranks);
  MPI_Allgather(v, static_cast<int>(n), MPI_FLOAT, all.data(), static_cast<int>(n), MPI_FLOAT,
                comm);
  for (int r = 0; r < ranks; ++r)
    if (std::memcmp(&all[r * n], v, n * sizeof(float)) != 0)
      failure("%s differs between this rank and rank %d of the communicator", name, r);
}

// One problem, one split of the batch over the ranks of comm.
void run_case(MPI_Comm comm, const problem& p, const std::vector<int64_t>& split, unsigned relu,
              bool inplace, bool affine, uint64_t seed) {
  int rank = 0, ranks = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  g_case = describe(p, split, relu, inplace, affine);
  const int64_t c = p.c, per_sample = p.c * p.spatial, total = p.n * per_sample;

  // The whole batch, per channel offset and scale so that the mean matters.
  lcg rng{seed};
  std::vector<float> x(total), dy(total), gamma(c), beta(c);
  for (int64_t j = 0; j < c; ++j) {
    gamma[j] = 0.5f + 0.5f * std::fabs(rng.uniform());
    beta[j] = 0.3f * rng.uniform();
  }
  std::vector<float> offset(c), spread(c);
  for (int64_t j = 0; j < c; ++j) {
    offset[j] = 3.f * rng.uniform();
    spread[j] = 0.1f + std::fabs(rng.uniform());
  }
  for (int64_t i = 0; i < total; ++i) {
    const int64_t j = p.layout == BNORM_NCHW && p.spatial > 1 ? (i / p.spatial) % c : i % c;
    x[i] = offset[j] + spread[j] * rng.uniform();
    dy[i] = rng.uniform();
  }
  const float* g = affine ? gamma.data() : nullptr;
  const float* b = affine ? beta.data() : nullptr;

  // The reference: one process, the whole batch.
  const bnorm_shape whole{p.n, p.c, p.spatial, p.layout};
  std::vector<float> y_ref(total), mean_ref(c), var_ref(c), dx_ref(total), dg_ref(c), db_ref(c);
  std::vector<float> fdx_ref(total), fdg_ref(c), fdb_ref(c), fmean(c), fvar(c);
  std::vector<uint8_t> mask_ref((total + 7) / 8 + 1);
  expect_status(bnorm_forward_training(&whole, kEps, relu, x.data(), g, b, y_ref.data(),
                                       mean_ref.data(), var_ref.data(), mask_ref.data()),
                BNORM_SUCCESS, "reference forward");
  expect_status(
      bnorm_backward(&whole, kEps, relu, x.data(), dy.data(), g, mean_ref.data(), var_ref.data(),
                     mask_ref.data(), dx_ref.data(), dg_ref.data(), db_ref.data()),
      BNORM_SUCCESS, "reference backward");
  // Frozen statistics: not the batch's.
  for (int64_t j = 0; j < c; ++j) {
    fmean[j] = mean_ref[j] + 0.1f;
    fvar[j] = var_ref[j] * 1.5f + 0.01f;
  }
  expect_status(
      bnorm_backward(&whole, kEps, relu | BNORM_GLOBAL_STATS, x.data(), dy.data(), g, fmean.data(),
                     fvar.data(), mask_ref.data(), fdx_ref.data(), fdg_ref.data(), fdb_ref.data()),
      BNORM_SUCCESS, "reference backward, global stats");

  // This rank's slice. Empty slices pass NULL tensors.
  int64_t first = 0;
  for (int r = 0; r < rank; ++r) first += split[r];
  const int64_t n = split[rank], size = n * per_sample, at = first * per_sample;
  const bool whole_batch_here = n == p.n;
  const bnorm_shape local{n, p.c, p.spatial, p.layout};
  std::vector<float> xl(x.begin() + at, x.begin() + at + size);
  std::vector<float> dyl(dy.begin() + at, dy.begin() + at + size);
  std::vector<float> yl(size, kSentinel), dxl(size, kSentinel);
  std::vector<uint8_t> maskl((size + 7) / 8 + 1, 0xA5), mask_in((size + 7) / 8 + 1, 0);
  for (int64_t i = 0; i < size; ++i) set_bit(mask_in.data(), i, get_bit(mask_ref.data(), at + i));
  std::vector<float> mean(c, kSentinel), var(c, kSentinel), dg(c, kSentinel), db(c, kSentinel);
  const auto ptr = [size](auto& v) { return size > 0 ? v.data() : nullptr; };

  // Forward. In place: y is x's buffer.
  std::vector<float> xy = xl;
  float* y = inplace ? ptr(xy) : ptr(yl);
  expect_status(bnorm_mpi_forward_training(comm, &local, kEps, relu, inplace ? y : ptr(xl), g, b, y,
                                           mean.data(), var.data(), relu ? ptr(maskl) : nullptr),
                BNORM_SUCCESS, "bnorm_mpi_forward_training");
  expect_same_on_all_ranks(comm, "mean", mean.data(), c);
  expect_same_on_all_ranks(comm, "var", var.data(), c);
  double mean_scale = 0;
  for (int64_t j = 0; j < c; ++j)
    mean_scale =
        std::max(mean_scale, std::fabs(double(mean_ref[j])) + std::sqrt(double(var_ref[j])));
  expect_close("mean", mean.data(), mean_ref.data(), c, mean_scale, whole_batch_here);
  expect_close("var", var.data(), var_ref.data(), c, max_abs(var_ref.data(), c), whole_batch_here);
  const double y_scale = max_abs(y_ref.data(), total);
  if (size > 0) expect_close("y", y, &y_ref[at], size, y_scale, whole_batch_here);
  for (int64_t i = 0; relu && i < size; ++i) {
    if (get_bit(maskl.data(), i) != get_bit(mask_ref.data(), at + i) &&
        (whole_batch_here || std::fabs(y_ref[at + i]) > kTolerance * y_scale)) {
      failure("relu mask bit %lld = %d, single process %d (y %g)", static_cast<long long>(i),
              get_bit(maskl.data(), i), get_bit(mask_ref.data(), at + i), y_ref[at + i]);
      break;
    }
  }
  if (relu && size % 8 != 0 && maskl[(size + 7) / 8] != 0xA5)
    failure("relu mask written past its end");

  // Backward with batch statistics, from the reference's statistics and mask
  // (so that a near-zero y that rounds the other way does not change dy).
  // In place: dx is dy's buffer.
  std::vector<float> dydx = dyl;
  float* dx = inplace ? ptr(dydx) : ptr(dxl);
  expect_status(bnorm_mpi_backward(comm, &local, kEps, relu, ptr(xl), inplace ? dx : ptr(dyl), g,
                                   mean_ref.data(), var_ref.data(), relu ? ptr(mask_in) : nullptr,
                                   dx, dg.data(), db.data()),
                BNORM_SUCCESS, "bnorm_mpi_backward");
  expect_same_on_all_ranks(comm, "dgamma", dg.data(), c);
  expect_same_on_all_ranks(comm, "dbeta", db.data(), c);
  expect_close("dgamma", dg.data(), dg_ref.data(), c, max_abs(dg_ref.data(), c), whole_batch_here);
  expect_close("dbeta", db.data(), db_ref.data(), c, max_abs(db_ref.data(), c), whole_batch_here);
  if (size > 0)
    expect_close("dx", dx, &dx_ref[at], size, max_abs(dx_ref.data(), total), whole_batch_here);

  // Backward with frozen statistics: dx local, dgamma and dbeta global.
  std::fill(dg.begin(), dg.end(), kSentinel);
  std::fill(db.begin(), db.end(), kSentinel);
  dydx = dyl;
  std::fill(dxl.begin(), dxl.end(), kSentinel);
  expect_status(bnorm_mpi_backward(comm, &local, kEps, relu | BNORM_GLOBAL_STATS, ptr(xl),
                                   inplace ? dx : ptr(dyl), g, fmean.data(), fvar.data(),
                                   relu ? ptr(mask_in) : nullptr, dx, dg.data(), db.data()),
                BNORM_SUCCESS, "bnorm_mpi_backward, global stats");
  expect_same_on_all_ranks(comm, "dgamma (global stats)", dg.data(), c);
  expect_same_on_all_ranks(comm, "dbeta (global stats)", db.data(), c);
  expect_close("dgamma (global stats)", dg.data(), fdg_ref.data(), c, max_abs(fdg_ref.data(), c),
               whole_batch_here);
  expect_close("dbeta (global stats)", db.data(), fdb_ref.data(), c, max_abs(fdb_ref.data(), c),
               whole_batch_here);
  // dx = gamma*invstd*dy does not depend on the split at all.
  if (size > 0) expect_close("dx (global stats)", dx, &fdx_ref[at], size, 0, true);

  // Frozen statistics without dgamma and dbeta: no exchange, same dx.
  std::fill(dxl.begin(), dxl.end(), kSentinel);
  dydx = dyl;
  expect_status(bnorm_mpi_backward(comm, &local, kEps, relu | BNORM_GLOBAL_STATS, ptr(xl),
                                   inplace ? dx : ptr(dyl), g, fmean.data(), fvar.data(),
                                   relu ? ptr(mask_in) : nullptr, dx, nullptr, nullptr),
                BNORM_SUCCESS, "bnorm_mpi_backward, global stats, no dgamma/dbeta");
  if (size > 0) expect_close("dx (global stats, no sums)", dx, &fdx_ref[at], size, 0, true);
}

// Ways to split n samples over k ranks: even; growing with the rank (rank 0
// empty); the whole batch on the last rank; the whole batch on rank 0 but
// one sample on the last.
std::vector<std::vector<int64_t>> splits(int64_t n, int k) {
  std::vector<std::vector<int64_t>> out;
  std::vector<int64_t> even(k), growing(k, 0), last(k, 0), first(k, 0);
  for (int r = 0; r < k; ++r) even[r] = n / k + (r < n % k);
  out.push_back(even);
  if (k > 1) {
    const int64_t weights = static_cast<int64_t>(k) * (k - 1) / 2;  // 0 + 1 + ... + k-1
    int64_t done = 0, cumulative = 0;
    for (int r = 0; r < k; ++r) {
      cumulative += r;
      const int64_t end = n * cumulative / weights;
      growing[r] = end - done;
      done = end;
    }
    out.push_back(growing);
    last[k - 1] = n;
    out.push_back(last);
    if (n > 1) {
      first[0] = n - 1;
      first[k - 1] = 1;
      out.push_back(first);
    }
  }
  return out;
}

void run_cases(MPI_Comm comm, bool quick) {
  int ranks = 0;
  MPI_Comm_size(comm, &ranks);
  // Tails and blockings: (N, C) input, NHWC column blocks (64) and row chunks
  // (64 rows), NCHW rows cut into 4096-value pieces, several whole rows per
  // chunk, odd sizes everywhere (mask bytes shared between ranks' tensors and
  // between channels).
  std::vector<problem> problems = {
      {7, 3, 5, BNORM_NCHW},    {7, 3, 5, BNORM_NHWC},   {10, 17, 1, BNORM_NCHW},
      {130, 5, 1, BNORM_NHWC},  {5, 70, 9, BNORM_NHWC},  {5, 70, 9, BNORM_NCHW},
      {3, 4, 4100, BNORM_NCHW}, {16, 8, 33, BNORM_NCHW}, {9, 129, 13, BNORM_NHWC},
      {4, 2, 1, BNORM_NCHW},
  };
  // Large enough for several OpenMP threads where OMP_NUM_THREADS allows.
  if (!quick) {
    problems.push_back({8, 32, 56 * 56, BNORM_NCHW});
    problems.push_back({8, 32, 56 * 56, BNORM_NHWC});
  }
  uint64_t seed = 1;
  int variant = 0;
  for (const problem& p : problems)
    for (const auto& split : splits(p.n, ranks))
      for (unsigned relu : {0u, unsigned(BNORM_FUSE_RELU)}) {
        ++variant;
        run_case(comm, p, split, relu, variant % 2 == 0, variant % 5 != 0, seed++);
      }
}

// Collective errors: every rank gets the same status, nothing is written.
void run_errors() {
  int rank = 0, ranks = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const bool last = rank == ranks - 1;
  const int64_t c = 6, spatial = 5, n = 3, size = n * c * spatial;
  std::vector<float> x(size), dy(size), y(size, kSentinel), dx(size, kSentinel);
  lcg rng{99};
  for (int64_t i = 0; i < size; ++i) {
    x[i] = rng.uniform();
    dy[i] = rng.uniform();
  }
  std::vector<float> mean(c, kSentinel), var(c, kSentinel), dg(c, kSentinel), db(c, kSentinel);
  std::vector<float> stats_mean(c, 0.f), stats_var(c, 1.f);
  std::vector<uint8_t> mask((size + 7) / 8, 0);
  const bnorm_shape good{n, c, spatial, BNORM_NCHW};

  const auto untouched = [&](const char* what) {
    const auto same = [](const std::vector<float>& v) {
      return std::all_of(v.begin(), v.end(), [](float f) { return f == kSentinel; });
    };
    if (!same(y) || !same(mean) || !same(var) || !same(dx) || !same(dg) || !same(db))
      failure("%s: an output was written although the call failed", what);
  };
  const auto forward = [&](const bnorm_shape& s, float eps, unsigned flags, const float* xp) {
    return bnorm_mpi_forward_training(MPI_COMM_WORLD, &s, eps, flags, xp, nullptr, nullptr,
                                      y.data(), mean.data(), var.data(), mask.data());
  };
  const auto backward = [&](const bnorm_shape& s, float eps, unsigned flags, const float* xp,
                            float* dxp, float* dgp, float* dbp) {
    return bnorm_mpi_backward(MPI_COMM_WORLD, &s, eps, flags, xp, dy.data(), nullptr,
                              stats_mean.data(), stats_var.data(), mask.data(), dxp, dgp, dbp);
  };

  g_case = "errors";
  bnorm_shape other_c = good;
  other_c.c = last ? c - 1 : c;
  if (ranks > 1) {
    expect_status(forward(other_c, kEps, 0, x.data()), BNORM_INVALID_ARGUMENT,
                  "forward, c differs on the last rank");
    expect_message("c differs between the ranks", "forward, c differs on the last rank");
    expect_status(backward(other_c, kEps, 0, x.data(), dx.data(), dg.data(), db.data()),
                  BNORM_INVALID_ARGUMENT, "backward, c differs on the last rank");
  }
  bnorm_shape other_layout = good;
  other_layout.layout = last && ranks > 1 ? BNORM_NHWC : BNORM_NCHW;
  bnorm_shape other_spatial = good;
  other_spatial.spatial = last && ranks > 1 ? spatial - 1 : spatial;
  if (ranks > 1) {
    expect_status(forward(other_layout, kEps, 0, x.data()), BNORM_INVALID_ARGUMENT,
                  "forward, layout differs on the last rank");
    expect_status(forward(other_spatial, kEps, 0, x.data()), BNORM_INVALID_ARGUMENT,
                  "forward, spatial differs on the last rank");
    expect_status(forward(good, last ? 2e-5f : kEps, 0, x.data()), BNORM_INVALID_ARGUMENT,
                  "forward, eps differs on the last rank");
    expect_status(forward(good, kEps, last ? BNORM_FUSE_RELU : 0, x.data()), BNORM_INVALID_ARGUMENT,
                  "forward, flags differ on the last rank");
    expect_status(backward(good, last ? 2e-5f : kEps, 0, x.data(), dx.data(), dg.data(), db.data()),
                  BNORM_INVALID_ARGUMENT, "backward, eps differs on the last rank");
    expect_status(backward(good, kEps, BNORM_GLOBAL_STATS, x.data(), dx.data(),
                           last ? nullptr : dg.data(), last ? nullptr : db.data()),
                  BNORM_INVALID_ARGUMENT, "backward, global stats, dgamma on some ranks only");
  }
  expect_status(forward(good, kEps, 0, last ? nullptr : x.data()), BNORM_INVALID_ARGUMENT,
                "forward, x NULL on the last rank");
  expect_message(last ? "x is NULL" : "another rank's arguments are invalid",
                 "forward, x NULL on the last rank");
  expect_status(forward(good, kEps, BNORM_GLOBAL_STATS, x.data()), BNORM_INVALID_ARGUMENT,
                "forward, BNORM_GLOBAL_STATS");
  expect_status(forward(good, -1.f, 0, x.data()), BNORM_INVALID_ARGUMENT, "forward, eps < 0");
  bnorm_shape bad = good;
  bad.c = last ? 0 : c;
  expect_status(forward(bad, kEps, 0, x.data()), BNORM_INVALID_ARGUMENT, "forward, c = 0 on last");
  bad = good;
  bad.n = last ? -1 : n;
  expect_status(backward(bad, kEps, 0, x.data(), dx.data(), dg.data(), db.data()),
                BNORM_INVALID_ARGUMENT, "backward, n < 0 on the last rank");
  expect_status(
      backward(good, kEps, 0, x.data(), last ? x.data() + 1 : dx.data(), dg.data(), db.data()),
      BNORM_INVALID_ARGUMENT, "backward, dx overlaps x on the last rank");
  expect_status(
      backward(good, kEps, BNORM_FUSE_RELU | 4u, x.data(), dx.data(), dg.data(), db.data()),
      BNORM_INVALID_ARGUMENT, "backward, unknown flag");
  // Every slice empty: no batch statistics (as bnorm_forward_training with
  // n = 0); backward of nothing is zero sums.
  const bnorm_shape empty{0, c, spatial, BNORM_NCHW};
  expect_status(forward(empty, kEps, 0, nullptr), BNORM_INVALID_ARGUMENT,
                "forward, the global batch is empty");
  expect_message("no values", "forward, the global batch is empty");
  expect_status(bnorm_mpi_forward_training(MPI_COMM_NULL, &good, kEps, 0, x.data(), nullptr,
                                           nullptr, y.data(), mean.data(), var.data(), nullptr),
                BNORM_INVALID_ARGUMENT, "forward, MPI_COMM_NULL");
  expect_status(bnorm_mpi_backward(MPI_COMM_NULL, &good, kEps, 0, x.data(), dy.data(), nullptr,
                                   stats_mean.data(), stats_var.data(), nullptr, dx.data(),
                                   dg.data(), db.data()),
                BNORM_INVALID_ARGUMENT, "backward, MPI_COMM_NULL");
  untouched("failed calls");

  g_case = "empty batch";
  expect_status(backward(empty, kEps, 0, nullptr, nullptr, dg.data(), db.data()), BNORM_SUCCESS,
                "backward, the global batch is empty");
  for (int64_t j = 0; j < c; ++j)
    if (dg[j] != 0.f || db[j] != 0.f) failure("dgamma/dbeta of an empty batch are not 0");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const auto start = std::chrono::steady_clock::now();

  run_cases(MPI_COMM_WORLD, quick);
  // A communicator other than MPI_COMM_WORLD: the odd and the even ranks.
  if (ranks > 1) {
    MPI_Comm half;
    MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &half);
    run_cases(half, true);
    MPI_Comm_free(&half);
  }
  run_errors();

  int failures = 0;
  double worst = 0;
  MPI_Allreduce(&g_failures, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&g_worst, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (rank == 0)
    std::printf(
        "bnorm_mpi on %d rank(s), isa %s: %s (%d failed check(s), largest difference %.2g of "
        "scale), %.2f s\n",
        ranks, bnorm_isa(), failures ? "FAILED" : "passed", failures, worst, seconds);
  MPI_Finalize();
  return failures ? 1 : 0;
}
