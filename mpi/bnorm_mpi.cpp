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
#include <cstring>
#include <exception>
#include <vector>

namespace {

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
bnorm_status communicator_size(MPI_Comm comm, int* size) {
  int initialized = 0, finalized = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized) return BNORM_UNSUPPORTED;
  if (MPI_Finalized(&finalized) != MPI_SUCCESS || finalized) return BNORM_UNSUPPORTED;
  if (comm == MPI_COMM_NULL) return BNORM_INVALID_ARGUMENT;
  int inter = 0;
  if (MPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS) return BNORM_UNSUPPORTED;
  if (inter) return BNORM_INVALID_ARGUMENT;
  if (MPI_Comm_size(comm, size) != MPI_SUCCESS) return BNORM_UNSUPPORTED;
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

  bool ok() const { return header[kPriority] == kOk; }
  void reject(int64_t p) {
    if (p > header[kPriority]) header[kPriority] = p;
  }
};

// The checks bnorm.h's functions make of shape, eps and flags, on this rank;
// and c small enough for an MPI count (2*c + 1 doubles per rank), n*spatial
// small enough to travel as a double.
local_call check_local(const bnorm_shape* s, float eps, unsigned flags, unsigned allowed) {
  local_call call;
  if (!s || (s->layout != BNORM_NCHW && s->layout != BNORM_NHWC) || s->n < 0 || s->c <= 0 ||
      s->spatial < 0 || s->c > (INT_MAX - 1) / 2 || !(eps >= 0.f) || (flags & ~allowed)) {
    call.reject(kInvalid);
    return call;
  }
  int64_t nc = 0;
  constexpr int64_t kMaxElements = PTRDIFF_MAX / static_cast<int64_t>(sizeof(float));
  if (__builtin_mul_overflow(s->n, s->c, &nc) ||
      __builtin_mul_overflow(nc, s->spatial, &call.total) || call.total > kMaxElements ||
      s->n * s->spatial >= kMaxCount) {
    call.reject(kInvalid);
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
// go on) from the reduced headers.
bnorm_status agree(MPI_Comm comm, const local_call& call) {
  int64_t send[2 * kFields], recv[2 * kFields];
  for (int f = 0; f < kFields; ++f) {
    send[2 * f] = call.header[f];
    send[2 * f + 1] = -call.header[f];
  }
  if (MPI_Allreduce(send, recv, 2 * kFields, MPI_INT64_T, MPI_MAX, comm) != MPI_SUCCESS)
    return BNORM_UNSUPPORTED;
  if (recv[2 * kPriority] != kOk) return status_of(recv[2 * kPriority]);
  for (int f = kC; f < kFields; ++f)
    if (recv[2 * f] != -recv[2 * f + 1]) return BNORM_INVALID_ARGUMENT;
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
  int ranks = 0;
  const bnorm_status usable = communicator_size(comm, &ranks);
  if (usable != BNORM_SUCCESS) return usable;

  // Local checks: those of bnorm_forward_training, except that an empty
  // slice is fine (the global batch must not be) and needs no tensors.
  local_call call = check_local(local_shape, eps, flags, BNORM_FUSE_RELU);
  const bool relu = flags & BNORM_FUSE_RELU;
  if (call.ok() && (!mean || !var)) call.reject(kInvalid);
  if (call.ok() && call.total > 0 &&
      (!x || !y || (relu && !relu_mask) || (x != y && overlap(x, y, call.total))))
    call.reject(kInvalid);

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
      call.reject(kNoMemory);
    }
    if (!b.allocate(ranks, c)) call.reject(kNoMemory);
  }
  if (call.ok()) {
    b.mine[0] = static_cast<double>(call.count);
    // bnorm_moments gives mean = M2 = 0 for no values; an empty slice may
    // come without x, so those zeros are written here instead.
    if (call.total > 0)
      call.reject(priority_of(bnorm_moments(local_shape, x, &b.mine[1], &b.mine[1 + c])));
  }

  const bnorm_status agreed = agree(comm, call);
  if (agreed != BNORM_SUCCESS) return agreed;
  if (!gather(comm, b)) return BNORM_UNSUPPORTED;

  // Every rank unpacks and merges the same bytes in the same order.
  int64_t count = 0;
  if (!global_count(b, ranks, c, &count) || count == 0) return BNORM_INVALID_ARGUMENT;
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
  return BNORM_SUCCESS;
}

bnorm_status bnorm_mpi_backward(MPI_Comm comm, const bnorm_shape* local_shape, float eps,
                                unsigned flags, const float* x, const float* dy, const float* gamma,
                                const float* mean, const float* var, const uint8_t* relu_mask,
                                float* dx, float* dgamma, float* dbeta) {
  int ranks = 0;
  const bnorm_status usable = communicator_size(comm, &ranks);
  if (usable != BNORM_SUCCESS) return usable;

  // Local checks: those of bnorm_backward, tensors only for a non-empty slice.
  local_call call = check_local(local_shape, eps, flags, BNORM_FUSE_RELU | BNORM_GLOBAL_STATS);
  const bool relu = flags & BNORM_FUSE_RELU;
  const bool frozen = flags & BNORM_GLOBAL_STATS;
  if (call.ok() && (!mean || !var)) call.reject(kInvalid);
  if (call.ok() && call.total > 0 &&
      (!x || !dy || !dx || (relu && !relu_mask) || (dx != dy && overlap(dx, dy, call.total)) ||
       overlap(dx, x, call.total)))
    call.reject(kInvalid);
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
      call.reject(kNoMemory);
    }
    if (!b.allocate(ranks, c)) call.reject(kNoMemory);
  }
  if (call.ok() && exchange) {
    b.mine[0] = static_cast<double>(call.count);
    if (call.total > 0)
      call.reject(priority_of(bnorm_backward_reduce(local_shape, eps, flags, x, dy, mean, var,
                                                    relu_mask, &b.mine[1], &b.mine[1 + c])));
  }

  const bnorm_status agreed = agree(comm, call);
  if (agreed != BNORM_SUCCESS) return agreed;

  int64_t count = call.count;  // unused with frozen statistics
  double* sum_dy = nullptr;
  double* sum_dy_xhat = nullptr;
  if (exchange) {
    if (!gather(comm, b)) return BNORM_UNSUPPORTED;
    if (!global_count(b, ranks, c, &count)) return BNORM_INVALID_ARGUMENT;
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
  return BNORM_SUCCESS;
}

}  // extern "C"
