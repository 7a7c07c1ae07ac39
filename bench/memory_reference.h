// The references rows are measured against: a memory copy with non-temporal
// (streaming) stores, and, to describe the machine, a read-only pass and a
// copy with ordinary stores. All split over the OpenMP threads.
#ifndef BNORM_BENCH_MEMORY_REFERENCE_H
#define BNORM_BENCH_MEMORY_REFERENCE_H

#include <cstddef>

namespace bnorm_bench {

// Copies `bytes` (a multiple of 4) from src to dst with streaming stores.
// Both pointers 64-byte aligned, the ranges must not overlap.
void nt_copy(float* dst, const float* src, size_t bytes);

// The same with ordinary stores (each written line is read first).
void plain_copy(float* dst, const float* src, size_t bytes);

// Reads `bytes` (a multiple of 4) from src, 64-byte aligned; returns their sum.
float read_sum(const float* src, size_t bytes);

// "avx512", "avx" or "sse": the instructions the functions above use here.
const char* memory_reference_isa();

// Best time in seconds of one nt_copy of `bytes` from src to dst over 9
// timed batches, each of enough copies to last >= 200 us. Rows call it right
// before they run: the machine's memory bandwidth drifts (other virtual
// machines share it), and the reference must be taken under the same
// conditions as the row.
double nt_copy_seconds(float* dst, const float* src, size_t bytes);

}  // namespace bnorm_bench

#endif  // BNORM_BENCH_MEMORY_REFERENCE_H
