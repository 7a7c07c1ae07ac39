// The reference every row is measured against: a memory copy with
// non-temporal (streaming) stores, split over all OpenMP threads.
#ifndef BNORM_BENCH_NT_COPY_H
#define BNORM_BENCH_NT_COPY_H

#include <cstddef>

namespace bnorm_bench {

// Copies `bytes` (a multiple of 4) from src to dst with streaming stores.
// Both pointers 64-byte aligned, the ranges must not overlap.
void nt_copy(float* dst, const float* src, size_t bytes);

// "avx512", "avx" or "sse": the stores nt_copy uses on this CPU.
const char* nt_copy_isa();

// Best time in seconds of one nt_copy of `bytes` from src to dst seen in this
// process: 15 timed batches on the first request for a size, 5 more on each
// later one (the minimum is kept).
double best_nt_copy_seconds(float* dst, const float* src, size_t bytes);

}  // namespace bnorm_bench

#endif  // BNORM_BENCH_NT_COPY_H
