// Synchronized batch norm: the split-phase API of bnorm.h with the
// per-channel statistics exchanged between the phases.
//
//   forward:  bnorm_moments (local) -> gather -> bnorm_merge_moments (rank
//             order) -> bnorm_normalize (local)
//   backward: bnorm_backward_reduce (local) -> gather -> sum in rank order
//             -> bnorm_backward_apply (local, global count)
//
// Each call is two collectives. First an MPI_Allreduce(MAX) of a fixed-size
// header through which the ranks agree that every rank's arguments are valid
// and that c, spatial, layout, eps and flags are the same everywhere; the
// local pass that can fail (moments or backward sums, which allocate) runs
// before it, so its status takes part. Nothing is written before this point,
// and every rank takes the same decision from the same reduced header. Then
// one MPI_Allgather of [count, c values, c values] in doubles per rank, into
// scratch allocated (and agreed on) before the header.
//
// Determinism. The per-rank results are gathered and combined in rank order
// on every rank rather than added by MPI_Allreduce(MPI_SUM), whose order
// depends on the MPI library, its algorithm choice and the message size. So
// mean, var, dgamma and dbeta are bitwise the same on every rank and in every
// run, for c * ranks doubles received per rank instead of c: O(c) per call,
// independent of the batch, for a given number of ranks.
#include "bnorm/bnorm_mpi.h"

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

// Sets this thread's bnorm_last_error_message() (defined in
// kernels/batchnorm.cpp, exported for this library, in no public header).
extern "C" void bnorm_set_last_error_message(const char* message);

namespace {

// The message of a failure of fn, for bnorm_last_error_message(); returns status.
bnorm_status report(bnorm_status status, const char* fn, const std::string& why) {
  bnorm_set_last_error_message((std::string(fn) + ": " + why).c_str());
  return status;
}

bnorm_status succeed() {
  bnorm_set_last_error_message("");
  return BNORM_SUCCESS;
}

std::string format(const char* f, long long a, long long b = 0, long long c = 0,
                   long long d = 0) {
  char text[200];
  std::snprintf(text, sizeof text, f, a, b, c, d);
  return text;
}

// Fields of the agreement header. Each travels as v and -v, so that one
// MPI_MAX gives both the maximum and the minimum over the ranks.
enum field { kPriority, kC, kSpatial, kLayout, kFlags, kEps, kExchange, kFields };

// A rank's status before the agreement; when ranks differ the highest wins
// (an argument error says more than a failed allocation).
enum priority : int64_t { kOk = 0, kNoMemory = 1, kInvalid = 2 };

bnorm_status status_of(int64_t p) {
  return p == kInvalid    ? BNORM_INVALID_ARGUMENT
         : p == kNoMemory ? BNORM_OUT_OF_MEMORY
                          : BNORM_SUCCESS;
}
int64_t priority_of(bnorm_status s) {
  return s == BNORM_SUCCESS ? kOk : s == BNORM_OUT_OF_MEMORY ? kNoMemory : kInvalid;
}

// Doubles carry the counts exactly up to 2^53 values per channel.
constexpr int64_t kMaxCount = int64_t{1} << 53;

// The communicator's size, or why it cannot be used (no communication).
bnorm_status communicator_size(const char* fn, MPI_Comm comm, int* size) {
  int initialized = 0, finalized = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized)
    return report(BNORM_UNSUPPORTED, fn, "MPI is not initialized");
  if (MPI_Finalized(&finalized) != MPI_SUCCESS || finalized)
    return report(BNORM_UNSUPPORTED, fn, "MPI is finalized");
  if (comm == MPI_COMM_NULL) return report(BNORM_INVALID_ARGUMENT, fn, "comm is MPI_COMM_NULL");
  int inter = 0;
  if (MPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS)
    return report(BNORM_UNSUPPORTED, fn, "MPI_Comm_test_inter failed");
  if (inter) return report(BNORM_INVALID_ARGUMENT, fn, "comm is an intercommunicator");
  if (MPI_Comm_size(comm, size) != MPI_SUCCESS)
    return report(BNORM_UNSUPPORTED, fn, "MPI_Comm_size failed");
  return BNORM_SUCCESS;
}

bool overlap(const float* a, const float* b, int64_t n) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  const auto bytes = static_cast<uintptr_t>(n) * sizeof(float);
  return n > 0 && pa < pb + bytes && pb < pa + bytes;
}

// This rank's view of the call: the header it contributes, and its sizes.
struct local_call {
  int64_t header[kFields] = {};
  int64_t count = 0;  // values per channel on this rank: n * spatial
  int64_t total = 0;  // floats of the local tensor
  std::string why;    // of the rejection that set the priority

  bool ok() const { return header[kPriority] == kOk; }
  void reject(int64_t p, const std::string& reason) {
    if (p > header[kPriority]) {
      header[kPriority] = p;
      why = reason;
    }
  }
};

// The checks bnorm.h's functions make of shape, eps and flags, on this rank;
// and c small enough for an MPI count (2*c + 1 doubles per rank), n*spatial
// small enough to travel as a double.
local_call check_local(const bnorm_shape* s, float eps, unsigned flags, unsigned allowed) {
  local_call call;
  if (!s) {
    call.reject(kInvalid, "local_shape is NULL");
    return call;
  }
  int layout = 0;  // any value: an out-of-range enum is read as its bytes
  std::memcpy(&layout, &s->layout, sizeof layout);
  if ((layout != BNORM_NCHW && layout != BNORM_NHWC) || s->n < 0 || s->c <= 0 || s->spatial < 0) {
    call.reject(kInvalid, format("local shape n=%lld c=%lld spatial=%lld layout=%lld (need n >= 0, "
                                 "c > 0, spatial >= 0, layout NCHW or NHWC)",
                                 s->n, s->c, s->spatial, layout));
    return call;
  }
  if (s->c > (INT_MAX - 1) / 2) {
    call.reject(kInvalid, format("c = %lld: 2c + 1 doubles exceed one MPI message", s->c));
    return call;
  }
  if (!(eps >= 0.f) || (flags & ~allowed)) {
    call.reject(kInvalid, !(eps >= 0.f)
                              ? std::string("eps is negative or NaN")
                              : format("flags 0x%llx not supported here (allowed 0x%llx)", flags,
                                       allowed));
    return call;
  }
  int64_t nc = 0;
  constexpr int64_t kMaxElements = PTRDIFF_MAX / static_cast<int64_t>(sizeof(float));
  if (__builtin_mul_overflow(s->n, s->c, &nc) ||
      __builtin_mul_overflow(nc, s->spatial, &call.total) || call.total > kMaxElements ||
      s->n * s->spatial >= kMaxCount) {
    call.reject(kInvalid, format("local shape n=%lld c=%lld spatial=%lld is too large", s->n, s->c,
                                 s->spatial));
    return call;
  }
  call.count = s->n * s->spatial;
  const float e = eps + 0.f;  // -0 and +0 agree
  uint32_t eps_bits = 0;
  std::memcpy(&eps_bits, &e, sizeof e);
  call.header[kC] = s->c;
  call.header[kSpatial] = s->spatial;
  call.header[kLayout] = s->layout;
  call.header[kFlags] = flags;
  call.header[kEps] = eps_bits;
  return call;
}

// Scratch for the gather: this rank's message and everyone's.
struct exchange_buffers {
  std::vector<double> mine, all;

  // message = [count, first[c], second[c]]
  bool allocate(int ranks, int64_t c) {
    try {
      mine.assign(static_cast<size_t>(2 * c + 1), 0.0);
      all.resize(static_cast<size_t>(ranks) * static_cast<size_t>(2 * c + 1));
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }
};

// The agreement: every rank gets the same status (and the same decision to
// go on) from the reduced headers; each rank's message says its own reason,
// or that another rank's applies.
bnorm_status agree(const char* fn, MPI_Comm comm, const local_call& call) {
  int64_t send[2 * kFields], recv[2 * kFields];
  for (int f = 0; f < kFields; ++f) {
    send[2 * f] = call.header[f];
    send[2 * f + 1] = -call.header[f];
  }
  if (MPI_Allreduce(send, recv, 2 * kFields, MPI_INT64_T, MPI_MAX, comm) != MPI_SUCCESS)
    return report(BNORM_UNSUPPORTED, fn, "MPI_Allreduce failed");
  const int64_t worst = recv[2 * kPriority];
  if (worst != kOk) {
    if (call.header[kPriority] == worst) return report(status_of(worst), fn, call.why);
    return report(status_of(worst), fn,
                  worst == kInvalid ? "another rank's arguments are invalid"
                                    : "another rank could not allocate its scratch");
  }
  static const char* const names[kFields] = {"", "c", "spatial", "layout", "flags", "eps",
                                             "the request for dgamma or dbeta"};
  for (int f = kC; f < kFields; ++f)
    if (recv[2 * f] != -recv[2 * f + 1])
      return report(BNORM_INVALID_ARGUMENT, fn,
                    std::string(names[f]) + " differs between the ranks (all must pass the same)");
  return BNORM_SUCCESS;
}

// One message of 2c + 1 doubles from every rank, in rank order.
bool gather(MPI_Comm comm, exchange_buffers& b) {
  const int n = static_cast<int>(b.mine.size());
  return MPI_Allgather(b.mine.data(), n, MPI_DOUBLE, b.all.data(), n, MPI_DOUBLE, comm) ==
         MPI_SUCCESS;
}

// The sum of the gathered counts; false if it overflows (the same on every rank).
bool global_count(const exchange_buffers& b, int ranks, int64_t c, int64_t* sum) {
  *sum = 0;
  for (int r = 0; r < ranks; ++r) {
    const auto n = static_cast<int64_t>(b.all[static_cast<size_t>(r) * (2 * c + 1)]);
    if (__builtin_add_overflow(*sum, n, sum)) return false;
  }
  return true;
}

}  // namespace

extern "C" {

bnorm_status bnorm_mpi_forward_training(MPI_Comm comm, const bnorm_shape* local_shape, float eps,
                                        unsigned flags, const float* x, const float* gamma,
                                        const float* beta, float* y, float* mean, float* var,
                                        uint8_t* relu_mask) {
  static const char fn[] = "bnorm_mpi_forward_training";
  int ranks = 0;
  const bnorm_status usable = communicator_size(fn, comm, &ranks);
  if (usable != BNORM_SUCCESS) return usable;

  // Local checks: those of bnorm_forward_training, except that an empty
  // slice is fine (the global batch must not be) and needs no tensors.
  local_call call = check_local(local_shape, eps, flags, BNORM_FUSE_RELU);
  const bool relu = flags & BNORM_FUSE_RELU;
  if (call.ok() && (!mean || !var)) call.reject(kInvalid, !mean ? "mean is NULL" : "var is NULL");
  if (call.ok() && call.total > 0) {
    if (!x) call.reject(kInvalid, "x is NULL");
    if (!y) call.reject(kInvalid, "y is NULL");
    if (relu && !relu_mask) call.reject(kInvalid, "BNORM_FUSE_RELU needs relu_mask");
    if (x != y && overlap(x, y, call.total)) call.reject(kInvalid, "y overlaps x without being it");
  }

  const int64_t c = call.ok() ? local_shape->c : 0;
  exchange_buffers b;
  std::vector<int64_t> counts;
  std::vector<double> means, m2s;
  std::vector<float> merged;
  if (call.ok()) {
    try {
      counts.resize(static_cast<size_t>(ranks));
      means.resize(static_cast<size_t>(ranks) * static_cast<size_t>(c));
      m2s.resize(static_cast<size_t>(ranks) * static_cast<size_t>(c));
      merged.resize(static_cast<size_t>(2 * c));
    } catch (const std::exception&) {
      call.reject(kNoMemory, "no memory for the exchange");
    }
    if (!b.allocate(ranks, c)) call.reject(kNoMemory, "no memory for the exchange");
  }
  if (call.ok()) {
    b.mine[0] = static_cast<double>(call.count);
    // An empty slice's moments are the zeros b.mine holds already; skipping
    // bnorm_moments spares its scratch (and an allocation that could fail).
    if (call.total > 0)
      call.reject(priority_of(bnorm_moments(local_shape, x, &b.mine[1], &b.mine[1 + c])),
                  bnorm_last_error_message());
  }

  const bnorm_status agreed = agree(fn, comm, call);
  if (agreed != BNORM_SUCCESS) return agreed;
  if (!gather(comm, b)) return report(BNORM_UNSUPPORTED, fn, "MPI_Allgather failed");

  // Every rank unpacks and merges the same bytes in the same order.
  int64_t count = 0;
  if (!global_count(b, ranks, c, &count))
    return report(BNORM_INVALID_ARGUMENT, fn, "the global batch has too many values per channel");
  if (count == 0)
    return report(BNORM_INVALID_ARGUMENT, fn,
                  "the global batch has no values (n*spatial == 0 on every rank)");
  for (int r = 0; r < ranks; ++r) {
    const double* m = &b.all[static_cast<size_t>(r) * (2 * c + 1)];
    counts[r] = static_cast<int64_t>(m[0]);
    std::memcpy(&means[r * c], m + 1, c * sizeof(double));
    std::memcpy(&m2s[r * c], m + 1 + c, c * sizeof(double));
  }
  float* batch_mean = merged.data();
  float* batch_var = merged.data() + c;
  bnorm_status s =
      bnorm_merge_moments(ranks, c, counts.data(), means.data(), m2s.data(), batch_mean, batch_var);
  if (s != BNORM_SUCCESS) return s;  // not reached: the counts were checked above
  if (call.total > 0) {
    s = bnorm_normalize(local_shape, eps, flags, x, gamma, beta, batch_mean, batch_var, y,
                        relu_mask);
    if (s != BNORM_SUCCESS) return s;  // only BNORM_OUT_OF_MEMORY, on this rank
  }
  std::memcpy(mean, batch_mean, c * sizeof(float));
  std::memcpy(var, batch_var, c * sizeof(float));
  return succeed();
}

bnorm_status bnorm_mpi_backward(MPI_Comm comm, const bnorm_shape* local_shape, float eps,
                                unsigned flags, const float* x, const float* dy, const float* gamma,
                                const float* mean, const float* var, const uint8_t* relu_mask,
                                float* dx, float* dgamma, float* dbeta) {
  static const char fn[] = "bnorm_mpi_backward";
  int ranks = 0;
  const bnorm_status usable = communicator_size(fn, comm, &ranks);
  if (usable != BNORM_SUCCESS) return usable;

  // Local checks: those of bnorm_backward, tensors only for a non-empty slice.
  local_call call = check_local(local_shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS);
  const bool relu = flags & BNORM_FUSE_RELU;
  const bool frozen = flags & BNORM_GLOBAL_STATS;
  if (call.ok() && (!mean || !var)) call.reject(kInvalid, !mean ? "mean is NULL" : "var is NULL");
  if (call.ok() && call.total > 0) {
    if (!x) call.reject(kInvalid, "x is NULL");
    if (!dy) call.reject(kInvalid, "dy is NULL");
    if (!dx) call.reject(kInvalid, "dx is NULL");
    if (relu && !relu_mask) call.reject(kInvalid, "BNORM_FUSE_RELU needs relu_mask");
    if (dx != dy && overlap(dx, dy, call.total))
      call.reject(kInvalid, "dx overlaps dy without being it");
    if (overlap(dx, x, call.total)) call.reject(kInvalid, "dx overlaps x");
  }
  // The global sums: always for batch statistics (dx needs them); with
  // frozen statistics only for dgamma and dbeta, decided alike on every rank.
  const bool exchange = !frozen || dgamma || dbeta;
  call.header[kExchange] = exchange;

  const int64_t c = call.ok() ? local_shape->c : 0;
  exchange_buffers b;
  std::vector<double> sums;
  if (call.ok() && exchange) {
    try {
      sums.resize(static_cast<size_t>(2 * c));
    } catch (const std::exception&) {
      call.reject(kNoMemory, "no memory for the exchange");
    }
    if (!b.allocate(ranks, c)) call.reject(kNoMemory, "no memory for the exchange");
  }
  if (call.ok() && exchange) {
    b.mine[0] = static_cast<double>(call.count);
    if (call.total > 0)
      call.reject(priority_of(bnorm_backward_reduce(local_shape, eps, flags, x, dy, mean, var,
                                                    relu_mask, &b.mine[1], &b.mine[1 + c])),
                  bnorm_last_error_message());
  }

  const bnorm_status agreed = agree(fn, comm, call);
  if (agreed != BNORM_SUCCESS) return agreed;

  int64_t count = call.count;  // unused with frozen statistics
  double* sum_dy = nullptr;
  double* sum_dy_xhat = nullptr;
  if (exchange) {
    if (!gather(comm, b)) return report(BNORM_UNSUPPORTED, fn, "MPI_Allgather failed");
    if (!global_count(b, ranks, c, &count))
      return report(BNORM_INVALID_ARGUMENT, fn,
                    "the global batch has too many values per channel");
    // Rank order, starting from rank 0's sums: with one rank these are
    // exactly bnorm_backward's.
    sum_dy = sums.data();
    sum_dy_xhat = sums.data() + c;
    for (int64_t j = 0; j < 2 * c; ++j) {
      double acc = b.all[1 + j];
      for (int r = 1; r < ranks; ++r) acc += b.all[static_cast<size_t>(r) * (2 * c + 1) + 1 + j];
      sums[j] = acc;
    }
  }
  if (call.total > 0) {
    const bnorm_status s = bnorm_backward_apply(local_shape, eps, flags, x, dy, gamma, mean, var,
                                                relu_mask, sum_dy, sum_dy_xhat, count, dx);
    if (s != BNORM_SUCCESS) return s;  // only BNORM_OUT_OF_MEMORY, on this rank
  }
  for (int64_t j = 0; j < c; ++j) {
    if (dgamma) dgamma[j] = static_cast<float>(sum_dy_xhat[j]);
    if (dbeta) dbeta[j] = static_cast<float>(sum_dy[j]);
  }
  return succeed();
}

}  // extern "C"
